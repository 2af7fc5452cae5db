"""Activation, convolution, normalization and initialization factories: each option is a
name looked up in one table."""

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


def _standard(c_in: int, c_out: int, window: Window, groups: int, bias: bool) -> nn.Module:
    return nn.Conv2d(c_in, c_out, window.kernel, window.stride, window.padding, bias=bias)


def _grouped(c_in: int, c_out: int, window: Window, groups: int, bias: bool) -> nn.Module:
    if c_in % groups or c_out % groups:
        raise ConfigError(
            f"model.conv=grouped needs model.groups={groups} to divide the "
            f"channels in and out of every conv; {c_in} -> {c_out} does not"
        )
    return nn.Conv2d(
        c_in, c_out, window.kernel, window.stride, window.padding, groups=groups, bias=bias
    )


def _depthwise_separable(
    c_in: int, c_out: int, window: Window, groups: int, bias: bool
) -> nn.Module:
    """A per-channel spatial conv, then a 1x1 conv mixing channels (MobileNet)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, window.kernel, window.stride, window.padding, groups=c_in, bias=bias),
        nn.Conv2d(c_in, c_out, 1, bias=bias),
    )


CONVS: dict[str, Callable[[int, int, Window, int, bool], nn.Module]] = {
    "standard": _standard,
    "grouped": _grouped,
    "depthwise_separable": _depthwise_separable,
}


def make_conv(
    kind: str, c_in: int, c_out: int, window: Window, groups: int = 1, bias: bool = True
) -> nn.Module:
    return lookup("conv", kind, CONVS)(c_in, c_out, window, groups, bias)


def make_norm(channels: int, momentum: float, eps: float, train_weight: bool) -> nn.BatchNorm2d:
    """Batchnorm; ``train_weight=False`` freezes its scale at 1 (its shift still trains)."""
    norm = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    norm.weight.requires_grad_(train_weight)
    return norm


def _dirac(conv: nn.Conv2d) -> None:
    """The first ``in_channels`` filters pass their input through unchanged (airbench's
    identity initialization); the other filters keep PyTorch's random ones."""
    if conv.groups == 1:
        nn.init.dirac_(conv.weight.data[: conv.in_channels])


# name -> what it does to each Conv2d of the stages (None: PyTorch's default, untouched).
INITS: dict[str, Callable[[nn.Conv2d], None] | None] = {"default": None, "dirac": _dirac}


def initialize(module: nn.Module, name: str) -> None:
    """Apply initialization ``name`` to every ``Conv2d`` in ``module``."""
    init = lookup("init", name, INITS)
    if init is None:
        return
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            init(conv)
