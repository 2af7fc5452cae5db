"""Backbones as data: a preset is a plan function and a dict of knobs; one builder turns the
plan into modules, checking every layer's output size on the way."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cnnlab.checks import ConfigError, lookup
from cnnlab.models.heads import make_head
from cnnlab.models.knobs import ModelConfig
from cnnlab.models.layers import initialize, make_activation, make_conv, make_norm
from cnnlab.models.pooling import POOLINGS, make_pooling
from cnnlab.models.shapes import Window
from cnnlab.models.whitening import PatchWhitening


@dataclass(frozen=True)
class InputSpec:
    """What the data gives the model: image channels, side length, number of classes."""

    channels: int
    size: int
    classes: int

    @classmethod
    def of(cls, dataset: Any) -> InputSpec:
        """What ``dataset`` gives: anything with ``channels``, ``size`` and ``classes`` (a
        :class:`cnnlab.data.DatasetInfo`; models do not import the data package)."""
        return cls(dataset.channels, dataset.size, dataset.classes)


@dataclass(frozen=True)
class Stage:
    """Convolutions to ``widths[i]`` maps each (conv -> norm -> act), then a pooling."""

    widths: tuple[int, ...]
    conv: Window
    pool: bool = True


def stage_plan(knobs: ModelConfig) -> list[Stage]:
    """One stage per entry of ``channels``, ``convs_per_stage`` convs each, each pooled."""
    window = Window(knobs.kernel_size, knobs.stride, knobs.padding)
    return [Stage((width,) * knobs.convs_per_stage, window) for width in knobs.channels]


def alexnet_plan(knobs: ModelConfig) -> list[Stage]:
    """AlexNet's five convs in three stages, pooled after the first two (see PRESETS)."""
    if len(knobs.channels) != 5:
        raise ConfigError(
            f"model.channels={knobs.channels} for alexnet_small; valid: five "
            "conv widths, e.g. [64, 192, 384, 256, 256]"
        )
    window = Window(knobs.kernel_size, knobs.stride, knobs.padding)
    widths = knobs.channels
    return [
        Stage((widths[0],), window),
        Stage((widths[1],), window),
        Stage(tuple(widths[2:]), window, pool=False),
    ]


@dataclass(frozen=True)
class Preset:
    plan: Callable[[ModelConfig], list[Stage]]
    knobs: dict


PRESETS: dict[str, Preset] = {
    # LeCun et al. (1998): conv 5x5 -> 6, pool, conv 5x5 -> 16, pool, FC 120 -> 84 -> classes.
    # cnnlab adds batchnorm after each conv and dropout 0.2 in the head (>= 98% on the
    # bundled digits); the 1998 layout is batchnorm=False, dropout=0.
    "lenet5": Preset(
        stage_plan,
        dict(
            channels=[6, 16],
            kernel_size=5,
            padding=0,
            batchnorm=True,
            dropout=0.2,
            fc_hidden=[120, 84],
        ),
    ),
    # AlexNet (Krizhevsky et al., 2012) for 28-32 px: its five convs (64, 192, 384, 256, 256)
    # and three FC layers, scaled down. The 11x11 stride-4 stem becomes 3x3 stride 1 (the
    # input is 7x smaller); every conv is 3x3 "same"; max-pooling follows conv 1 and conv 2
    # (AlexNet's third pool would leave 3.5 px at 28 px); FC 4096 -> 4096 becomes 512 -> 256,
    # with AlexNet's dropout 0.5.
    "alexnet_small": Preset(
        alexnet_plan,
        dict(
            channels=[64, 192, 384, 256, 256],
            kernel_size=3,
            padding=1,
            dropout=0.5,
            fc_hidden=[512, 256],
        ),
    ),
    # A stage-by-stage CNN on which every knob applies: two 3x3 convs per stage, batchnorm.
    "cnn": Preset(
        stage_plan,
        dict(
            channels=[32, 64],
            kernel_size=3,
            padding=1,
            convs_per_stage=2,
            batchnorm=True,
            head="gap",
            fc_hidden=[128],
        ),
    ),
    # airbench94's net (Keller Jordan, cifar10-airbench, legacy/airbench94.py), for
    # `experiment=speedrun`: a frozen 2x2 patch-whitening layer (24 maps), then three stages
    # of conv -> pool -> batchnorm -> GELU -> conv -> batchnorm -> GELU, widths 64-256-256,
    # convs without bias and initialized as identities, batchnorm with a frozen scale,
    # momentum 0.4 and eps 1e-12; global max-pooling, a linear layer without bias, logits x 1/9.
    # The 31 px after the whitening are floored by each pooling (31 -> 15 -> 7 -> 3), as there.
    "speedrun": Preset(
        stage_plan,
        dict(
            channels=[64, 256, 256],
            kernel_size=3,
            padding=1,
            convs_per_stage=2,
            batchnorm=True,
            norm_momentum=0.4,
            norm_eps=1e-12,
            norm_weight=False,
            conv_bias=False,
            init="dirac",
            whiten=2,
            pool_first=True,
            activation="gelu",
            head="max",
            head_bias=False,
            head_scale=1 / 9,
            fc_hidden=[],
            strict_shapes=False,
        ),
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The knobs of preset ``name`` with ``overrides`` applied."""
    knobs = lookup("backbone", name, PRESETS).knobs
    return ModelConfig(name=name, **knobs | overrides)


class ConvStage(nn.Module):
    """Convs, an optional skip connection around them, pooling, spatial dropout."""

    def __init__(
        self,
        body: nn.Sequential,
        shortcut: nn.Module | None,
        act: nn.Module,
        pool: nn.Module,
        dropout: nn.Module,
    ) -> None:
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut, act
        self.pool, self.dropout = pool, dropout

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)  # conv -> norm (-> act -> conv -> norm ...)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        y = self.act(y)
        y = self.pool(y)
        return self.dropout(y)


class Net(nn.Module):
    """A backbone of stages and a head; ``layer_sizes`` lists each layer's output side."""

    def __init__(
        self, backbone: nn.Sequential, head: nn.Module, layer_sizes: list[tuple[str, int]]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.layer_sizes = layer_sizes

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)  # (B, C, H, W)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)  # (B, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(model: ModelConfig | str, data: InputSpec, **overrides) -> Net:
    """Build ``model`` (knobs, or a preset name plus ``overrides``) for ``data``'s input.

    Every size is checked before a tensor is made.

    Raises:
        ValueError: an unknown backbone, pooling, activation, conv or head name, or knobs
            that cannot go together (ConfigError).
        ShapeError: a layer's output size is not a positive integer.
    """
    knobs = preset(model, **overrides) if isinstance(model, str) else model
    stages = lookup("backbone", knobs.name, PRESETS).plan(knobs)
    builder = _StageBuilder(knobs, data.channels, data.size)
    layers = OrderedDict([("stem", builder.stem())] if knobs.whiten else [])
    for s, stage in enumerate(stages, start=1):
        layers[f"stage{s}"] = builder.stage(s, stage)
        initialize(layers[f"stage{s}"], knobs.init)
    backbone = nn.Sequential(layers)
    head = make_head(
        knobs.head,
        builder.channels,
        builder.size,
        data.classes,
        hidden=knobs.fc_hidden,
        dropout=knobs.dropout,
        activation=knobs.activation,
        bias=knobs.head_bias,
        scale=knobs.head_scale,
    )
    return Net(backbone, head, builder.sizes)


class _StageBuilder:
    """Tracks channels and side length from stage to stage while building them."""

    def __init__(self, knobs: ModelConfig, channels: int, size: int) -> None:
        self.knobs, self.channels, self.size = knobs, channels, size
        self.sizes: list[tuple[str, int]] = []
        lookup("pooling", knobs.pooling, POOLINGS)

    def _out(self, layer: str, window: Window) -> int:
        self.size = window.out_size(self.size, layer=layer, strict=self.knobs.strict_shapes)
        self.sizes.append((layer, self.size))
        return self.size

    def stem(self) -> nn.Sequential:
        """The frozen patch-whitening layer and its activation (``model.whiten``)."""
        knobs = self.knobs
        whiten = PatchWhitening(self.channels, knobs.whiten, knobs.whiten_eps)
        self._out("stem.whiten", Window(knobs.whiten))
        self.channels = whiten.conv.out_channels
        return nn.Sequential(OrderedDict(whiten=whiten, act=make_activation(knobs.activation)))

    def stage(self, index: int, stage: Stage) -> ConvStage:
        knobs = self.knobs
        channels_in, size_in, stride = self.channels, self.size, 1
        # The conv the stage's pooling follows (pool_first: the first, as airbench), or that
        # downsamples itself (pooling=stride).
        pooled = 1 if knobs.pool_first else len(stage.widths)
        body: OrderedDict[str, nn.Module] = OrderedDict()
        for c, width in enumerate(stage.widths, start=1):
            window = stage.conv
            if knobs.pooling == "stride" and stage.pool and c == pooled:
                window = dataclasses.replace(window, stride=knobs.pool_stride)
            self._out(f"stage{index}.conv{c}", window)
            stride *= window.stride
            # The first conv of the net stays standard, as in MobileNet and ResNeXt: 1 or 3
            # input channels leave nothing to group or to separate.
            kind = "standard" if (index, c) == (1, 1) else knobs.conv
            body[f"conv{c}"] = make_conv(
                kind, self.channels, width, window, knobs.groups, knobs.conv_bias
            )
            if knobs.pool_first and c == pooled and stage.pool:
                body["pool"] = self._pooling(index) or nn.Identity()
            if knobs.batchnorm:
                body[f"norm{c}"] = self._norm(width)
            if c < len(stage.widths):
                body[f"act{c}"] = make_activation(knobs.activation)
            self.channels = width
        shortcut = self._shortcut(index, channels_in, size_in, stride) if knobs.residual else None
        pool = self._pooling(index) if stage.pool and not knobs.pool_first else None
        dropout = nn.Dropout2d(knobs.dropout2d) if knobs.dropout2d > 0 else nn.Identity()
        return ConvStage(
            nn.Sequential(body),
            shortcut,
            make_activation(knobs.activation),
            pool or nn.Identity(),
            dropout,
        )

    def _pooling(self, index: int) -> nn.Module | None:
        knobs = self.knobs
        pool = make_pooling(knobs.pooling, knobs.pooling_kernel, knobs.pool_stride, knobs.pooling_p)
        if pool is not None:
            self._out(f"stage{index}.pool", Window(knobs.pooling_kernel, knobs.pool_stride))
        return pool

    def _norm(self, channels: int) -> nn.BatchNorm2d:
        knobs = self.knobs
        return make_norm(channels, knobs.norm_momentum, knobs.norm_eps, knobs.norm_weight)

    def _shortcut(self, index: int, channels_in: int, size_in: int, stride: int) -> nn.Module:
        """Identity, or a strided 1x1 projection (with batchnorm) when the shape changes."""
        if Window(1, stride).out_size(size_in, strict=False) != self.size:
            raise ConfigError(
                f"model.residual=true: stage{index} maps {size_in} px to {self.size} px, which "
                "no skip connection can match; use padding=(kernel_size-1)/2"
            )
        if stride == 1 and channels_in == self.channels:
            return nn.Identity()
        projection = [nn.Conv2d(channels_in, self.channels, 1, stride, bias=self.knobs.conv_bias)]
        if self.knobs.batchnorm:
            projection.append(self._norm(self.channels))
        return nn.Sequential(*projection)
