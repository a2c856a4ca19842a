"""Covariance accumulation: ``out += sum_rows [x, 1]^T [x, 1]`` for linear inputs, and for Conv2d inputs
through their patches (K-FAC expand) or the position-mean of their patches (K-FAC reduce).

All functions return an unnormalised SUM over rows; the caller divides by its count (design.md, section 2).
With ``append_one`` the homogeneous bias coordinate is the LAST row/column.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..dispatch import register
from ._checks import acc_dtype, accumulate, check_out, check_tensor
from .im2col import IntPair, conv_output_size, pair, unfold_conv_input


@register("linear_covariance", "torch")
def linear_covariance_reference(a: torch.Tensor, *, append_one: bool = False,
                                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a: (M, D)`` rows -> ``(D', D')`` sum of outer products, D' = D + append_one."""
    check_tensor("a", a, 2)
    d = a.shape[1] + int(append_one)
    check_out(out, (d, d), a.device)
    x = a.to(acc_dtype(a))
    if not append_one:
        return accumulate(out, x.T @ x)
    # [x, 1]^T [x, 1] = [[x^T x, s], [s^T, M]] with s the column sums: no concatenated copy of the rows
    gram = x.new_empty(d, d)
    gram[:-1, :-1] = x.T @ x  # not mm(out=): that would refuse inputs that require grad
    gram[:-1, -1] = gram[-1, :-1] = x.sum(0)
    gram[-1, -1] = x.shape[0]
    return accumulate(out, gram)


def conv_covariance_reference(x: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                              dilation: IntPair = 1, *, reduce: bool = False, append_one: bool = False,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Covariance of the patches of ``x: (B, C, H, W)``.

    expand (``reduce=False``): sum over (b, r) of p_br p_br^T, p = [patch, 1].
    reduce (``reduce=True``): sum over b of m_b m_b^T, m_b = mean_r [patch_br, 1].
    Returns ``(C*kh*kw + append_one,)*2``. This reference unfolds; the Triton kernel does not.
    """
    check_tensor("x", x, 4)
    p = unfold_conv_input(x.to(acc_dtype(x)), kernel_size, stride, padding, dilation)  # (B, R, D)
    rows = p.mean(dim=1) if reduce else p.reshape(-1, p.shape[-1])
    return linear_covariance_reference(rows, append_one=append_one, out=out)


def window_margins(kernel_size, padding, dilation):
    """Margins ``(mh, mw)`` to pad an input by so that every tap's window of input positions is a slice, and the
    slices' starts ``start_h, start_w``: tap (i, j) of output position (oh, ow) reads padded position
    ``(s_h*oh + start_h[i], s_w*ow + start_w[j])``. The margin is at least the conv padding and at least half the
    kernel extent, so that a flat shift of the padded array by any tap offset only ever wraps into margin zeros
    (see ``_shifted_patch_gram``)."""
    (kh, kw), (ph, pw), (dh, dw) = pair(kernel_size), pair(padding), pair(dilation)
    mh, mw = max(ph, (dh * (kh - 1) + 1) // 2), max(pw, (dw * (kw - 1) + 1) // 2)
    return (mh, mw), [dh * i - ph + mh for i in range(kh)], [dw * j - pw + mw for j in range(kw)]


def _patch_sums(x: torch.Tensor, kernel_size, stride, padding, dilation, per_example: bool) -> torch.Tensor:
    """Sum over output positions of each tap's input value: ``(C*kh*kw,)``, or ``(B, C*kh*kw)`` per example."""
    (sh, sw) = pair(stride)
    oh, ow = conv_output_size(tuple(x.shape[-2:]), kernel_size, stride, padding, dilation)
    (mh, mw), start_h, start_w = window_margins(kernel_size, padding, dilation)
    xp = F.pad(x if per_example else x.sum(0, keepdim=True), (mw, mw, mh, mh))
    taps = [xp[:, :, i0:i0 + sh * (oh - 1) + 1:sh, j0:j0 + sw * (ow - 1) + 1:sw].sum(dim=(2, 3))
            for i0 in start_h for j0 in start_w]
    sums = torch.stack(taps, dim=-1).flatten(1)  # (B or 1, C*kh*kw) in unfold order: channel-major
    return sums if per_example else sums[0]


def border_plan(kernel_size, padding, dilation, h: int, w: int):
    """Which border Grams ``_shifted_patch_gram`` subtracts (or adds back), for an (h, w) input.

    Returns ``(taps, deltas, pairs, strips)``: ``pairs[p] = (t1, t2, k)`` for taps t1 <= t2 at offset
    ``deltas[k]``; ``strips`` maps a strip of input positions, ``("row", r)``, ``("col", q)`` or
    ``("corner", r, q)`` in padded coordinates, to ``{k: [(p, sign), ...]}``. Block p's window excludes the
    input's rows (columns) outside tap row i1's (column j1's) window; by inclusion-exclusion it is the full
    shifted Gram minus those rows' and those columns' Grams plus their corners'. A strip is listed for delta k only
    where the partner position can be inside the input (elsewhere its Gram is zero)."""
    (kh, kw), (dh, dw) = pair(kernel_size), pair(dilation)
    oh, ow = conv_output_size((h, w), kernel_size, 1, padding, dilation)
    (mh, mw), start_h, start_w = window_margins(kernel_size, padding, dilation)
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    deltas = sorted({(i2 - i1, j2 - j1) for t1, (i1, j1) in enumerate(taps) for (i2, j2) in taps[t1:]})
    index = {dd: k for k, dd in enumerate(deltas)}
    pairs = [(t1, t2, index[(taps[t2][0] - taps[t1][0], taps[t2][1] - taps[t1][1])])
             for t1 in range(len(taps)) for t2 in range(t1, len(taps))]
    real_h, real_w = range(mh, mh + h), range(mw, mw + w)
    ex_h = [[r for r in real_h if not st <= r < st + oh] for st in start_h]
    ex_w = [[q for q in real_w if not st <= q < st + ow] for st in start_w]
    strips: dict = {}
    for p, (t1, t2, k) in enumerate(pairs):
        (i1, j1), (di, dj) = taps[t1], deltas[k]
        rows = [r for r in ex_h[i1] if r + dh * di in real_h]
        cols = [q for q in ex_w[j1] if q + dw * dj in real_w]
        for key, sign in [(("row", r), -1.0) for r in rows] + [(("col", q), -1.0) for q in cols] + \
                [(("corner", r, q), 1.0) for r in rows for q in cols]:
            strips.setdefault(key, {}).setdefault(k, []).append((p, sign))
    return taps, deltas, pairs, strips


def _shifted_patch_gram(x: torch.Tensor, kernel_size, padding, dilation, out: torch.Tensor) -> None:
    """Write ``sum_{b,o} p_bo p_bo^T`` over the stride-1 patches of ``x: (B, C, H, W)`` into ``out: (D, D)``
    (D = C*kh*kw, unfold order; may be a view) without unfolding them.

    Block (t1, t2) of taps t1 <= t2 (flat index i*kw + j) is ``sum_q u_q u_{q+delta}^T`` over the input positions
    q in tap t1's window, delta = the offset between the taps. Over ALL positions that sum is one GEMM of the
    padded input (C, N) with itself shifted by delta along the flattened (B, H', W') axis; the window is all
    positions minus a few border rows and columns (inclusion-exclusion, ``border_plan``), whose small Gram
    matrices are subtracted. That is 13 C x C GEMMs for a 3x3 kernel instead of one (9C) x (9C) GEMM of the
    unfolded patches (6x fewer flops), and no (B, R, 9C) tensor. Each border strip is one strided view of the
    padded input (a row of every example, a column, a corner position). Scratch besides ``out``: the padded
    input, the shifted Grams (13 C^2 for 3x3), one strip's border Grams at a time and the upper blocks (as big as
    half the result).
    """
    b, c, h, w = x.shape
    (mh, mw), _, _ = window_margins(kernel_size, padding, dilation)
    taps, deltas, pairs, strips = border_plan(kernel_size, padding, dilation, h, w)
    (dh, dw) = pair(dilation)
    hp, wp = h + 2 * mh, w + 2 * mw
    n = b * hp * wp
    offs = [dh * di * wp + dw * dj for di, dj in deltas]
    ext = x.new_zeros(c, n + max(offs))  # the padded input as (C, N), then zeros that wrapped shifts read
    ext[:, :n].view(c, b, hp, wp)[:, :, mh:mh + h, mw:mw + w] = x.transpose(0, 1)
    full = torch.stack([ext[:, :n] @ ext[:, o:o + n].T for o in offs])  # (n_delta, C, C)
    upper = full[torch.tensor([k for _, _, k in pairs], device=x.device)]  # (P, C, C): block p before borders
    del full
    geometry = {"row": ((b, w), (hp * wp, 1)), "col": ((b, h), (hp * wp, wp)), "corner": ((b,), (hp * wp,))}
    for key, by_k in strips.items():
        shape, strides = geometry[key[0]]  # a strip's own positions: its row x the input's columns, and so on
        base = key[1] * wp + mw if key[0] == "row" else mh * wp + key[1] if key[0] == "col" else key[1] * wp + key[2]
        ks = sorted(by_k)
        view = lambda off: ext.as_strided((c,) + shape, (ext.stride(0),) + strides, base + off)  # noqa: E731
        right = torch.stack([view(offs[k]) for k in ks]).reshape(len(ks), c, -1)
        gram = torch.matmul(view(0).reshape(c, -1), right.transpose(1, 2))  # (len(ks), C, C)
        for g_k, k in zip(gram, ks):  # added straight into the blocks: no list of terms kept
            for p, sign in by_k[k]:
                upper[p].add_(g_k, alpha=sign)
    t1s = torch.tensor([t1 for t1, _, _ in pairs], device=x.device)
    t2s = torch.tensor([t2 for _, t2, _ in pairs], device=x.device)
    blocks = out.view(c, len(taps), c, len(taps)).permute(1, 3, 0, 2)  # blocks[t1, t2] = block (t1, t2), a view
    blocks[t2s, t1s] = upper.transpose(1, 2)
    blocks[t1s, t2s] = upper


# Below these sizes the border terms and Python overhead of the shifted Gram cost more than the GEMM of unfolded
# patches (measured on a CPU at 3x3 kernels: bench/RESULTS.md, "Torch path without im2col").
SHIFTED_GRAM_MIN_CHANNELS = 8
SHIFTED_GRAM_MIN_POSITIONS = 64


def uses_shifted_gram(channels: int, out_positions: int, stride: IntPair) -> bool:
    """Whether ``conv_covariance_torch`` takes a conv's expand covariance from shifted Grams (else it unfolds)."""
    return (pair(stride) == (1, 1) and channels >= SHIFTED_GRAM_MIN_CHANNELS
            and out_positions >= SHIFTED_GRAM_MIN_POSITIONS)


@register("conv_covariance", "torch")
def conv_covariance_torch(x: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                          dilation: IntPair = 1, *, reduce: bool = False, append_one: bool = False,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv_covariance`` in torch without im2col: reduce from per-tap window sums (any stride); expand with
    stride 1 from shifted Gram matrices (``_shifted_patch_gram``); expand with a stride from the unfolded
    patches (``conv_covariance_reference``). Same result and conventions as the reference."""
    check_tensor("x", x, 4)
    kh, kw = pair(kernel_size)
    d = x.shape[1] * kh * kw
    check_out(out, (d + int(append_one),) * 2, x.device)
    xa = x.to(acc_dtype(x))
    oh, ow = conv_output_size(tuple(x.shape[-2:]), kernel_size, stride, padding, dilation)
    if min(oh, ow) < 1:
        raise ValueError(f"a {tuple(x.shape[-2:])} input gives no output positions for kernel {pair(kernel_size)}, "
                         f"padding {pair(padding)}, dilation {pair(dilation)}")
    if reduce:
        means = _patch_sums(xa, kernel_size, stride, padding, dilation, per_example=True) / (oh * ow)
        return linear_covariance_reference(means, append_one=append_one, out=out)
    if not uses_shifted_gram(x.shape[1], oh * ow, stride) or x.shape[0] == 0:
        return conv_covariance_reference(x, kernel_size, stride, padding, dilation, append_one=append_one, out=out)
    gram = xa.new_empty(d + int(append_one), d + int(append_one))
    _shifted_patch_gram(xa, kernel_size, padding, dilation, gram[:d, :d])
    if append_one:
        sums = _patch_sums(xa, kernel_size, 1, padding, dilation, per_example=False)
        gram[:d, d] = sums
        gram[d, :d] = sums
        gram[d, d] = x.shape[0] * oh * ow
    return accumulate(out, gram)


# ---------------------------------------------------------------------------------------------------------------
# Triton: one kernel for dense rows and implicit-im2col conv patches. Each program owns one tile pair (ti <= tj) of
# the upper triangle and a slice of the rows; it writes its tile and, off the diagonal, the mirrored tile, so the
# lower triangle is never computed. With more than one row slice per tile the tiles meet through atomics.
# ---------------------------------------------------------------------------------------------------------------
from ._triton import HAS_TRITON  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import (LOW_PRECISION, Target, any_float64, cdiv, device_target, fp32_precision,
                                 kernel_dtype, launch, num_programs_target, pick, split_count)

    @triton.jit
    def _col_offsets(cols, D, s1, sC, sH, sW, KH: tl.constexpr, KW: tl.constexpr, DH, DW, IS_CONV: tl.constexpr):
        """Per-column parts of a row-matrix address, computed once per program (hoisted out of the row loop): the
        offset, and for conv patches the tap's row / column displacement (c, ki, kj in ``F.unfold`` order)."""
        if IS_CONV:
            c = cols // (KH * KW)
            kk = cols % (KH * KW)
            dih = (kk // KW) * DH
            diw = (kk % KW) * DW
            return c * sC + dih * sH + diw * sW, dih, diw
        return cols * s1, cols * 0, cols * 0

    @triton.jit
    def _load_rows(x_ptr, rows, row_ok, cols, col_off, dih, diw, D, s0, H, W, OW, R, sB, sH, sW, SH, SW, PH, PW,
                   IS_CONV: tl.constexpr, APPEND_ONE: tl.constexpr):
        """Tile ``X[rows, cols]`` (``rows``: 1-D, ``cols``: 1-D with their hoisted ``_col_offsets``) of the row
        matrix: a dense (M, D) matrix, or the patches of an NCHW tensor (row = b * R + output pixel). Column D is
        the homogeneous 1 when APPEND_ONE; padding and out-of-range entries are 0."""
        mask = row_ok[:, None] & (cols < D)[None, :]
        if IS_CONV:
            b = rows // R
            r = rows % R
            ih0 = (r // OW) * SH - PH
            iw0 = (r % OW) * SW - PW
            ih = ih0[:, None] + dih[None, :]
            iw = iw0[:, None] + diw[None, :]
            mask = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ptr = x_ptr + (b * sB + ih0 * sH + iw0 * sW)[:, None] + col_off[None, :]
        else:
            ptr = x_ptr + (rows * s0)[:, None] + col_off[None, :]
        val = tl.load(ptr, mask=mask, other=0.0)
        if APPEND_ONE:
            val = tl.where(row_ok[:, None] & (cols == D)[None, :], 1.0, val)
        return val.to(x_ptr.dtype.element_ty)

    @triton.jit
    def _gram_kernel(x_ptr, out_ptr, pairs_ptr, M, D, DP, rows_per_split,
                     s0, s1, C, H, W, OW, R, sB, sC, sH, sW,
                     KH: tl.constexpr, KW: tl.constexpr, SH, SW, PH, PW, DH, DW,
                     IS_CONV: tl.constexpr, APPEND_ONE: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
        """out (DP, DP) float32 [+]= X^T X over this program's row slice, for tile pair ``pairs[pid]``."""
        pid = tl.program_id(0)
        ti = tl.load(pairs_ptr + 2 * pid)
        tj = tl.load(pairs_ptr + 2 * pid + 1)
        ci = ti * BLOCK_D + tl.arange(0, BLOCK_D)
        cj = tj * BLOCK_D + tl.arange(0, BLOCK_D)
        off_i, dih_i, diw_i = _col_offsets(ci, D, s1, sC, sH, sW, KH, KW, DH, DW, IS_CONV)
        off_j, dih_j, diw_j = _col_offsets(cj, D, s1, sC, sH, sW, KH, KW, DH, DW, IS_CONV)
        m_lo = tl.program_id(1) * rows_per_split
        m_hi = tl.minimum(M, m_lo + rows_per_split)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            rok = rm < m_hi
            xi = _load_rows(x_ptr, rm, rok, ci, off_i, dih_i, diw_i, D, s0, H, W, OW, R, sB, sH, sW, SH, SW, PH, PW,
                            IS_CONV, APPEND_ONE)
            xj = _load_rows(x_ptr, rm, rok, cj, off_j, dih_j, diw_j, D, s0, H, W, OW, R, sB, sH, sW, SH, SW, PH, PW,
                            IS_CONV, APPEND_ONE)
            acc = tl.dot(tl.trans(xi), xj, acc, input_precision=PRECISION)
        mask = (ci[:, None] < DP) & (cj[None, :] < DP)
        p = out_ptr + ci[:, None] * DP + cj[None, :]
        pt = out_ptr + cj[None, :] * DP + ci[:, None]  # the mirrored tile (j, i), written from the same registers
        # Atomics: tiles of different row slices race here; the interpreter runs programs one after another, so
        # races cannot show in the tests: bench/gpu_check.sh repeats these launches on the GPU and compares.
        if ATOMIC:
            tl.atomic_add(p, acc, mask=mask)
            tl.atomic_add(pt, acc, mask=mask & (ti != tj))
        else:
            tl.store(p, acc, mask=mask)
            tl.store(pt, acc, mask=mask & (ti != tj))

    @triton.jit
    def _patch_mean_kernel(x_ptr, out_ptr, D, s0, s1, C, H, W, OW, R, sB, sC, sH, sW,
                           KH: tl.constexpr, KW: tl.constexpr, SH, SW, PH, PW, DH, DW,
                           BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[b, :D] = mean over output pixels r of the patch of example b (K-FAC reduce), float32."""
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        off, dih, diw = _col_offsets(cols, D, s1, sC, sH, sW, KH, KW, DH, DW, True)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            tile = _load_rows(x_ptr, b * R + rr, rr < R, cols, off, dih, diw, D, s0, H, W, OW, R, sB, sH, sW,
                              SH, SW, PH, PW, True, False)
            acc += tl.sum(tile.to(tl.float32), axis=0)
        tl.store(out_ptr + b * D + cols, acc / R, mask=cols < D)

    class GramConfig(NamedTuple):
        block_d: int
        block_m: int
        warps: int
        stages: int

    def _gram_smem(c: GramConfig, elem: int) -> int:
        """Shared memory of the pipelined operand tiles (Triton allocated stages + 1 buffers for float32 operands
        in bench/compile_check.py) or of the epilogue's layout change of the accumulator, whichever is larger: an
        upper estimate, checked by bench/compile_check.py."""
        return max((c.stages + 1) * 2 * c.block_m * c.block_d * elem, c.block_d * c.block_d * 4)

    def _gram_split(dp: int, m: int, c: GramConfig, target: Optional[Target]) -> int:
        n_pairs = cdiv(dp, c.block_d) * (cdiv(dp, c.block_d) + 1) // 2
        return split_count(n_pairs, num_programs_target(target), max(1, cdiv(m, 4 * c.block_m)))

    def gram_plan(dp: int, m: int, dtype: torch.dtype, target: Optional[Target],
                  split: Optional[int] = None) -> Tuple[GramConfig, int]:
        """``_gram_kernel``'s configuration and row split for a (DP, DP) result over ``m`` rows of ``dtype`` on
        ``target`` (None: the interpreter). 128-wide tiles only for half operands, wide results (>= 512) and no
        split: with atomics (a split) their epilogue spilled 1.5-2.9 KB on every target, and float32 128-wide
        tiles need 128 KB of shared memory (over sm_86 / sm_89's 99 KB). Float32 tiles take 8 warps and 2 stages
        (tf32x3 doubles the operand registers; 4 warps or 3 stages spilled)."""
        if target is None:
            c = GramConfig(16, 16, 4, 1)
            return c, split or _gram_split(dp, m, c, target)
        elem = torch.tensor([], dtype=dtype).element_size()
        if dtype in LOW_PRECISION:
            wide = GramConfig(128, 32, 8, 3)
            if (dp >= 512 and (split or _gram_split(dp, m, wide, target)) == 1
                    and _gram_smem(wide, elem) <= target.smem):
                return wide, 1
            cands = [GramConfig(64, 32, 4, 3), GramConfig(64, 32, 4, 2)]
        else:
            cands = [GramConfig(64, 32, 8, 2), GramConfig(32, 32, 4, 2)]
        c = pick(cands, target, lambda c: _gram_smem(c, elem))
        return c, split or _gram_split(dp, m, c, target)

    def _launch_gram(x: torch.Tensor, m: int, d: int, append_one: bool, conv_args, split: Optional[int]):
        dp = d + int(append_one)
        (block_d, block_m, warps, stages), split = gram_plan(dp, m, x.dtype, device_target(x.device), split)
        nt = cdiv(dp, block_d)
        pairs = torch.tensor([(i, j) for i in range(nt) for j in range(i, nt)], dtype=torch.int32, device=x.device)
        n_pairs = pairs.shape[0]
        rows_per_split = cdiv(cdiv(m, split), block_m) * block_m
        split = cdiv(m, rows_per_split) if m else 1
        buf = (torch.zeros if split > 1 else torch.empty)((dp, dp), dtype=torch.float32, device=x.device)
        if m == 0:
            return buf.zero_()
        launch(_gram_kernel, (n_pairs, split),
               x, buf, pairs, m, d, dp, rows_per_split, *conv_args,
               IS_CONV=x.dim() == 4, APPEND_ONE=append_one, ATOMIC=split > 1, BLOCK_D=block_d, BLOCK_M=block_m,
               PRECISION=fp32_precision(), num_warps=warps, num_stages=stages)
        return buf

    def patch_mean_config(target: Optional[Target]):
        """(BLOCK_D, BLOCK_R, warps) of ``_patch_mean_kernel`` (no shared memory, no dot)."""
        return (16, 16, 4) if target is None else (64, 32, 4)

    def _dense_args(a: torch.Tensor):
        return (a.stride(0), a.stride(1)) + (1,) * 9 + (1, 1, 1, 1, 0, 0, 1, 1)

    def _conv_args(x, kernel_size, stride, padding, dilation):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
        b, c, h, w = x.shape
        oh, ow = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
        return (oh, ow, (0, 0, c, h, w, ow, oh * ow) + tuple(x.stride()) + (kh, kw, sh, sw, ph, pw, dh, dw))

    @register("linear_covariance", "triton")
    def linear_covariance_triton(a: torch.Tensor, *, append_one: bool = False, out: Optional[torch.Tensor] = None,
                                 split: Optional[int] = None) -> torch.Tensor:
        """Triton ``linear_covariance``: ``a: (M, D)`` -> ``(D', D')`` float32 sum (float64 inputs: reference)."""
        check_tensor("a", a, 2)
        d = a.shape[1] + int(append_one)
        check_out(out, (d, d), a.device)
        if any_float64(a, out):
            return linear_covariance_reference(a, append_one=append_one, out=out)
        x = a.to(kernel_dtype(a))
        buf = _launch_gram(x, a.shape[0], a.shape[1], append_one, _dense_args(x), split)
        return accumulate(out, buf)

    @register("conv_covariance", "triton")
    def conv_covariance_triton(x: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                               dilation: IntPair = 1, *, reduce: bool = False, append_one: bool = False,
                               out: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
        """Triton ``conv_covariance`` straight from ``x: (B, C, H, W)``: expand streams patches by implicit
        im2col; reduce first forms the (B, C*kh*kw) patch means (a small tensor), then their Gram matrix."""
        check_tensor("x", x, 4)
        kh, kw = pair(kernel_size)
        d = x.shape[1] * kh * kw
        check_out(out, (d + int(append_one),) * 2, x.device)
        if any_float64(x, out):
            return conv_covariance_reference(x, kernel_size, stride, padding, dilation, reduce=reduce,
                                             append_one=append_one, out=out)
        xk = x.to(kernel_dtype(x))
        oh, ow, args = _conv_args(xk, kernel_size, stride, padding, dilation)
        r = oh * ow
        if not reduce:
            buf = _launch_gram(xk, x.shape[0] * r, d, append_one, args, split)
            return accumulate(out, buf)
        means = torch.empty(x.shape[0], d, dtype=torch.float32, device=x.device)
        block_d, block_r, warps = patch_mean_config(device_target(x.device))
        if x.shape[0]:
            launch(_patch_mean_kernel, (x.shape[0], cdiv(d, block_d)),
                   xk, means, d, *args, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=warps)
        buf = _launch_gram(means, x.shape[0], d, append_one, _dense_args(means), split)
        return accumulate(out, buf)
