"""Classifier heads. A head owns everything after the last feature map and knows its input
width, so FC-vs-GAP is a swap of one object."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from cnnlab.models.layers import make_activation


class FCHead(nn.Module):
    """Flatten, then hidden linear layers with activation, then the classifier."""

    def __init__(
        self,
        channels: int,
        size: int,
        classes: int,
        *,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = channels * size * size
        for out in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, out), make_activation(activation)]
            width = out
        layers += [nn.Dropout(dropout), nn.Linear(width, classes)]
        self.mlp = nn.Sequential(*[m for m in layers if not _is_noop_dropout(m)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)  # (B, C*H*W)
        return self.mlp(x)


class GAPHead(nn.Module):
    """Global average pooling to one value per channel, then the classifier.

    ``hidden`` and ``activation`` are accepted for a uniform signature and not used: the
    pooled vector feeds the classifier directly.
    """

    def __init__(
        self,
        channels: int,
        size: int,
        classes: int,
        *,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = FCHead(channels, 1, classes, hidden=(), dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)  # (B, C, 1, 1)
        return self.fc(x)


HEADS: dict[str, Callable[..., nn.Module]] = {"fc": FCHead, "gap": GAPHead}


def _is_noop_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) and module.p == 0


def make_head(name: str, channels: int, size: int, classes: int, **options) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid: {', '.join(sorted(HEADS))}")
    return HEADS[name](channels, size, classes, **options)
