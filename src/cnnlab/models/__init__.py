"""Plain ``nn.Module`` models: no Lightning, Hydra or MLflow in here."""

from cnnlab.models.backbones import BACKBONES, InputSpec, Net, build_model
from cnnlab.models.shapes import ShapeError, Window

__all__ = ["BACKBONES", "InputSpec", "Net", "ShapeError", "Window", "build_model"]
