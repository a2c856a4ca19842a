"""Damping: the lambda of (G_hat + lambda I)^-1, chosen when preconditioning, not when fitting.

``Damping(value, "absolute")``: lambda = value for every layer (the paper's default 1e-8).
``Damping(value, "relative")``: lambda = value * mean(Lambda) per layer (Lambda the layer's (corrected) eigenvalues).
One fit serves any number of dampings: scoring functions take ``damping=`` / ``damping_mode=``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

DAMPING_MODES = ("absolute", "relative")


@dataclass(frozen=True)
class Damping:
    """``value`` (lambda, or rho for relative mode) and ``mode`` ("absolute" | "relative")."""

    value: float = 1e-8
    mode: str = "absolute"

    def __post_init__(self):
        if self.mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {self.mode!r}")
        value = float(self.value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"damping must be finite and >= 0, got {self.value}")
        object.__setattr__(self, "value", value)

    def for_layer(self, eigenvalues: torch.Tensor) -> float:
        """Absolute lambda for a layer with (corrected) eigenvalues ``eigenvalues: (d_out, d_in')``."""
        if self.mode == "relative":
            return float(self.value * eigenvalues.double().mean())
        return self.value

    def with_overrides(self, value: Optional[float] = None, mode: Optional[str] = None) -> "Damping":
        """This damping with the given value and / or mode replaced (None keeps the field)."""
        return Damping(self.value if value is None else value, self.mode if mode is None else mode)

    def to_dict(self) -> dict:
        return {"damping": self.value, "damping_mode": self.mode}
