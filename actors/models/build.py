"""Instantiate a model or dataset from its config node (a Hydra ``_target_``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.utils import instantiate
from torch import nn


def _as_dict(node: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    return dict(node)


def build_model(model_cfg: Any, vocab_size: int) -> nn.Module:
    """The model named by ``model_cfg._target_``, given the dataset's ``vocab_size``."""
    return instantiate(_as_dict(model_cfg), vocab_size=vocab_size)


def build_dataset(data_cfg: Any) -> Any:
    """The ``ByteCorpus`` returned by ``data_cfg._target_``."""
    return instantiate(_as_dict(data_cfg))
