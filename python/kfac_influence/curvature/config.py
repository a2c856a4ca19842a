"""CurvatureConfig: how the (E)K-FAC approximation of the GGN is fitted (damping is a scoring choice: damping.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch

METHODS = ("ekfac", "kfac")
APPROXES = ("expand", "reduce")
FISHERS = ("mc", "empirical", "type2")
LEGACY_DAMPING_KEYS = ("damping", "damping_mode")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class CurvatureConfig:
    """Settings of a curvature fit (design.md section 2 defines every quantity).

    method: "ekfac" (eigenvalue-corrected) or "kfac". approx: "expand" or "reduce" (K-FAC for weight sharing).
    fisher: "mc" (one MC sample per draw; the paper's GGN^model), "empirical" (true loss gradient) or "type2"
        (exact, D backward passes per draw; small models and tests).
    num_draws: (t, eps) draws per training example for fitting (None: the task's train default).
    dtype: dtype of the stored factors and of preconditioning (sums are accumulated and eigendecomposed in float64).
    modules / exclude: fnmatch patterns of layer names to track (None: every Linear and Conv2d).
    seed: seeds the curvature draws (t, eps, MC vectors).
    precision: "float32" (the model's dtype throughout), "bfloat16" or "float16": the streamed operands of the fit
        (layer inputs, output gradients, the eigenbases they are rotated by) are rounded to it before each op;
        products accumulate in float32 (Triton kernels; the torch path computes in float32 after rounding) into
        float64 sums, and eigendecompositions run in float64. ``pairwise_scores(precision=)`` does the same for
        scoring.
    """
    method: str = "ekfac"
    approx: str = "expand"
    fisher: str = "mc"
    num_draws: Optional[int] = None
    dtype: torch.dtype = torch.float32
    modules: Optional[Tuple[str, ...]] = None
    exclude: Tuple[str, ...] = ()
    seed: int = 0
    precision: str = "float32"

    def __post_init__(self):
        for field, value, allowed in (("method", self.method, METHODS), ("approx", self.approx, APPROXES),
                                      ("fisher", self.fisher, FISHERS), ("precision", self.precision,
                                                                         tuple(PRECISIONS))):
            if value not in allowed:
                raise ValueError(f"CurvatureConfig.{field} must be one of {allowed}, got {value!r}")
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ValueError(f"CurvatureConfig.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        if self.dtype not in DTYPES.values():
            raise ValueError(f"CurvatureConfig.dtype must be float32 or float64, got {self.dtype}")
        if self.num_draws is not None and int(self.num_draws) < 1:
            raise ValueError(f"CurvatureConfig.num_draws must be >= 1, got {self.num_draws}")
        if isinstance(self.modules, str) or isinstance(self.exclude, str):
            raise TypeError("modules / exclude take a sequence of patterns, not a single string")
        if self.modules is not None:
            object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def streamed_dtype(self) -> Optional[torch.dtype]:
        """The dtype operands are rounded to before each op, or None (float32: kept in the model's dtype)."""
        return None if self.precision == "float32" else PRECISIONS[self.precision]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["modules"] = list(self.modules) if self.modules is not None else None
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CurvatureConfig":
        """Inverse of ``to_dict``. Damping keys of files written before damping moved to scoring are ignored
        here (``load_curvature`` keeps them as the curvature's default damping)."""
        d = {k: v for k, v in d.items() if k not in LEGACY_DAMPING_KEYS}
        d["modules"] = tuple(d["modules"]) if d.get("modules") is not None else None
        d["exclude"] = tuple(d.get("exclude", ()))
        return cls(**d)
