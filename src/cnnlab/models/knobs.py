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
    # Batchnorm's running-statistics momentum (PyTorch's convention: the weight of the new
    # batch; airbench's 0.6 is 0.4 here), its eps, and whether its scale is trained (false:
    # frozen at 1, only its shift learns, as in airbench).
    norm_momentum: float = 0.1
    norm_eps: float = 1e-5
    norm_weight: bool = True
    conv_bias: bool = True  # airbench: none, the batchnorm after each conv has a shift
    init: str = "default"  # of the stages' convs: default (PyTorch's) | dirac (identity)
    # A frozen first layer whose k x k filters whiten the image patches, fitted to the first
    # whiten_images training images when training starts (0: none; airbench: 2). Its bias
    # trains for the first whiten_bias_epochs epochs only (cnnlab.training.whitening).
    whiten: int = 0
    whiten_eps: float = 5e-4  # added to each eigenvalue before its inverse square root
    whiten_images: int = 5000
    whiten_bias_epochs: int = 3
    pool_first: bool = False  # pool after a stage's first conv (airbench), not after its last
    pooling: str = "max"
    pooling_kernel: int = 2
    pooling_stride: int | None = None  # None: equal to pooling_kernel
    pooling_p: float = 2.0  # power of LP pooling
    head: str = "fc"
    head_bias: bool = True  # of the head's last linear layer (airbench: none)
    head_scale: float = 1.0  # multiplies the logits (airbench: 1/9)
    fc_hidden: list[int] = field(default_factory=lambda: [120, 84])
    dropout: float = 0.0  # in the head, before each linear layer
    dropout2d: float = 0.0  # spatial dropout after each stage
    # PyTorch floors non-integer output sizes; cnnlab refuses them unless this is false.
    strict_shapes: bool = True

    def __post_init__(self) -> None:
        check_range("model.dropout", self.dropout, low=0, high=1)
        check_range("model.dropout2d", self.dropout2d, low=0, high=1)
        check_range("model.pooling_p", self.pooling_p, low=1)
        check_range("model.norm_momentum", self.norm_momentum, low=0, high=1, high_open=False)
        check_range("model.norm_eps", self.norm_eps, low=0, low_open=True)
        check_range("model.whiten", self.whiten, low=0)
        check_range("model.whiten_eps", self.whiten_eps, low=0, low_open=True)
        check_range("model.whiten_images", self.whiten_images, low=1)
        check_range("model.whiten_bias_epochs", self.whiten_bias_epochs, low=0)
        check_range("model.head_scale", self.head_scale, low=0, low_open=True)
        if self.residual and self.pool_first:
            raise ConfigError(
                "model.residual=true with model.pool_first=true: a skip connection cannot "
                "go around a stage pooled inside; valid: one of them"
            )
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
