"""Layer factories: each option is a name looked up in one table; ``"none"`` means off."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

POOLINGS: dict[str, Callable[[int, int], nn.Module]] = {
    "max": lambda kernel, stride: nn.MaxPool2d(kernel, stride),
    "avg": lambda kernel, stride: nn.AvgPool2d(kernel, stride),
}


def _lookup(kind: str, table: dict, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def make_activation(name: str) -> nn.Module:
    return _lookup("activation", ACTIVATIONS, name)()


def make_pooling(name: str, kernel: int, stride: int) -> nn.Module:
    return _lookup("pooling", POOLINGS, name)(kernel, stride)
