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

    def pipeline_layers(self) -> list[tuple[str, nn.Module]]:
        """For ``strategy=pipeline``: each linear layer with the activation after it."""
        layers, current, name = [], [], None
        for i, module in enumerate(self.net):
            if isinstance(module, nn.Linear) and current and name is not None:
                layers.append((name, nn.Sequential(*current)))
                current = []
            if isinstance(module, nn.Linear):
                name = f"net.{i}"
            current.append(module)
        layers.append((name, nn.Sequential(*current)))
        return layers
