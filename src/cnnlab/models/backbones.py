"""Backbones as data: each preset turns the model knobs into a list of stages, and one
builder turns stages into modules, checking every layer's output size on the way."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from cnnlab.models.heads import make_head
from cnnlab.models.layers import make_activation, make_pooling
from cnnlab.models.shapes import Window


@dataclass(frozen=True)
class InputSpec:
    """What the data gives the model: image channels, side length, number of classes."""

    channels: int
    size: int
    classes: int


@dataclass(frozen=True)
class Stage:
    """``convs`` convolutions to ``channels`` maps (conv -> norm -> act), then a pooling."""

    channels: int
    conv: Window
    convs: int = 1
    pool: bool = True


@dataclass(frozen=True)
class Knobs:
    """The ablation knobs every preset understands (see conf/model/*.yaml)."""

    channels: Sequence[int] = (6, 16)
    kernel_size: int = 5
    stride: int = 1
    padding: int = 0
    convs_per_stage: int = 1
    activation: str = "relu"
    batchnorm: bool = False
    pooling: str = "max"
    pooling_kernel: int = 2
    pooling_stride: int | None = None
    pooling_p: float = 2.0
    head: str = "fc"
    fc_hidden: Sequence[int] = (120, 84)
    dropout: float = 0.0
    strict_shapes: bool = True

    @property
    def pool_window(self) -> Window:
        return Window(self.pooling_kernel, self.pooling_stride or self.pooling_kernel)


def stage_plan(knobs: Knobs) -> list[Stage]:
    """One stage per entry of ``channels``, each the same conv window, each pooled."""
    window = Window(knobs.kernel_size, knobs.stride, knobs.padding)
    return [Stage(width, window, knobs.convs_per_stage) for width in knobs.channels]


# Presets: name -> plan. LeNet-5 is the classic layout given by conf/model/lenet5.yaml.
BACKBONES: dict[str, Callable[[Knobs], list[Stage]]] = {
    "lenet5": stage_plan,
}


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


def build_model(name: str, data: InputSpec, **knobs) -> Net:
    """Build the preset ``name`` for ``data``'s input; raises before any tensor is made.

    Raises:
        ValueError: an unknown backbone, pooling, activation or head name.
        ShapeError: a layer's output size is not a positive integer.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}")
    options = Knobs(**knobs)
    stages = BACKBONES[name](options)
    backbone, channels, size, sizes = _build_stages(stages, data, options)
    head = make_head(
        options.head,
        channels,
        size,
        data.classes,
        hidden=options.fc_hidden,
        dropout=options.dropout,
        activation=options.activation,
    )
    return Net(backbone, head, sizes)


def _build_stages(stages: list[Stage], data: InputSpec, knobs: Knobs):
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    channels, size, sizes = data.channels, data.size, []
    for s, stage in enumerate(stages, start=1):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for c in range(1, stage.convs + 1):
            name = f"stage{s}.conv{c}"
            size = stage.conv.out_size(size, layer=name, strict=knobs.strict_shapes)
            sizes.append((name, size))
            layers[f"conv{c}"] = nn.Conv2d(
                channels, stage.channels, stage.conv.kernel, stage.conv.stride, stage.conv.padding
            )
            if knobs.batchnorm:
                layers[f"norm{c}"] = nn.BatchNorm2d(stage.channels)
            layers[f"act{c}"] = make_activation(knobs.activation)
            channels = stage.channels
        if stage.pool:
            name = f"stage{s}.pool"
            window = knobs.pool_window
            size = window.out_size(size, layer=name, strict=knobs.strict_shapes)
            sizes.append((name, size))
            layers["pool"] = make_pooling(knobs.pooling, window.kernel, window.stride)
        modules[f"stage{s}"] = nn.Sequential(layers)
    return nn.Sequential(modules), channels, size, sizes
