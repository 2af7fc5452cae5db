"""Per-layer table (output shape, parameters), totals and FLOPs of a model.

The table comes from torchinfo; FLOPs from PyTorch's own ``FlopCounterMode`` (2 per
multiply-accumulate of convolutions and matrix products; pooling and activations are not
counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchinfo
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.models.backbones import InputSpec


@dataclass(frozen=True)
class ModelReport:
    table: str  # torchinfo's per-layer table, as printed
    params_total: int
    params_trainable: int
    flops: int  # of one forward pass over one image


def describe(net: nn.Module, data: InputSpec) -> ModelReport:
    """Summarize ``net`` on one image of ``data``'s shape (in eval mode, on the CPU)."""
    image = torch.zeros(1, data.channels, data.size, data.size)
    was_training = net.training
    net.eval()
    try:
        stats = torchinfo.summary(
            net,
            input_data=image,
            device="cpu",
            verbose=0,
            col_names=("output_size", "num_params"),
            row_settings=("var_names",),
            depth=4,
        )
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(image)
    finally:
        net.train(was_training)
    return ModelReport(
        str(stats), stats.total_params, stats.trainable_params, counter.get_total_flops()
    )
