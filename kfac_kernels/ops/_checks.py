"""Argument validation shared by the ops: clear messages instead of shape errors deep in a matmul."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {tuple(dtypes)}")


def check_out(out: Optional[torch.Tensor], shape: tuple, device: torch.device) -> None:
    if out is None:
        return
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, inputs on {device}")


def accumulate(out: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """``out += value`` (in out's dtype) or return value when out is None."""
    if out is None:
        return value
    out.add_(value.to(out.dtype))
    return out


def acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
