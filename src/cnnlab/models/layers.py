"""Activation and convolution factories: each option is a name looked up in one table."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cnnlab.checks import ConfigError, lookup
from cnnlab.models.shapes import Window

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def make_activation(name: str) -> nn.Module:
    return lookup("activation", name, ACTIVATIONS)()


def _standard(c_in: int, c_out: int, window: Window, groups: int) -> nn.Module:
    return nn.Conv2d(c_in, c_out, window.kernel, window.stride, window.padding)


def _grouped(c_in: int, c_out: int, window: Window, groups: int) -> nn.Module:
    if c_in % groups or c_out % groups:
        raise ConfigError(
            f"model.conv=grouped needs model.groups={groups} to divide the "
            f"channels in and out of every conv; {c_in} -> {c_out} does not"
        )
    return nn.Conv2d(c_in, c_out, window.kernel, window.stride, window.padding, groups=groups)


def _depthwise_separable(c_in: int, c_out: int, window: Window, groups: int) -> nn.Module:
    """A per-channel spatial conv, then a 1x1 conv mixing channels (MobileNet)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, window.kernel, window.stride, window.padding, groups=c_in),
        nn.Conv2d(c_in, c_out, 1),
    )


CONVS: dict[str, Callable[[int, int, Window, int], nn.Module]] = {
    "standard": _standard,
    "grouped": _grouped,
    "depthwise_separable": _depthwise_separable,
}


def make_conv(kind: str, c_in: int, c_out: int, window: Window, groups: int = 1) -> nn.Module:
    return lookup("conv", kind, CONVS)(c_in, c_out, window, groups)
