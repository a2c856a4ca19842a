"""Eigenbasis preconditioning of a batch of gradients:
``P(V) = Q_G [(Q_G^T V Q_A) / (Lambda + damping)] Q_A^T`` for ``V: (Q, D_out, D_in')``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..dispatch import register
from ._checks import acc_dtype, check_tensor


def check_precondition_args(grads, q_a, q_g, eigenvalues):
    check_tensor("grads", grads, 3)
    check_tensor("q_a", q_a, 2)
    check_tensor("q_g", q_g, 2)
    check_tensor("eigenvalues", eigenvalues, 2)
    _, d_out, d_in = grads.shape
    if q_g.shape != (d_out, d_out) or q_a.shape != (d_in, d_in) or eigenvalues.shape != (d_out, d_in):
        raise ValueError(
            f"grads {tuple(grads.shape)} need q_g ({d_out}, {d_out}), q_a ({d_in}, {d_in}) and eigenvalues "
            f"({d_out}, {d_in}); got {tuple(q_g.shape)}, {tuple(q_a.shape)}, {tuple(eigenvalues.shape)}")
    if eigenvalues.device.type != "meta" and float(eigenvalues.min()) < 0:  # meta: bench/compile_check.py
        raise ValueError("eigenvalues must be non-negative")


@register("precondition", "torch")
def precondition_reference(grads: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, eigenvalues: torch.Tensor,
                           damping: Union[float, torch.Tensor]) -> torch.Tensor:
    """``grads: (Q, D_out, D_in')`` -> preconditioned ``(Q, D_out, D_in')`` in the accumulation dtype."""
    check_precondition_args(grads, q_a, q_g, eigenvalues)
    dt = acc_dtype(grads, q_a, q_g, eigenvalues)
    qa, qg = q_a.to(dt), q_g.to(dt)
    rot = qg.T @ grads.to(dt) @ qa
    rot = rot / (eigenvalues.to(dt) + damping)
    return qg @ rot @ qa.T


# ---------------------------------------------------------------------------------------------------------------
# Triton: four launches of one batched GEMM, ``V Q_A`` -> ``Q_G^T (.) * inv`` -> ``Q_G (.)`` -> ``(.) Q_A^T``, the
# division by (Lambda + damping) fused into the second GEMM's epilogue, and two float32 work buffers reused
# (the last GEMM writes into the buffer the second one filled).
# ---------------------------------------------------------------------------------------------------------------
from ._triton import HAS_TRITON  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import (LOW_PRECISION, Target, any_float64, cdiv, device_target, fp32_precision, launch,
                                 pick)

    @triton.jit
    def _bmm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, M, N, K, saz, sam, sak, sbz, sbk, sbn, scz, scm, scn,
                    HAS_SCALE: tl.constexpr, LOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """``C[z] = A[z] @ B[z]`` accumulated in float32 (a zero batch stride shares a factor); with HAS_SCALE the
        product is multiplied elementwise by ``scale: (M, N)`` contiguous (the inverse of Lambda + damping).
        LOW: A and B share a half dtype and are multiplied in it (float32 accumulation); else both are float32."""
        pid = tl.program_id(0)
        z = tl.program_id(1)
        n_n = tl.cdiv(N, BLOCK_N)
        rm = (pid // n_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (pid % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_ptrs = a_ptr + z * saz + rm[:, None] * sam + tl.arange(0, BLOCK_K)[None, :] * sak
        b_ptrs = b_ptr + z * sbz + tl.arange(0, BLOCK_K)[:, None] * sbk + rn[None, :] * sbn
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            at = tl.load(a_ptrs, mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=(rk < K)[:, None] & (rn < N)[None, :], other=0.0)
            if LOW:
                acc = tl.dot(at, bt, acc)
            else:
                acc = tl.dot(at.to(tl.float32), bt.to(tl.float32), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * sak
            b_ptrs += BLOCK_K * sbk
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0.0)
        tl.store(c_ptr + z * scz + rm[:, None] * scm + rn[None, :] * scn, acc, mask=mask)

    def bmm_config(low: bool, target: Optional[Target]):
        """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of ``_bmm_kernel``. Float32 operands go through tf32x3
        (each operand split in two in registers), so their tiles are 64 x 64: 128 x 64 spilled at 255 registers."""
        if target is None:
            return (16, 16, 16, 4, 1)
        if low:
            cands = [(128, 64, 32, 4, 3), (128, 64, 32, 4, 2)]
            elem = 2
        else:
            cands = [(64, 64, 32, 8, 3), (64, 64, 32, 8, 2)]
            elem = 4
        return pick(cands, target, lambda c: c[4] * (c[0] + c[1]) * c[2] * elem)

    def _bmm(a, b, c, scale=None, batch=1):
        """``a, b, c``: 3-D views (batch stride may be 0); ``c`` float32."""
        m, k = a.shape[-2:]
        n = b.shape[-1]
        low = a.dtype == b.dtype and a.dtype in LOW_PRECISION
        bm, bn, bk, warps, stages = bmm_config(low, device_target(c.device))
        grid = (cdiv(m, bm) * cdiv(n, bn), batch)
        launch(_bmm_kernel, grid, a, b, c, scale if scale is not None else c, m, n, k, *a.stride(), *b.stride(),
               *c.stride(), HAS_SCALE=scale is not None, LOW=low, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
               PRECISION=fp32_precision(), num_warps=warps, num_stages=stages)

    @register("precondition", "triton")
    def precondition_triton(grads: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, eigenvalues: torch.Tensor,
                            damping: Union[float, torch.Tensor]) -> torch.Tensor:
        """Triton ``precondition``: ``grads: (Q, D_out, D_in')`` -> float32 (float64 inputs: the reference).
        When grads and q_a share a half dtype the first product ``V Q_A`` runs in it (float32 accumulation, like
        the same-dtype torch composition); the later products read the float32 work buffers."""
        check_precondition_args(grads, q_a, q_g, eigenvalues)
        if any_float64(grads, q_a, q_g, eigenvalues, damping):
            return precondition_reference(grads, q_a, q_g, eigenvalues, damping)
        nq, d_out, d_in = grads.shape
        qa_first = q_a if (q_a.dtype == grads.dtype and grads.dtype in LOW_PRECISION) else q_a.float()
        qa, qg = q_a.float(), q_g.float()
        inv = (1.0 / (eigenvalues.float() + damping)).contiguous()
        buf1 = torch.empty(nq, d_out, d_in, dtype=torch.float32, device=grads.device)
        buf2 = torch.empty_like(buf1)
        if nq == 0:
            return buf1
        flat = (1, nq * d_out)
        # V Q_A as one (Q*D_out, D_in) GEMM when V's rows are evenly strided, else batched.
        if grads.stride(0) == d_out * grads.stride(1):
            _bmm(grads.view(nq * d_out, d_in).unsqueeze(0), qa_first.unsqueeze(0), buf1.view(*flat, d_in))
        else:
            _bmm(grads, qa_first.unsqueeze(0).expand(nq, -1, -1), buf1, batch=nq)
        _bmm(qg.t().unsqueeze(0).expand(nq, -1, -1), buf1, buf2, scale=inv, batch=nq)
        _bmm(qg.unsqueeze(0).expand(nq, -1, -1), buf2, buf1, batch=nq)
        _bmm(buf1.view(*flat, d_in), qa.t().unsqueeze(0), buf2.view(*flat, d_in))
        return buf2
