"""Curvature fitting (K-FAC, EK-FAC; expand, reduce), eigendecomposition and storage."""
from .config import CurvatureConfig
from .curvature import Curvature, load_curvature
from .fit import fit_curvature

__all__ = ["CurvatureConfig", "Curvature", "fit_curvature", "load_curvature"]
