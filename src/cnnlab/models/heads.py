"""Classifier heads. A head owns everything after the last feature map and knows its input
width, so FC-vs-GAP is a swap of one object."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from cnnlab.checks import lookup
from cnnlab.models.layers import make_activation


def _dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []


class FCHead(nn.Module):
    """Flatten, then hidden linear layers with activation, then the classifier; dropout
    (when > 0) before every linear layer."""

    def __init__(
        self,
        features: int,
        classes: int,
        *,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [features, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [
                *_dropout(dropout),
                nn.Linear(width_in, width_out),
                make_activation(activation),
            ]
        layers += [*_dropout(dropout), nn.Linear(widths[-1], classes)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)  # (B, C*H*W)
        return self.mlp(x)


class GAPHead(nn.Module):
    """Global average pooling to one value per channel, then one linear classifier."""

    def __init__(self, channels: int, classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = FCHead(channels, classes, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)  # (B, C, 1, 1)
        return self.classifier(x)


class NINHead(nn.Module):
    """Network in Network: a 1x1 conv to one map per class, then global average pooling;
    no dense layer at all."""

    def __init__(self, channels: int, classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Sequential(*_dropout(dropout))
        self.conv = nn.Conv2d(channels, classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.dropout(x))  # (B, classes, H, W)
        return self.flatten(self.pool(x))  # (B, classes)


# name -> factory(channels, size, classes, hidden, dropout, activation); each head takes
# what applies to it: fc_hidden and the activation only matter to the FC head.
HEADS: dict[str, Callable[..., nn.Module]] = {
    "fc": lambda channels, size, classes, hidden, dropout, activation: FCHead(
        channels * size * size, classes, hidden=hidden, dropout=dropout, activation=activation
    ),
    "gap": lambda channels, size, classes, hidden, dropout, activation: GAPHead(
        channels, classes, dropout=dropout
    ),
    "nin": lambda channels, size, classes, hidden, dropout, activation: NINHead(
        channels, classes, dropout=dropout
    ),
}


def make_head(
    name: str,
    channels: int,
    size: int,
    classes: int,
    *,
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Module:
    return lookup("head", name, HEADS)(channels, size, classes, hidden, dropout, activation)
