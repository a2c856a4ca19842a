"""Helpers for the kernel tests: inputs, float64 references, torch compositions in a low dtype, and
flash-attention's acceptance rule (kernel error <= 2x the same-dtype torch error + atol)."""
from __future__ import annotations

import pytest
import torch

from kfac_kernels.ops._triton import HAS_TRITON
from kfac_kernels.ops.im2col import unfold_conv_input

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]  # no bf16: the interpreter computes in numpy, which has none
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(x).all(), "non-finite output"
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_flash_rule(out: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor,
                      dtype: torch.dtype) -> None:
    err, base = rel_err(out, ref64), rel_err(torch_same_dtype, ref64)
    assert err <= 2 * base + ATOL[dtype], f"kernel error {err:.3e} > 2 x torch {dtype} error {base:.3e} + atol"


def randn(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    """Standard normal in ``dtype`` on the test device (rounded to dtype once: the float64 reference sees the
    same values)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def orthogonal(n: int, dtype=torch.float32, gen=None) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.to(dtype).to(DEVICE)


def with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)


# --- torch compositions that keep every intermediate in the input dtype ------------------------------------------
def lowp_linear_covariance(a, append_one):
    x = with_one(a) if append_one else a
    return x.T @ x


def lowp_conv_covariance(x, reduce, append_one, **conv):
    p = unfold_conv_input(x, **conv)
    rows = p.mean(dim=1) if reduce else p.reshape(-1, p.shape[-1])
    return lowp_linear_covariance(rows, append_one)


def lowp_rotated(a, g, q_a, q_g, append_one):
    a = with_one(a) if append_one else a
    return torch.einsum("bro,bri->boi", g @ q_g, a @ q_a)


def lowp_eigenvalue_correction(a, g, q_a, q_g, append_one):
    return (lowp_rotated(a, g, q_a, q_g, append_one) ** 2).sum(0)


def lowp_self_scores(a, g, q_a, q_g, lam, damping, append_one):
    z = lowp_rotated(a, g, q_a, q_g, append_one)
    return (z ** 2 / (lam + damping)).sum(dim=(1, 2))


def lowp_precondition(v, q_a, q_g, lam, damping):
    return q_g @ ((q_g.T @ v @ q_a) / (lam + damping)) @ q_a.T


def lowp_pairwise(a, g, p, append_one):
    grads = torch.einsum("bro,bri->boi", g, with_one(a) if append_one else a)
    return p.reshape(p.shape[0], -1) @ grads.reshape(grads.shape[0], -1).T


def lowp_lowrank(a, g, left, right, append_one):
    """Low-rank scores ``(Q, B)`` from the two projections, every intermediate in the operands' dtype."""
    nq, _, k = left.shape
    gp = g @ left.permute(1, 0, 2).reshape(left.shape[1], -1)  # (B, R, Q k)
    ap = (with_one(a) if append_one else a) @ right.permute(1, 0, 2).reshape(right.shape[1], -1)
    return (gp * ap).sum(dim=1).reshape(-1, nq, k).sum(dim=-1).T
