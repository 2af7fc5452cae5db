"""The trained net as a model to serve: what ``logger.log_model`` hands MLflow.

A served model is given images, not cnnlab's normalized batches: :class:`Servable` takes
pixel values (float32, 0-255, ``(B, C, H, W)``) and normalizes them inside, with the
dataset's mean and std as buffers, so that ``mlflow.pytorch.load_model`` of the exported
graph needs neither cnnlab nor the dataset's constants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnlab.data import ImageDataModule
from cnnlab.training import compat

EXAMPLE_IMAGES = 2  # > 1, so torch.export keeps the batch dimension dynamic


class Servable(nn.Module):
    """``net`` behind its input normalization: pixel values in, class logits out."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        self.register_buffer("scale", 1 / (255 * std_t))
        self.register_buffer("shift", -torch.tensor(mean).view(1, -1, 1, 1) / std_t)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * self.scale + self.shift)  # (B, classes)


def servable(net: nn.Module, datamodule: ImageDataModule) -> tuple[Servable, Tensor]:
    """A CPU copy of ``net`` ready to serve, in eval mode, and an input example: the first
    test images as float32 pixel values."""
    info = datamodule.info
    if compat.is_compiled(net):  # perf.compile: torch.export traces the plain forward
        compat.drop_compiled(net)
    model = Servable(net, info.mean, info.std).cpu().eval()
    model.net.to(memory_format=torch.contiguous_format)  # as a user's batch arrives
    example = datamodule.test_set.images[:EXAMPLE_IMAGES].float()
    return model, example
