"""Per-layer table (output shape, parameters) and totals of a model, from torchinfo."""

from __future__ import annotations

from dataclasses import dataclass

import torchinfo
from torch import nn

from cnnlab.models.backbones import InputSpec


@dataclass(frozen=True)
class ModelReport:
    table: str  # torchinfo's per-layer table, as printed
    params_total: int
    params_trainable: int
    mult_adds: int  # multiply-accumulates per image


def describe(net: nn.Module, data: InputSpec) -> ModelReport:
    stats = torchinfo.summary(
        net,
        input_size=(1, data.channels, data.size, data.size),
        device="cpu",
        verbose=0,
        col_names=("output_size", "num_params"),
        row_settings=("var_names",),
        depth=4,
    )
    return ModelReport(
        str(stats), stats.total_params, stats.trainable_params, stats.total_mult_adds
    )
