"""Pooling layers under study. Every one gives finite outputs and gradients for any finite
input, windows of zeros and negative values included.

Definitions (window ``w`` of ``N = k*k`` values, ``eps = 1e-6``):
- ``max``, ``avg``: PyTorch's.
- ``lp``: the power mean of magnitudes, ``(mean(max(|w|, eps)^p))^(1/p)``. p = 1 is the
  average of ``|w|`` (the average itself on non-negative input, e.g. after ReLU); p -> inf
  approaches ``max(|w|)``. PyTorch's ``nn.LPPool2d`` sums ``w^p`` without ``|.|`` and so
  returns NaN for negative windows with odd or fractional p, and overflows for large p; this
  one is computed as ``exp(logsumexp(p*log|w|)/p - log(N)/p)``, stable for any p >= 1.
- ``gem``: generalized mean (Radenovic et al.) ``(mean(max(w, eps)^p))^(1/p)`` with a
  learnable p >= 1 (starting at 3): negative values count as ``eps``, as in the paper.
- ``mixed``: ``a * max(w) + (1 - a) * avg(w)`` with a learnable ``a = sigmoid(logit)`` per
  layer (Lee et al., 2016), starting at 0.5.
- ``stride`` and ``none`` add no layer: see :mod:`cnnlab.models.backbones`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.checks import check_choice, check_range

EPS = 1e-6


def _power_mean(x: Tensor, p: Tensor | float, kernel: int, stride: int) -> Tensor:
    """``(mean over each window of x^p)^(1/p)`` for ``x >= EPS``, in log space."""
    batch, channels, height, width = x.shape
    out_h, out_w = (height - kernel) // stride + 1, (width - kernel) // stride + 1
    windows = F.unfold(x.log(), kernel, stride=stride)  # (B, C*k*k, L)
    windows = windows.view(batch, channels, kernel * kernel, out_h * out_w)
    log_mean = torch.logsumexp(p * windows, dim=2) - math.log(kernel * kernel)  # (B, C, L)
    return (log_mean / p).exp().view(batch, channels, out_h, out_w)


class LPPool(nn.Module):
    def __init__(self, kernel: int, stride: int, p: float = 2.0) -> None:
        super().__init__()
        check_range("model.pooling_p", p, low=1)
        self.kernel, self.stride, self.p = kernel, stride, p

    def forward(self, x: Tensor) -> Tensor:
        return _power_mean(x.abs().clamp_min(EPS), self.p, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, p={self.p}"


class GeMPool(nn.Module):
    def __init__(self, kernel: int, stride: int, p: float = 3.0) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        # p = 1 + softplus(raw) keeps the learned power >= 1.
        self.raw_p = nn.Parameter(torch.tensor(math.log(math.expm1(p - 1))))

    @property
    def p(self) -> Tensor:
        return 1 + F.softplus(self.raw_p)

    def forward(self, x: Tensor) -> Tensor:
        return _power_mean(x.clamp_min(EPS), self.p, self.kernel, self.stride)


class MixedPool(nn.Module):
    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.logit = nn.Parameter(torch.zeros(()))  # sigmoid(0) = 0.5: an even blend

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.sigmoid(self.logit)
        peak = F.max_pool2d(x, self.kernel, self.stride)
        mean = F.avg_pool2d(x, self.kernel, self.stride)
        return weight * peak + (1 - weight) * mean


# name -> factory(kernel, stride, p); None: the pooling adds no layer of its own.
POOLINGS: dict[str, Callable[[int, int, float], nn.Module] | None] = {
    "max": lambda kernel, stride, p: nn.MaxPool2d(kernel, stride),
    "avg": lambda kernel, stride, p: nn.AvgPool2d(kernel, stride),
    "lp": LPPool,
    "gem": lambda kernel, stride, p: GeMPool(kernel, stride),
    "mixed": lambda kernel, stride, p: MixedPool(kernel, stride),
    "stride": None,  # the stage's last convolution downsamples instead
    "none": None,  # no downsampling at all
}


def make_pooling(name: str, kernel: int, stride: int, p: float = 2.0) -> nn.Module | None:
    check_choice("pooling", name, POOLINGS)
    factory = POOLINGS[name]
    return factory(kernel, stride, p) if factory else None
