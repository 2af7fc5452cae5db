"""Fitting the net's patch-whitening layer (``model.whiten``) when training starts, and
training its bias for the first epochs only, as airbench does."""

from __future__ import annotations

import lightning as L
import torch

from cnnlab.models.whitening import PatchWhitening


class WhiteningFit(L.Callback):
    """On a fit from scratch, fits every :class:`PatchWhitening` of the module to the first
    ``images`` training images, normalized as the net reads them (a resumed fit finds the
    fitted filters in its checkpoint); their bias trains in the first ``bias_epochs`` epochs
    and is frozen after them."""

    def __init__(self, images: int = 5000, bias_epochs: int = 3) -> None:
        self.images, self.bias_epochs = images, bias_epochs
        self.layers: list[PatchWhitening] = []  # found once, not on every step

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.layers = layers = whitening_layers(pl_module)
        if not layers or trainer.ckpt_path is not None:
            return
        datamodule = trainer.datamodule
        images = datamodule.train_set.images[: self.images].to(pl_module.device)
        images = datamodule.normalize(images)  # (N, C, H, W), float32
        for layer in layers:
            layer.fit(images)
            # The same images give every DDP rank the same filters up to rounding; rank 0's
            # are taken so that the ranks' frozen weights agree exactly.
            weight = trainer.strategy.broadcast(layer.conv.weight.detach().cpu())
            layer.conv.weight.data.copy_(weight)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        """After ``bias_epochs``, the bias's gradient is dropped before each step, so the
        optimizer leaves it be (airbench turns off its ``requires_grad``; under DDP that
        would break the gradient reduction, which expects every parameter it started with)."""
        if trainer.current_epoch >= self.bias_epochs:
            for layer in self.layers:
                layer.bias.grad = None


def whitening_layers(module: torch.nn.Module) -> list[PatchWhitening]:
    return [layer for layer in module.modules() if isinstance(layer, PatchWhitening)]
