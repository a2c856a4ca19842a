"""Per-example weight gradients ``sum_r g_r [a_r, 1]^T``: the tensor the fused kernels never materialise.

Used by tests as the slow reference and by the torch path in chunks.
"""
from __future__ import annotations

import torch

from ._checks import check_tensor


def check_ag(a: torch.Tensor, g: torch.Tensor) -> None:
    """a: (B, R, D_in), g: (B, R, D_out) with matching B and R."""
    check_tensor("a", a, 3)
    check_tensor("g", g, 3)
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a {tuple(a.shape)} and g {tuple(g.shape)} must agree in (batch, positions)")
    if a.device != g.device:
        raise ValueError(f"a is on {a.device} but g on {g.device}")


def per_example_gradients(a: torch.Tensor, g: torch.Tensor, *, append_one: bool = False) -> torch.Tensor:
    """``a: (B, R, D_in)``, ``g: (B, R, D_out)`` -> ``(B, D_out, D_in + append_one)``."""
    check_ag(a, g)
    grads = torch.einsum("bro,bri->boi", g, a)
    if append_one:
        grads = torch.cat([grads, g.sum(dim=1).unsqueeze(-1)], dim=-1)
    return grads


def rotate_inputs(a: torch.Tensor, q_a: torch.Tensor, append_one: bool) -> torch.Tensor:
    """``[a, 1] @ q_a`` without concatenating the ones column. a: (..., D_in), q_a: (D_in', D_in')."""
    d_in = a.shape[-1]
    if q_a.shape != (d_in + int(append_one),) * 2:
        raise ValueError(f"q_a has shape {tuple(q_a.shape)}, expected {(d_in + int(append_one),) * 2}")
    if append_one:
        return a @ q_a[:d_in] + q_a[d_in]
    return a @ q_a


def chunk_size_for(b: int, bytes_per_example: int, budget_bytes: int = 256 << 20) -> int:
    """How many examples fit in ``budget_bytes`` of per-example scratch (at least 1)."""
    return max(1, min(b, budget_bytes // max(1, bytes_per_example)))
