"""``model._target_=mypkg.nets.ResNetTiny``: a small residual conv net, in plain PyTorch.

shoal calls ``ResNetTiny(**model config fields, **dataset facts it names)``:
``num_classes`` and ``input_shape`` come from the dataset (``mypkg.data``),
``width`` from ``model.width=...`` if you set it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with a skip connection (GroupNorm: no running statistics)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResNetTiny(nn.Module):
    """stem conv -> residual block -> 2x downsample -> residual block -> pool -> linear.

    Takes images ``[B, 1, H, W]``, or flat rows ``[B, H*W]`` that are
    reshaped with ``input_shape`` (``(1, H, W)`` or ``(H, W)``).
    """

    def __init__(self, num_classes: int, input_shape: tuple, width: int = 16):
        super().__init__()
        shape = tuple(int(d) for d in input_shape)
        if len(shape) == 1:  # flat rows of a square image
            side = math.isqrt(shape[0])
            shape = (1, side, side)
        elif len(shape) == 2:
            shape = (1, *shape)
        if shape[0] != 1 or math.prod(shape) != math.prod(input_shape):
            raise ValueError(f"ResNetTiny takes 1-channel images, got input_shape {input_shape}")
        self.image_shape = shape
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.GroupNorm(4, width), nn.ReLU()
        )
        self.block1 = Block(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
        )
        self.block2 = Block(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))
