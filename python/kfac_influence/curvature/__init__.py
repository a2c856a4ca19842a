"""Curvature fitting (K-FAC, EK-FAC; expand, reduce), eigendecomposition and storage."""
from .config import CurvatureConfig
from .curvature import Curvature, load_curvature
from .damping import Damping
from .fit import fit_curvature

__all__ = ["CurvatureConfig", "Curvature", "Damping", "fit_curvature", "load_curvature"]
