"""Low-rank query gradients: each preconditioned query gradient ``P_q (D_out, D_in')`` replaced by its best rank-k
approximation ``L_q R_q^T`` (truncated SVD, singular values folded into ``L_q``), and scores against training
examples computed without forming any gradient matrix:

    S[q, b] = <L_q R_q^T, sum_r g_br a_br'^T> = sum_r sum_j (g_br . L_q[:, j]) (a_br' . R_q[:, j])

i.e. the examples' output gradients projected on the Q*k left vectors and their inputs on the Q*k right vectors,
multiplied and summed over positions. Cost per example: R (D_out + D_in') Q k multiply-adds, against
D_out D_in' (R + Q) for the full-rank contraction; memory Q k (D_out + D_in') for the queries instead of
Q D_out D_in'.

The torch path projects a chunk of examples at a time; the Triton kernel (``_lowrank_kernel``) forms both
projections tile by tile on chip, reads conv inputs by implicit im2col and stores only per-rank-column sums.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..dispatch import register
from ._checks import acc_dtype, accumulate, check_out, check_tensor
from .im2col import ConvPatches, as_rows
from .per_example import check_ag, chunk_size_for, rotate_inputs, rotate_patches


class LowRankQueries(NamedTuple):
    """``left: (Q, D_out, k)`` (singular values folded in), ``right: (Q, D_in', k)``: ``P_q ~ left_q right_q^T``."""
    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.left.shape[-1])

    def dense(self) -> torch.Tensor:
        """The ``(Q, D_out, D_in')`` matrices they stand for."""
        return self.left @ self.right.transpose(1, 2)


def lowrank_queries(p: torch.Tensor, rank: int) -> LowRankQueries:
    """Best rank-``rank`` approximation (Eckart-Young, in the Frobenius norm) of each ``p[q]: (D_out, D_in')``,
    from an SVD in float64 (rank is capped at min(D_out, D_in'))."""
    check_tensor("p", p, 3)
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = min(int(rank), p.shape[1], p.shape[2])
    u, s, vh = torch.linalg.svd(p.double(), full_matrices=False)
    left = (u[:, :, :k] * s[:, None, :k]).to(p.dtype)
    right = vh[:, :k, :].transpose(1, 2).to(p.dtype)
    return LowRankQueries(left.contiguous(), right.contiguous())


def check_lowrank_args(a, g, queries: LowRankQueries, append_one: bool) -> None:
    check_ag(a, g)
    check_tensor("queries.left", queries.left, 3)
    check_tensor("queries.right", queries.right, 3)
    nq, d_out, k = queries.left.shape
    want_right = (nq, a.shape[-1] + int(append_one), k)
    if d_out != g.shape[-1] or tuple(queries.right.shape) != want_right:
        raise ValueError(f"low-rank queries left {tuple(queries.left.shape)}, right {tuple(queries.right.shape)} "
                         f"do not fit a {tuple(a.shape)}, g {tuple(g.shape)}, append_one={append_one} (expected "
                         f"left (Q, {g.shape[-1]}, k), right {want_right})")


@register("lowrank_pairwise_scores", "torch")
def lowrank_pairwise_scores_reference(a, g: torch.Tensor, queries: LowRankQueries, *, append_one: bool = False,
                                      out: Optional[torch.Tensor] = None,
                                      chunk_size: Optional[int] = None) -> torch.Tensor:
    """``a: (B, R, D_in)`` or ``ConvPatches``, ``g: (B, R, D_out)`` -> ``out += S``, ``S: (Q, B)``.

    Projections of a chunk of examples at a time: ``g @ L`` and ``[a, 1] @ R`` (a conv input by one convolution
    with R's columns as filters on a CPU, no unfolded patches), their product summed over positions and ranks."""
    check_lowrank_args(a, g, queries, append_one)
    b, r = g.shape[:2]
    nq, d_out, k = queries.left.shape
    check_out(out, (nq, b), g.device)
    dt = acc_dtype(g, queries.left, queries.right, *(() if isinstance(a, ConvPatches) else (a,)))
    left = queries.left.to(dt).permute(1, 0, 2).reshape(d_out, nq * k)
    right = queries.right.to(dt).permute(1, 0, 2).reshape(-1, nq * k)
    # per example in flight: the two (R, Q k) projections
    step = chunk_size or chunk_size_for(b, 2 * r * nq * k * torch.finfo(dt).bits // 8)
    scores = torch.empty(nq, b, dtype=dt, device=g.device)
    for s in range(0, b, step):
        g_proj = g[s:s + step].to(dt) @ left  # (b, R, Q k)
        chunk = a[s:s + step]
        if isinstance(chunk, ConvPatches) and not chunk.x.is_cuda:  # cuDNN may convolve in TF32: GEMMs there
            a_proj = rotate_patches(chunk, right, append_one, square=False).transpose(1, 2)
        else:
            a_proj = rotate_inputs(as_rows(chunk).to(dt), right, append_one, square=False)
        g_proj.mul_(a_proj)
        scores[:, s:s + step] = g_proj.sum(dim=1).reshape(-1, nq, k).sum(dim=-1).T
    return accumulate(out, scores)


# ---------------------------------------------------------------------------------------------------------------
# Triton: both projections and their product fused per tile of (example, position) rows and rank columns; the
# projections never leave the chip. The kernel writes per-column sums T (Q k, B); the launcher sums each query's k
# columns (a (Q, k, B) reduction in torch).
# ---------------------------------------------------------------------------------------------------------------
from ._triton import HAS_TRITON  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import (LOW_PRECISION, Target, any_float64, cdiv, device_target, fp32_precision,
                                 kernel_dtype, launch, num_programs_target, pick, split_count)
    from .covariance import _col_offsets, _load_rows  # implicit im2col of conv inputs, shared with the Gram kernel
    from .im2col import conv_output_size

    @triton.jit
    def _proj_dot(x, y, acc, LOW: tl.constexpr, PRECISION: tl.constexpr):
        """``acc + x @ y``: in the operands' half dtype (float32 accumulation) when LOW, else in float32."""
        if LOW:
            res = tl.dot(x, y, acc)
        else:
            res = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision=PRECISION)
        return res

    @triton.jit
    def _lowrank_kernel(a_ptr, g_ptr, l_ptr, r_ptr, t_ptr, B, R, DO, DI, DIP, QK, K, blocks_per_split,
                        sab, sar, sai, sgb, sgr, sgo, slq, slo, slk, srq, sri, srk, stc, stb,
                        H, W, OW, sB, sC, sH, sW, KH: tl.constexpr, KW: tl.constexpr, SH, SW, PH, PW, DH, DW,
                        IS_CONV: tl.constexpr, APPEND_ONE: tl.constexpr, ATOMIC: tl.constexpr, LOW: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
        """``t (QK, B)`` float32 [+]= ``T[c, b] = sum_r (g_br . left[:, c]) (a'_br . right[:, c])`` for this
        program's BLOCK_B examples, BLOCK_J rank columns and share of the position blocks.

        Shapes: ``a: (B, R, DI)`` (or, IS_CONV, the NCHW input whose patches are its rows, read by implicit im2col),
        ``g: (B, R, DO)``, ``left: (Q, DO, K)``, ``right: (Q, DIP, K)``; rank column c is query c // K, singular
        vector c % K, so QK = Q K and the rank is a runtime value (no specialisation per rank).
        A tile's BLOCK_M = BLOCK_B * BLOCK_R rows are BLOCK_B examples times BLOCK_R positions (the launcher picks
        the split that wastes least on the layer's B and R: one example and many positions for a conv, many
        examples of one position for R = 1). Per position block the two projections ``G (BLOCK_M, BLOCK_J) = g
        @ left`` and ``A (BLOCK_M, BLOCK_J) = a' @ right`` are GEMMs over DO and DIP in BLOCK_K steps, on chip;
        their product is summed over the block's positions into ``acc (BLOCK_B, BLOCK_J)``. So the (B, R, Q K)
        projections a two-GEMM composition writes to memory (134 MB each in float32 for 64 rank-32 queries at an
        SD-1.5 attention layer, 4 x 4096 positions) are never stored; the price is that a and g are re-read once
        per column block (from L2 where they fit). Column sums rather than per-query sums leave the rank out of
        the tiling (a column block may hold parts of several queries) and let no two column blocks write the same
        entry: atomics only where the positions are split (ATOMIC)."""
        BLOCK_M: tl.constexpr = BLOCK_B * BLOCK_R
        m = tl.arange(0, BLOCK_M)
        bm = tl.program_id(0) * BLOCK_B + m // BLOCK_R  # example of each tile row
        cc = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        cmask = cc < QK
        l_col = (cc // K) * slq + (cc % K) * slk
        r_col = (cc // K) * srq + (cc % K) * srk
        kk = tl.arange(0, BLOCK_K)
        rb_lo = tl.program_id(2) * blocks_per_split
        rb_hi = tl.minimum(tl.cdiv(R, BLOCK_R), rb_lo + blocks_per_split)
        acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
        for rb in range(rb_lo, rb_hi):
            rm = rb * BLOCK_R + m % BLOCK_R  # position of each tile row
            row_ok = (bm < B) & (rm < R)
            gp = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
            for o0 in range(0, DO, BLOCK_K):
                oo = o0 + kk
                gt = tl.load(g_ptr + (bm * sgb + rm * sgr)[:, None] + oo[None, :] * sgo,
                             mask=row_ok[:, None] & (oo < DO)[None, :], other=0.0)
                lt = tl.load(l_ptr + oo[:, None] * slo + l_col[None, :], mask=(oo < DO)[:, None] & cmask[None, :],
                             other=0.0)
                gp = _proj_dot(gt, lt, gp, LOW, PRECISION)
            ap = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
            for i0 in range(0, DIP, BLOCK_K):
                ii = i0 + kk
                if IS_CONV:
                    off, dih, diw = _col_offsets(ii, DI, 0, sC, sH, sW, KH, KW, DH, DW, True)
                    at = _load_rows(a_ptr, bm * R + rm, row_ok, ii, off, dih, diw, DI, 0, H, W, OW, R, sB, sH, sW,
                                    SH, SW, PH, PW, True, APPEND_ONE)
                else:
                    at = tl.load(a_ptr + (bm * sab + rm * sar)[:, None] + ii[None, :] * sai,
                                 mask=row_ok[:, None] & (ii < DI)[None, :], other=0.0)
                    if APPEND_ONE:
                        at = tl.where(row_ok[:, None] & (ii == DI)[None, :], 1.0, at).to(a_ptr.dtype.element_ty)
                rt = tl.load(r_ptr + ii[:, None] * sri + r_col[None, :], mask=(ii < DIP)[:, None] & cmask[None, :],
                             other=0.0)
                ap = _proj_dot(at, rt, ap, LOW, PRECISION)
            acc += tl.sum(tl.reshape(gp * ap, (BLOCK_B, BLOCK_R, BLOCK_J)), axis=1)
        bb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        p = t_ptr + cc[None, :] * stc + bb[:, None] * stb
        mask = (bb < B)[:, None] & cmask[None, :]
        if ATOMIC:
            # Atomics: programs of other position shares add into the same block; races cannot show in the
            # interpreter (it runs programs one at a time) and are covered by bench/gpu_check.sh, which repeats
            # launches and compares.
            tl.atomic_add(p, acc, mask=mask)
        else:
            tl.store(p, acc, mask=mask)

    class LowRankConfig(NamedTuple):
        block_m: int
        block_j: int
        block_k: int
        warps: int
        stages: int

    def lowrank_config(low: bool, target: Optional[Target]) -> LowRankConfig:
        """``_lowrank_kernel``'s tiles on ``target`` (None: the interpreter) for products in a half dtype (``low``)
        or in float32. 64 x 64 tiles of both projections (two float32 accumulators) on 8 warps, at most 24 KB of
        shared memory. Half products: 32-wide K steps, 3 stages, 87-168 registers in bench/compile_check.py (4
        warps spilled 16 B on sm_80). Float32 (tf32x3: three products, twice the operand registers): 16-wide K
        steps and 2 stages, 113-255 registers without spills (32-wide steps, 4 warps or 3 stages spilled 0.1-2 KB
        on sm_80 / sm_86). The shared-memory estimate given to ``pick`` is an upper bound."""
        if target is None:
            return LowRankConfig(16, 16, 16, 4, 1)
        cands = [LowRankConfig(64, 64, 32, 8, 3), LowRankConfig(64, 64, 32, 8, 2)] if low else \
            [LowRankConfig(64, 64, 16, 8, 2)]
        return pick(cands, target, lambda c: 2 * c.stages * (c.block_m + c.block_j) * c.block_k * (2 if low else 4))

    def row_split(b: int, r: int, block_m: int) -> Tuple[int, int]:
        """(BLOCK_B, BLOCK_R), a power-of-two split of a tile's ``block_m`` rows into examples times positions
        that wastes the fewest padded rows on ``b`` examples of ``r`` positions (ties: more positions)."""
        best = None
        br = 1
        while br <= block_m:
            bb = block_m // br
            work = cdiv(b, bb) * bb * cdiv(r, br) * br
            if best is None or work <= best[0]:
                best = (work, bb, br)
            br *= 2
        return best[1], best[2]

    def _conv_geometry(p: ConvPatches) -> tuple:
        """(H, W, OW, sB, sC, sH, sW), (KH, KW), (SH, SW, PH, PW, DH, DW) of the kernel's implicit im2col."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p.geometry
        h, w = p.x.shape[-2:]
        ow = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))[1]
        return (h, w, ow) + tuple(p.x.stride()), (kh, kw), (sh, sw, ph, pw, dh, dw)

    @register("lowrank_pairwise_scores", "triton")
    def lowrank_pairwise_scores_triton(a, g: torch.Tensor, queries: LowRankQueries, *, append_one: bool = False,
                                       out: Optional[torch.Tensor] = None,
                                       split: Optional[int] = None) -> torch.Tensor:
        """Triton ``lowrank_pairwise_scores``: ``a: (B, R, D_in)`` or ``ConvPatches`` (never unfolded), ``g: (B, R,
        D_out)`` -> ``(Q, B)`` float32 (float64 inputs: the reference). ``split``: position shares per tile."""
        check_lowrank_args(a, g, queries, append_one)
        b, r = g.shape[:2]
        nq, d_out, k = queries.left.shape
        check_out(out, (nq, b), g.device)
        if any_float64(a, g, out, queries.left, queries.right):
            return lowrank_pairwise_scores_reference(a, g, queries, append_one=append_one, out=out)
        conv = isinstance(a, ConvPatches)
        dt = kernel_dtype(a.x if conv else a, g)
        a, g = a.to(dt), g.to(dt)
        low = dt in LOW_PRECISION and queries.left.dtype == dt and queries.right.dtype == dt
        left, right = (queries.left, queries.right) if low else (queries.left.float(), queries.right.float())
        qk, d_in = nq * k, a.shape[-1]
        if not (b and r and qk):
            return accumulate(out, torch.zeros(nq, b, dtype=torch.float32, device=g.device))
        target = device_target(g.device)
        c = lowrank_config(low, target)
        block_b, block_r = row_split(b, r, c.block_m)
        blocks = cdiv(b, block_b) * cdiv(qk, c.block_j)
        n_rb = cdiv(r, block_r)
        per = cdiv(n_rb, split or split_count(blocks, num_programs_target(target), n_rb))
        nsplit = cdiv(n_rb, per)
        sums = (torch.zeros if nsplit > 1 else torch.empty)(qk, b, dtype=torch.float32, device=g.device)
        if conv:
            x = a.x
            (h, w, ow, *strides), (kh, kw), geo = _conv_geometry(a)
            dense_strides = (0, 0, 0)
        else:
            x = a
            (h, w, ow, *strides), (kh, kw), geo = (1, 1, 1, 0, 0, 0, 0), (1, 1), (1, 1, 0, 0, 1, 1)
            dense_strides = a.stride()
        launch(_lowrank_kernel, (cdiv(b, block_b), cdiv(qk, c.block_j), nsplit),
               x, g, left, right, sums, b, r, d_out, d_in, d_in + int(append_one), qk, k, per,
               *dense_strides, *g.stride(), *left.stride(), *right.stride(), *sums.stride(),
               h, w, ow, *strides, kh, kw, *geo,
               IS_CONV=conv, APPEND_ONE=append_one, ATOMIC=nsplit > 1, LOW=low, BLOCK_B=block_b, BLOCK_R=block_r,
               BLOCK_J=c.block_j, BLOCK_K=c.block_k, PRECISION=fp32_precision(), num_warps=c.warps,
               num_stages=c.stages)
        return accumulate(out, sums.view(nq, k, b).sum(dim=1))
