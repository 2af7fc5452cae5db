"""A first layer that whitens image patches: airbench's frozen 2x2 convolution.

Its filters are the eigenvectors of the (uncentered) covariance of the k x k patches of
training images, each divided by the square root of its eigenvalue (plus ``eps``), and the
same filters negated: 2 * C * k * k output maps whose + half has unit covariance on the
images it was fitted to. The weights are computed, never trained; the bias trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchWhitening(nn.Module):
    """``channels`` -> ``2 * channels * kernel**2`` maps, no padding; call :meth:`fit` with
    normalized training images before training."""

    def __init__(self, channels: int, kernel: int, eps: float = 5e-4) -> None:
        super().__init__()
        self.kernel, self.eps = kernel, eps
        self.conv = nn.Conv2d(channels, 2 * channels * kernel * kernel, kernel, bias=True)
        self.conv.weight.requires_grad_(False)

    @property
    def bias(self) -> Tensor:
        return self.conv.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    @torch.no_grad()
    def fit(self, images: Tensor) -> None:
        """Set the filters from ``images`` (N, C, H, W), as the model reads them."""
        eigenvalues, eigenvectors = patch_eigens(images.float(), self.kernel)
        filters = eigenvectors.T / torch.sqrt(eigenvalues + self.eps)[:, None]  # (D, D) rows
        # largest eigenvalue first, each row a (C, k, k) filter
        filters = filters.flip(0).reshape(-1, images.shape[1], self.kernel, self.kernel)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight))


def patch_eigens(images: Tensor, kernel: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the uncentered covariance of
    every ``kernel`` x ``kernel`` patch of ``images``, each patch flattened as (C, k, k)."""
    channels = images.shape[1]
    patches = images.unfold(2, kernel, 1).unfold(3, kernel, 1)  # (N, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * kernel * kernel)
    covariance = patches.T @ patches / len(patches)  # (D, D), D = C * k * k
    return torch.linalg.eigh(covariance)
