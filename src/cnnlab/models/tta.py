"""Test-time augmentation: a prediction averaged over views of each image (airbench's
``tta_level`` 0, 1 and 2), on the normalized batch."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

Predict = Callable[[nn.Module, Tensor], Tensor]


def plain(net: nn.Module, images: Tensor) -> Tensor:
    return net(images)


def flip(net: nn.Module, images: Tensor) -> Tensor:
    """The logits of the image and of its mirror image, averaged."""
    return 0.5 * net(images) + 0.5 * net(images.flip(-1))


def flip_translate(net: nn.Module, images: Tensor) -> Tensor:
    """:func:`flip`, weighted 1/2, and :func:`flip` of the image moved 1 px up-left and 1 px
    down-right (reflect-padded), 1/4 each: six views, weights 1/4, 1/4 and 1/8 x 4."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
    up_left = padded[..., :height, :width]
    down_right = padded[..., 2:, 2:]
    moved = 0.5 * flip(net, up_left) + 0.5 * flip(net, down_right)
    return 0.5 * flip(net, images) + 0.5 * moved


TTA: dict[str, Predict] = {"none": plain, "flip": flip, "flip_translate": flip_translate}
