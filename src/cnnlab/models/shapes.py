"""Output-size arithmetic of convolution and pooling layers: O = (W + 2P - F) / S + 1.

PyTorch floors a non-integer O without a word, silently dropping border pixels; cnnlab
refuses it (``strict=True``) so that an ablation never compares a model that ignores part
of its input. A size that is not positive is always an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnlab.checks import ConfigError


class ShapeError(ConfigError):
    """A layer's output size is not a positive integer."""


@dataclass(frozen=True)
class Window:
    """A sliding window: kernel F, stride S and padding P (square, in pixels)."""

    kernel: int
    stride: int = 1
    padding: int = 0

    def out_size(self, size: int, *, layer: str = "layer", strict: bool = True) -> int:
        """Spatial output size for an input of ``size`` pixels.

        Raises:
            ShapeError: the size is <= 0, or not exact while ``strict``.
        """
        span = size + 2 * self.padding - self.kernel
        out = span // self.stride + 1
        detail = (
            f"{layer}: input {size}, F={self.kernel}, P={self.padding}, "
            f"S={self.stride} gives O = ({size} + 2*{self.padding} - {self.kernel})"
            f" / {self.stride} + 1 = {span / self.stride + 1:g}"
        )
        if span < 0 or out <= 0:
            raise ShapeError(
                f"{detail}, not a positive size; use fewer downsampling "
                "layers, more padding or a larger input"
            )
        if strict and span % self.stride:
            raise ShapeError(
                f"{detail}, not an integer; change F, P or S, or set "
                "model.strict_shapes=false to let PyTorch floor it"
            )
        return out
