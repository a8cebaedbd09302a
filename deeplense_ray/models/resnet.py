"""ResNet baselines of the PINN study (He et al. 2016): ResNet18 and a small 2-block residual classifier.

Own code (torchvision is not usable beside this torch build). Convolutional, so any image size >= 16 works.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU with an identity (or 1x1-conv) shortcut."""

    def __init__(self, *, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.short: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.short = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class ResNet18(nn.Module):
    """ResNet18 (stages of 2 basic blocks, widths ``width*(1,2,4,8)``), torchvision-style stem
    (7x7 stride-2 conv + 3x3 stride-2 max-pool), global average pool, dropout, linear head."""

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers = []
        ch = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(in_ch=ch, out_ch=out, stride=stride), BasicBlock(in_ch=out, out_ch=out)]
            ch = out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(ch, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class ResNetSimple(nn.Module):
    """The PINN study's light classifier: a conv stem and 2 residual stages of 2 basic blocks each
    (9 convolutions + 1x1 shortcuts), widths ``width`` and ``2*width``."""

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.layers = nn.Sequential(
            BasicBlock(in_ch=width, out_ch=width, stride=2),
            BasicBlock(in_ch=width, out_ch=width),
            BasicBlock(in_ch=width, out_ch=2 * width, stride=2),
            BasicBlock(in_ch=2 * width, out_ch=2 * width),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))
