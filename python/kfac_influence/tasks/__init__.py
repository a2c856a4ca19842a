"""Tasks: what the engine needs from a model family (draws, outputs, losses, measurements, Fisher vectors)."""
from .base import FISHER_KINDS, MSETask, Draws, Task
from .conditioning import CONDITION_KINDS, Conditioning
from .diffusion import MEASUREMENTS, DiffusionTask
from .regression import RegressionTask

__all__ = ["Task", "MSETask", "Draws", "FISHER_KINDS", "DiffusionTask", "MEASUREMENTS", "RegressionTask",
           "Conditioning", "CONDITION_KINDS"]
