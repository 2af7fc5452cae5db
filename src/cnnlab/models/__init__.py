"""Plain ``nn.Module`` models: no Lightning, Hydra or MLflow in here."""

from cnnlab.models.backbones import PRESETS, InputSpec, Net, build_model, preset
from cnnlab.models.knobs import ModelConfig
from cnnlab.models.shapes import ShapeError, Window

__all__ = [
    "PRESETS",
    "InputSpec",
    "ModelConfig",
    "Net",
    "ShapeError",
    "Window",
    "build_model",
    "preset",
]
