"""Datasets with faulty clients for the federated tests (imported by client actors).

``digits_with_faulty_clients``: scikit-learn's digits, split IID among the
clients, where client ``nan_client``'s rows have NaN features (its update is
not finite: rejected) and client ``raising_client``'s rows have a label past
the last class (its loss raises: a client error).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from actors.client_data import label_skew_split
from actors.datasets import ArrayDataset, digits


@dataclasses.dataclass(frozen=True)
class FaultyClients(ArrayDataset):
    n_clients: int = 0
    nan_client: int = -1
    raising_client: int = -1

    def client_rows(self, n_clients: int, seed: int) -> list[np.ndarray]:
        return label_skew_split(self.y[self.train_rows], self.train_rows, n_clients, None, seed)


def digits_with_faulty_clients(
    clients: int, nan_client: int = -1, raising_client: int = -1, seed: int = 0
) -> FaultyClients:
    base = digits(seed=seed)
    x, y = base.x.copy(), base.y.copy()
    parts = label_skew_split(base.y[base.train_rows], base.train_rows, clients, None, seed)
    if nan_client >= 0:
        x[parts[nan_client]] = np.nan
    if raising_client >= 0:
        y[parts[raising_client]] = base.num_classes + 5  # cross-entropy raises on it
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields.update(x=x, y=y)
    return FaultyClients(
        **fields, n_clients=clients, nan_client=nan_client, raising_client=raising_client
    )
