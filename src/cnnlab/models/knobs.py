"""The knobs of every backbone, as one dataclass: Hydra's schema for ``model.*`` and the
builder's input. Ranges are checked on creation; names when the model is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from cnnlab.checks import ConfigError, check_range


@dataclass
class ModelConfig:
    name: str = "lenet5"
    channels: list[int] = field(default_factory=lambda: [6, 16])  # one stage per entry
    kernel_size: int = 5
    stride: int = 1
    padding: int = 0
    convs_per_stage: int = 1
    conv: str = "standard"  # standard | depthwise_separable | grouped
    groups: int = 1  # for conv=grouped
    residual: bool = False  # skip connection around each stage's convs
    activation: str = "relu"
    batchnorm: bool = False
    pooling: str = "max"
    pooling_kernel: int = 2
    pooling_stride: int | None = None  # None: equal to pooling_kernel
    pooling_p: float = 2.0  # power of LP pooling
    head: str = "fc"
    fc_hidden: list[int] = field(default_factory=lambda: [120, 84])
    dropout: float = 0.0  # in the head, before each linear layer
    dropout2d: float = 0.0  # spatial dropout after each stage
    # PyTorch floors non-integer output sizes; cnnlab refuses them unless this is false.
    strict_shapes: bool = True

    def __post_init__(self) -> None:
        check_range("model.dropout", self.dropout, low=0, high=1)
        check_range("model.dropout2d", self.dropout2d, low=0, high=1)
        check_range("model.pooling_p", self.pooling_p, low=1)
        for setting in ("kernel_size", "stride", "convs_per_stage", "groups", "pooling_kernel"):
            check_range(f"model.{setting}", getattr(self, setting), low=1)
        check_range("model.padding", self.padding, low=0)
        if self.pooling_stride is not None:
            check_range("model.pooling_stride", self.pooling_stride, low=1)
        if not self.channels:
            raise ConfigError("model.channels=[] is empty; give one channel count per stage")
        for i, width in enumerate(self.channels):
            check_range(f"model.channels[{i}]", width, low=1)
        for i, width in enumerate(self.fc_hidden):
            check_range(f"model.fc_hidden[{i}]", width, low=1)

    @property
    def pool_stride(self) -> int:
        return self.pooling_stride or self.pooling_kernel
