"""Which training rows each federated client holds: pure functions of the data and a seed.

A client's rows are indices that its dataset's ``eval_batch(rows, seq_len)``
turns into a batch, so client training needs nothing else of the dataset:

- labelled data (``ArrayDataset``): the training rows, dealt out with label
  skew: for every class, its rows are split among the clients in
  proportions drawn from Dirichlet(alpha) (Hsu et al. 2019). Small alpha
  (0.1): each client sees few classes; large alpha: nearly IID; ``alpha``
  None: IID, equal shares.
- token data (``TokenDataset``): the training text, cut into contiguous
  spans at document boundaries where the dataset records them (the standard
  library corpus: one source file per document), so a client holds whole
  files; its rows are the start offsets of its non-overlapping windows.

Every process that computes the split (each client actor, a reference in a
test) gets the same one: it depends only on the data, the count, alpha and
the seed.

A user's own per-client data: any dataset object with ``client_rows(n_clients,
seed) -> list[np.ndarray]`` (and ``eval_batch``) is split by that method
instead.
"""

from __future__ import annotations

import numpy as np

from actors.datasets import DataError

# Draws of Dirichlet proportions before giving up on giving every client a row.
_MAX_DRAWS = 100


def client_rows(data: object, n_clients: int, seed: int, seq_len: int | None) -> list[np.ndarray]:
    """Each client's rows (see the module docstring); label skew from the data's ``alpha``."""
    own = getattr(data, "client_rows", None)
    if callable(own):
        rows = own(n_clients, seed)
        if len(rows) != n_clients:
            raise DataError(
                f"{type(data).__name__}.client_rows returned {len(rows)} clients' rows, "
                f"expected strategy.clients = {n_clients}"
            )
        return [np.asarray(r) for r in rows]
    kind = getattr(data, "kind", None)
    if kind == "labelled":
        alpha = getattr(data, "alpha", None)
        return label_skew_split(data.y[data.train_rows], data.train_rows, n_clients, alpha, seed)
    if kind == "tokens":
        if seq_len is None:
            raise DataError("token data needs model.seq_len to cut client windows")
        return token_windows(data.n_train, getattr(data, "doc_starts", None), n_clients, seq_len)
    raise DataError(
        f"strategy=federated cannot split a {type(data).__name__} among clients: give it a "
        "client_rows(n_clients, seed) method"
    )


def label_skew_split(
    labels: np.ndarray, rows: np.ndarray, n_clients: int, alpha: float | None, seed: int
) -> list[np.ndarray]:
    """``rows`` (with class ``labels``) dealt to ``n_clients``; Dirichlet(alpha) per class."""
    if len(rows) < n_clients:
        raise DataError(f"strategy.clients: {n_clients} clients but only {len(rows)} training rows")
    rng = np.random.default_rng([seed, n_clients])
    if alpha is None:
        return [
            np.sort(part) for part in np.array_split(rows[rng.permutation(len(rows))], n_clients)
        ]
    if alpha <= 0:
        raise DataError(f"data.alpha: must be > 0 (or null for IID), got {alpha}")
    by_class = [rows[labels == k] for k in np.unique(labels)]
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for class_rows in by_class:
            shuffled = class_rows[rng.permutation(len(class_rows))]
            share = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(shuffled)).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                parts[client].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) > 0:
            return out
    raise DataError(
        f"data.alpha={alpha}: with {n_clients} clients and {len(rows)} rows some client gets "
        "no rows; raise data.alpha or lower strategy.clients"
    )


def token_windows(
    n_train: int, doc_starts: np.ndarray | None, n_clients: int, seq_len: int
) -> list[np.ndarray]:
    """Window start offsets of each client's span of the first ``n_train`` tokens."""
    cuts = _span_cuts(n_train, doc_starts, n_clients)
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        starts = np.arange(lo, hi - seq_len - 1 + 1, seq_len, dtype=np.int64)
        if len(starts) == 0:
            raise DataError(
                f"strategy.clients: {n_clients} clients leave a client {hi - lo} tokens, "
                f"fewer than one window of model.seq_len + 1 = {seq_len + 1}"
            )
        out.append(starts)
    return out


def _span_cuts(n_train: int, doc_starts: np.ndarray | None, n_clients: int) -> list[int]:
    """``n_clients + 1`` cut points in ``[0, n_train]``: near-equal spans, at documents if any.

    Each inner cut moves to the document start nearest its even position if
    one lies within half a span of it (and after the previous cut); else a
    document longer than that is cut inside.
    """
    even = [n_train * i // n_clients for i in range(n_clients + 1)]
    if doc_starts is None:
        return even
    starts = np.asarray(doc_starts, dtype=np.int64)
    starts = starts[(starts > 0) & (starts < n_train)]
    half = n_train // (2 * n_clients)
    cuts = [0]
    for target in even[1:-1]:
        near = starts[(np.abs(starts - target) <= half) & (starts > cuts[-1])]
        cut = int(near[np.argmin(np.abs(near - target))]) if len(near) else target
        cuts.append(max(cut, cuts[-1] + 1))
    cuts.append(n_train)
    return cuts
