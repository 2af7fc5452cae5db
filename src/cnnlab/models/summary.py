"""Per-layer table (output shape, parameters), totals and FLOPs of a model.

The table comes from torchinfo; FLOPs from PyTorch's own ``FlopCounterMode`` (2 per
multiply-accumulate of convolutions and matrix products; pooling, activations, normalization
and bias additions are not counted). Both are measured on a batch of one image, so every
count is per image. torchinfo's own mult-add line gives way to this count, in words: it
reads ``Total mult-adds (Units.MEGABYTES): 0.29`` (its unit enum formats as its name since
Python 3.11) and counts bias additions too, so it would disagree with the FLOPs line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torchinfo
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.models.backbones import InputSpec

# The line torchinfo prints its mult-add total on, whatever the unit it picked.
TORCHINFO_MULT_ADDS = re.compile(r"^Total mult-adds.*$", re.MULTILINE)
SI_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


@dataclass(frozen=True)
class ModelReport:
    table: str  # torchinfo's per-layer table, with cnnlab's mult-add line
    params_total: int
    params_trainable: int
    flops: int  # of one forward pass over one image

    @property
    def mult_adds(self) -> int:
        """Multiply-accumulates of one forward pass over one image (FlopCounterMode counts 2
        FLOPs for each)."""
        return self.flops // 2

    def cost_lines(self) -> list[str]:
        """The model's cost per image, as a person reads it."""
        return [
            f"Mult-adds per image: {in_words(self.mult_adds)} (convolutions and matrix products)",
            f"FLOPs per image: {in_words(self.flops)} (2 per mult-add)",
        ]


def in_words(count: float) -> str:
    """``24_580_000`` -> ``"24.6 M"``: an SI prefix and one decimal."""
    for scale, prefix in SI_PREFIXES:
        if abs(count) >= scale:
            return f"{count / scale:.1f} {prefix}"
    return f"{count:,.0f}"


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
    report = ModelReport("", stats.total_params, stats.trainable_params, counter.get_total_flops())
    table = TORCHINFO_MULT_ADDS.sub("\n".join(report.cost_lines()), str(stats), count=1)
    return dataclasses.replace(report, table=table)
