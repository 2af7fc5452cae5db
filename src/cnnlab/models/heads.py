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
        bias: bool = True,
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
        layers += [*_dropout(dropout), nn.Linear(widths[-1], classes, bias=bias)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)  # (B, C*H*W)
        return self.mlp(x)


class GlobalPoolHead(nn.Module):
    """Global pooling to one value per channel (average: GAP; max: airbench's head), then
    one linear classifier."""

    def __init__(
        self, pool: nn.Module, channels: int, classes: int, *, dropout: float, bias: bool
    ) -> None:
        super().__init__()
        self.pool = pool
        self.classifier = FCHead(channels, classes, dropout=dropout, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)  # (B, C, 1, 1)
        return self.classifier(x)


class NINHead(nn.Module):
    """Network in Network: a 1x1 conv to one map per class, then global average pooling;
    no dense layer at all."""

    def __init__(
        self, channels: int, classes: int, *, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        self.dropout = nn.Sequential(*_dropout(dropout))
        self.conv = nn.Conv2d(channels, classes, 1, bias=bias)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.dropout(x))  # (B, classes, H, W)
        return self.flatten(self.pool(x))  # (B, classes)


class Scaled(nn.Module):
    """A head whose logits are multiplied by ``scale`` (airbench's 1/9)."""

    def __init__(self, head: nn.Module, scale: float) -> None:
        super().__init__()
        self.head, self.scale = head, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x) * self.scale


# name -> factory(channels, size, classes, hidden, dropout, activation, bias); each head
# takes what applies to it: fc_hidden and the activation only matter to the FC head.
HEADS: dict[str, Callable[..., nn.Module]] = {
    "fc": lambda channels, size, classes, hidden, dropout, activation, bias: FCHead(
        channels * size * size,
        classes,
        hidden=hidden,
        dropout=dropout,
        activation=activation,
        bias=bias,
    ),
    "gap": lambda channels, size, classes, hidden, dropout, activation, bias: GlobalPoolHead(
        nn.AdaptiveAvgPool2d(1), channels, classes, dropout=dropout, bias=bias
    ),
    "max": lambda channels, size, classes, hidden, dropout, activation, bias: GlobalPoolHead(
        nn.AdaptiveMaxPool2d(1), channels, classes, dropout=dropout, bias=bias
    ),
    "nin": lambda channels, size, classes, hidden, dropout, activation, bias: NINHead(
        channels, classes, dropout=dropout, bias=bias
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
    bias: bool = True,
    scale: float = 1.0,
) -> nn.Module:
    factory = lookup("head", name, HEADS)
    head = factory(channels, size, classes, hidden, dropout, activation, bias)
    return head if scale == 1 else Scaled(head, scale)
