"""Pairwise score contraction: ``S[q, b] = <P_q, sum_r g_br a_br'^T>`` for preconditioned query gradients
``P: (Q, D_out, D_in')`` against training examples given by their layer inputs and output gradients.

The per-example gradients are formed a chunk of examples at a time (torch path) or tile by tile on chip (Triton),
never for the whole batch. Query gradients may be int8 with a per-query affine map (see ``quantize_int8``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..dispatch import register
from ._checks import acc_dtype, accumulate, check_out, check_tensor
from .im2col import as_rows
from .per_example import check_ag, chunk_size_for, per_example_gradient_parts


class Int8Queries(NamedTuple):
    """Per-query affine int8: ``value = (q - zero) * scale``. q: (Q, D_out, D_in'), scale/zero: (Q,) float32."""
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(dtype) - self.zero.to(dtype)[:, None, None]) * self.scale.to(dtype)[:, None, None]


def quantize_int8(x: torch.Tensor) -> Int8Queries:
    """Affine int8 quantisation per leading index (one scale and zero point per query tensor)."""
    flat = x.reshape(x.shape[0], -1).float()
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    scale = torch.clamp((hi - lo) / 255.0, min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-128.0 - lo / scale)
    q = torch.clamp(torch.round(flat / scale[:, None] + zero[:, None]), -128, 127).to(torch.int8)
    return Int8Queries(q.reshape(x.shape), scale, zero)


def _query_shape(queries) -> tuple:
    return tuple((queries.q if isinstance(queries, Int8Queries) else queries).shape)


def check_pairwise_args(a, g, queries, append_one):
    check_ag(a, g)
    if isinstance(queries, Int8Queries):
        check_tensor("queries.q", queries.q, 3, (torch.int8,))
    else:
        check_tensor("queries", queries, 3)
    shape = _query_shape(queries)
    want = (g.shape[-1], a.shape[-1] + int(append_one))
    if shape[1:] != want:
        raise ValueError(f"queries have shape {shape}, expected (Q, {want[0]}, {want[1]}) for a "
                         f"{tuple(a.shape)}, g {tuple(g.shape)}, append_one={append_one}")


@register("pairwise_scores", "torch")
def pairwise_scores_reference(a: torch.Tensor, g: torch.Tensor, queries, *, append_one: bool = False,
                              out: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``a: (B, R, D_in)``, ``g: (B, R, D_out)``, ``queries: (Q, D_out, D_in')`` or ``Int8Queries``
    -> ``out += S``, ``S: (Q, B)``."""
    check_pairwise_args(a, g, queries, append_one)
    b = a.shape[0]
    nq = _query_shape(queries)[0]
    check_out(out, (nq, b), a.device)
    dt = acc_dtype(a, g)
    p = queries.dequantize(dt) if isinstance(queries, Int8Queries) else queries.to(dt)
    a, g = a.to(dt), g.to(dt)
    per_ex = p.shape[1] * p.shape[2] * p.element_size()
    step = chunk_size or chunk_size_for(b, per_ex)
    scores = torch.empty(nq, b, dtype=dt, device=a.device)
    d_in = a.shape[-1]
    p_weight = p[:, :, :d_in].reshape(nq, -1)
    for s in range(0, b, step):
        weight, bias = per_example_gradient_parts(a[s:s + step], g[s:s + step], append_one=append_one)
        block = p_weight @ weight.reshape(weight.shape[0], -1).T
        if bias is not None:
            block.addmm_(p[:, :, d_in], bias.T)
        scores[:, s:s + step] = block
    return accumulate(out, scores)


# ---------------------------------------------------------------------------------------------------------------
# Triton: a back-to-back GEMM in the manner of flash attention. A program owns BLOCK_B examples, BLOCK_Q queries
# and a share of the (o, i) tiles of the weight. For each tile it forms the examples' gradient tiles
# G (BLOCK_B, BLOCK_O, BLOCK_I) = sum_r g_r a_r'^T with one batched dot over positions, flattens them to
# (BLOCK_B, BLOCK_O * BLOCK_I) and contracts the queries' tile (BLOCK_Q, BLOCK_O * BLOCK_I) with it into the
# (BLOCK_Q, BLOCK_B) score block. Per-example gradients never leave the chip; int8 queries are dequantised on load.
# With one position (R = 1) the gradients are outer products and a second kernel skips them: S = sum_o g[:, o] *
# (P[:, o, :] a'^T), 2-D products only.
# ---------------------------------------------------------------------------------------------------------------
from ._triton import HAS_TRITON  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import (LOW_PRECISION, Target, any_float64, cdiv, device_target, fp32_precision,
                                 interpreting, kernel_dtype, launch, num_programs_target, pick)

    @triton.jit
    def _pairwise_kernel(a_ptr, g_ptr, p_ptr, scale_ptr, zero_ptr, s_ptr, B, R, DO, DI, DIP, NQ, SPLIT,
                         sab, sar, sai, sgb, sgr, sgo, spq, spo, spi, ssq, ssb,
                         APPEND_ONE: tl.constexpr, INT8: tl.constexpr, DOT2_LOW: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_O: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                         PRECISION2: tl.constexpr):
        """``s (NQ, B)`` float32 += scores of this program's examples, queries and (o, i) tiles (atomic).
        The score product is taken as ``S^T`` block ``(BLOCK_Q, BLOCK_B) += P (BLOCK_Q, O*I) @ G^T (O*I, BLOCK_B)``:
        BLOCK_Q (64) is the M side, so that on sm_90 it is a warpgroup MMA (M = 64 per warpgroup)."""
        bb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        qq = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        bmask = bb < B
        qmask = qq < NQ
        n_ti = tl.cdiv(DIP, BLOCK_I)
        n_tiles = tl.cdiv(DO, BLOCK_O) * n_ti
        per = tl.cdiv(n_tiles, SPLIT)
        t_lo = tl.program_id(2) * per
        t_hi = tl.minimum(n_tiles, t_lo + per)
        kk = tl.arange(0, BLOCK_O * BLOCK_I)
        if INT8:
            zero = tl.load(zero_ptr + qq, mask=qmask, other=0.0)
            scale = tl.load(scale_ptr + qq, mask=qmask, other=0.0)
        acc = tl.zeros((BLOCK_Q, BLOCK_B), dtype=tl.float32)
        for t in range(t_lo, t_hi):
            oo = (t // n_ti) * BLOCK_O + tl.arange(0, BLOCK_O)
            ii = (t % n_ti) * BLOCK_I + tl.arange(0, BLOCK_I)
            grad = tl.zeros((BLOCK_B, BLOCK_O, BLOCK_I), dtype=tl.float32)
            g_base = g_ptr + bb[:, None, None] * sgb + oo[None, :, None] * sgo
            a_base = a_ptr + bb[:, None, None] * sab + ii[None, None, :] * sai
            gmask = bmask[:, None, None] & (oo < DO)[None, :, None]
            amask = bmask[:, None, None] & (ii < DI)[None, None, :]
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                gt = tl.load(g_base + rr[None, None, :] * sgr, mask=gmask & (rr < R)[None, None, :], other=0.0)
                ar = amask & (rr < R)[None, :, None]
                at = tl.load(a_base + rr[None, :, None] * sar, mask=ar, other=0.0)
                if APPEND_ONE:
                    at = tl.where(bmask[:, None, None] & (rr < R)[None, :, None] & (ii == DI)[None, None, :], 1.0,
                                  at).to(a_ptr.dtype.element_ty)
                grad = tl.dot(gt, at, grad, input_precision=PRECISION)
            flat_t = tl.trans(tl.reshape(grad, (BLOCK_B, BLOCK_O * BLOCK_I)))  # (O*I, BLOCK_B)
            ko = (t // n_ti) * BLOCK_O + kk // BLOCK_I
            ki = (t % n_ti) * BLOCK_I + kk % BLOCK_I
            pmask = qmask[:, None] & ((ko < DO) & (ki < DIP))[None, :]
            p = tl.load(p_ptr + qq[:, None] * spq + ko[None, :] * spo + ki[None, :] * spi, mask=pmask, other=0)
            if INT8:
                p = tl.where(pmask, (p.to(tl.float32) - zero[:, None]) * scale[:, None], 0.0)
            if DOT2_LOW:
                acc = tl.dot(p, flat_t.to(p_ptr.dtype.element_ty), acc)
            else:
                acc = tl.dot(p.to(tl.float32), flat_t, acc, input_precision=PRECISION2)
        # Atomics: programs of other tile shares add into the same block; races cannot show in the interpreter
        # (it runs programs one at a time) and are covered by bench/gpu_check.sh, which repeats launches.
        tl.atomic_add(s_ptr + qq[:, None] * ssq + bb[None, :] * ssb, acc, mask=qmask[:, None] & bmask[None, :])

    @triton.jit
    def _pairwise_r1_kernel(a_ptr, g_ptr, p_ptr, scale_ptr, zero_ptr, s_ptr, B, DO, DI, DIP, NQ, SPLIT,
                            sab, sai, sgb, sgo, spq, spo, spi, ssq, ssb,
                            APPEND_ONE: tl.constexpr, INT8: tl.constexpr, LOW: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_I: tl.constexpr,
                            PRECISION: tl.constexpr):
        """R = 1: ``S[q, b] += sum_o g[b, o] (P_q a'_b)[o]`` over this program's share of the outputs o. Each
        output row is one 2-D product ``U (BLOCK_Q, BLOCK_B) = P[:, o, :] @ a'^T``, scaled by ``g[:, o]``: the
        multiply-adds of the score product alone (no per-example gradient product, and no 3-D dot)."""
        bb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        qq = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        bmask = bb < B
        qmask = qq < NQ
        per = tl.cdiv(DO, SPLIT)
        o_lo = tl.program_id(2) * per
        o_hi = tl.minimum(DO, o_lo + per)
        if INT8:
            zero = tl.load(zero_ptr + qq, mask=qmask, other=0.0)
            scale = tl.load(scale_ptr + qq, mask=qmask, other=0.0)
        acc = tl.zeros((BLOCK_Q, BLOCK_B), dtype=tl.float32)
        for o in range(o_lo, o_hi):
            u = tl.zeros((BLOCK_Q, BLOCK_B), dtype=tl.float32)
            for i0 in range(0, DIP, BLOCK_I):
                ii = i0 + tl.arange(0, BLOCK_I)
                pmask = qmask[:, None] & (ii < DIP)[None, :]
                p = tl.load(p_ptr + qq[:, None] * spq + o * spo + ii[None, :] * spi, mask=pmask, other=0)
                at = tl.load(a_ptr + bb[None, :] * sab + ii[:, None] * sai,
                             mask=bmask[None, :] & (ii < DI)[:, None], other=0.0)
                if APPEND_ONE:
                    at = tl.where(bmask[None, :] & (ii == DI)[:, None], 1.0, at).to(a_ptr.dtype.element_ty)
                if INT8:
                    p = tl.where(pmask, (p.to(tl.float32) - zero[:, None]) * scale[:, None], 0.0)
                if LOW:
                    u = tl.dot(p, at, u)
                else:
                    u = tl.dot(p.to(tl.float32), at.to(tl.float32), u, input_precision=PRECISION)
            gv = tl.load(g_ptr + bb * sgb + o * sgo, mask=bmask, other=0.0).to(tl.float32)
            acc += u * gv[None, :]
        # Atomics: programs of other output shares add into the same block (see _pairwise_kernel on races)
        tl.atomic_add(s_ptr + qq[:, None] * ssq + bb[None, :] * ssb, acc, mask=qmask[:, None] & bmask[None, :])

    def pairwise_r1_config(dtype: torch.dtype, int8: bool, target: Optional[Target]):
        """(BLOCK_B, BLOCK_Q, BLOCK_I, warps, stages) of ``_pairwise_r1_kernel``: 64 queries (a warpgroup MMA's M
        side on sm_90) by 32 examples on 8 warps, 32-wide input tiles, 2 stages (1 for int8 queries, whose
        2-stage variants spilled 12-24 B on sm_86 / sm_89): at most 174 registers on sm_80 to sm_90a in
        bench/compile_check.py (4 warps, 64-wide tiles or 3 stages spilled up to 660 B)."""
        if target is None:
            return (16, 16, 16, 4, 1)
        elem = torch.tensor([], dtype=dtype).element_size()
        cands = [(32, 64, 32, 8, 1 if int8 else 2), (32, 32, 32, 4, 1)]
        return pick(cands, target, lambda c: c[4] * (c[0] + c[1]) * c[2] * max(elem, 4))

    class PairwiseConfig(NamedTuple):
        block_b: int
        block_q: int
        block_o: int
        block_i: int
        block_r: int
        warps: int
        stages: int

    def pairwise_config(dtype: torch.dtype, int8: bool, target: Optional[Target]) -> PairwiseConfig:
        """``_pairwise_kernel``'s configuration for ``dtype`` (a, g) operands on ``target`` (None: interpreter).
        The per-program gradient tile is BLOCK_B * BLOCK_O * BLOCK_I float32 values in registers and the query
        tile BLOCK_Q * BLOCK_O * BLOCK_I (three times over for float32's tf32x3), so O * I is kept at 128
        (bench/compile_check.py: 16 x 16 tiles spilled 0.1-1.8 KB in every dtype). sm_90: 64 queries (a warpgroup
        MMA's M side) and 16 examples (its N: 8 fell back to mma.sync) over 8 warps, 162-255 registers without
        spills. Before sm_90 (mma.sync): 32 queries and 8 examples, at most 189 registers (16 examples spilled
        12-40 B in some variants)."""
        if target is None:
            return PairwiseConfig(16, 16, 16, 16, 16, 4, 1)
        elem = torch.tensor([], dtype=dtype).element_size()
        if target.capability >= 90:
            cands = [PairwiseConfig(16, 64, 16, 8, 16, 8, 1)]
        else:
            cands = [PairwiseConfig(8, 32, 16, 8, 16, 8, 1)]
        return pick(cands, target, lambda c: c.stages * c.block_b * (c.block_o + c.block_i) * c.block_r * elem
                    + c.block_q * c.block_o * c.block_i * 4 + c.block_b * c.block_o * c.block_i * 4)

    @register("pairwise_scores", "triton")
    def pairwise_scores_triton(a: torch.Tensor, g: torch.Tensor, queries, *, append_one: bool = False,
                               out: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
        """Triton ``pairwise_scores``: ``(Q, B)`` float32 (float64 inputs: the reference)."""
        check_pairwise_args(a, g, queries, append_one)
        int8 = isinstance(queries, Int8Queries)
        nq, b = _query_shape(queries)[0], a.shape[0]
        check_out(out, (nq, b), a.device)
        if any_float64(a, g, out, None if int8 else queries):
            return pairwise_scores_reference(a, g, queries, append_one=append_one, out=out)
        dt = kernel_dtype(a, g)
        a, g = as_rows(a).to(dt), g.to(dt)
        if int8:
            p, scale, zero = queries.q, queries.scale.float().contiguous(), queries.zero.float().contiguous()
        else:
            p = queries if queries.dtype in LOW_PRECISION else queries.float()
            scale = zero = None
        dot2_low = (not int8) and p.dtype == dt and dt in LOW_PRECISION
        d_out, dip = g.shape[-1], a.shape[-1] + int(append_one)
        scores = torch.zeros(nq, b, dtype=torch.float32, device=a.device)
        if not (b and nq):
            return accumulate(out, scores)
        target = device_target(a.device)
        prec = fp32_precision()
        prec2 = "tf32" if (int8 and not interpreting()) else prec
        if a.shape[1] == 1:
            bb, bq, bi, warps, stages = pairwise_r1_config(dt, int8, target)
            blocks = cdiv(b, bb) * cdiv(nq, bq)
            nsplit = split or max(1, min(d_out, cdiv(num_programs_target(target), blocks)))
            a1, g1 = a[:, 0], g[:, 0]
            launch(_pairwise_r1_kernel, (cdiv(b, bb), cdiv(nq, bq), nsplit),
                   a1, g1, p, scale if int8 else scores, zero if int8 else scores, scores, b, d_out, a.shape[-1],
                   dip, nq, nsplit, *a1.stride(), *g1.stride(), *p.stride(), *scores.stride(),
                   APPEND_ONE=append_one, INT8=int8, LOW=dot2_low, BLOCK_B=bb, BLOCK_Q=bq, BLOCK_I=bi,
                   PRECISION=prec2, num_warps=warps, num_stages=stages)
            return accumulate(out, scores)
        bb, bq, bo, bi, br, warps, stages = pairwise_config(dt, int8, target)
        blocks = cdiv(b, bb) * cdiv(nq, bq)
        n_tiles = cdiv(d_out, bo) * cdiv(dip, bi)
        nsplit = split or max(1, min(n_tiles, cdiv(num_programs_target(target), blocks)))
        launch(_pairwise_kernel, (cdiv(b, bb), cdiv(nq, bq), nsplit),
               a, g, p, scale if int8 else scores, zero if int8 else scores, scores, b, a.shape[1], d_out,
               a.shape[-1], dip, nq, nsplit, *a.stride(), *g.stride(), *p.stride(), *scores.stride(),
               APPEND_ONE=append_one, INT8=int8, DOT2_LOW=dot2_low, BLOCK_B=bb, BLOCK_Q=bq, BLOCK_O=bo,
               BLOCK_I=bi, BLOCK_R=br, PRECISION=prec, PRECISION2=prec2, num_warps=warps, num_stages=stages)
        return accumulate(out, scores)
