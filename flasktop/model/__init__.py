"""The pure model: events and a clock in, an immutable Snapshot out. No I/O, no threads."""

from flasktop.model.config import ModelConfig
from flasktop.model.model import Model
from flasktop.model.sketch import Sketch

__all__ = ["Model", "ModelConfig", "Sketch"]
