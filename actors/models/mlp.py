"""``model=mlp``: a multi-layer perceptron classifier for feature vectors (e.g. ``data=digits``)."""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """``in_features -> hidden... -> num_classes`` with GELU between layers.

    ``in_features`` and ``num_classes`` come from the dataset (its facts);
    inputs of any shape ``[B, ...]`` are flattened.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: tuple[int, ...] | list[int] = (128, 128),
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
