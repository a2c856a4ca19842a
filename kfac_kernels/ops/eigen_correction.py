"""EK-FAC eigenvalue correction and eigenbasis self-influence.

For each example b the gradient in the Kronecker eigenbasis is
``Z_b = Q_G^T (sum_r g_br a_br'^T) Q_A = (g_b Q_G)^T (a_b' Q_A)``, a' = [a, 1] when ``append_one``.

* ``eigenvalue_correction``: ``out += sum_b Z_b ** 2`` (D_out, D_in'); the caller divides by its count.
* ``eigenbasis_self_scores``: ``s_b = sum (Z_b ** 2 / (Lambda + damping))`` = <P(grad_b), grad_b>.

For R = 1 the correction is a GEMM of squares: ``(g_rot ** 2)^T (a_rot ** 2)``.
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

import torch

from ..dispatch import register
from ._checks import acc_dtype, accumulate, check_out, check_tensor
from .im2col import ConvPatches, as_rows
from .per_example import check_ag, chunk_size_for, per_example_gradient_parts, rotate_inputs, rotate_patches


def _check_bases(a, g, q_a, q_g, append_one):
    check_ag(a, g)
    check_tensor("q_a", q_a, 2)
    check_tensor("q_g", q_g, 2)
    d_in = a.shape[-1] + int(append_one)
    if q_a.shape != (d_in, d_in):
        raise ValueError(f"q_a has shape {tuple(q_a.shape)}, expected {(d_in, d_in)}")
    if q_g.shape != (g.shape[-1],) * 2:
        raise ValueError(f"q_g has shape {tuple(q_g.shape)}, expected {(g.shape[-1],) * 2}")
    return d_in


def rotate_first_is_cheaper(r: int, d_in: int, d_out: int) -> bool:
    """Whether rotating each position's a and g (``r (d_in'^2 + d_out^2)`` multiply-adds per example) costs no
    more than rotating each example's gradient (``d_out d_in' (d_in' + d_out)``); d_in = d_in'."""
    return r * (d_in * d_in + d_out * d_out) <= d_out * d_in * (d_in + d_out)


def rotated_gradients(a, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, *,
                      append_one: bool = False, chunk_size: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield chunks ``Z: (b, D_out, D_in')`` of per-example gradients in the eigenbasis.

    Two orders give the same Z: rotate a and g per position, then contract over positions (cheaper when R is
    small), or contract first and rotate each example's gradient (cheaper when R exceeds the layer widths).
    ``a`` may be ``ConvPatches``: rotating first is then one convolution on a CPU (``rotate_patches``), and
    contracting first takes the per-example gradients from ``per_example_gradient_parts`` (a grouped convolution
    where that wins on a CPU, unfolded patches elsewhere)."""
    dt = acc_dtype(a, g, q_a, q_g)
    b, r, d_out = g.shape
    d_in = q_a.shape[0]
    rotate_first = rotate_first_is_cheaper(r, d_in, d_out)
    qa, qg = q_a.to(dt), q_g.to(dt)
    per_ex = d_out * d_in * torch.finfo(dt).bits // 8
    step = chunk_size or chunk_size_for(b, per_ex)
    if rotate_first:
        g_rot = (g.to(dt) @ qg).transpose(1, 2)  # (B, D_out, R)
        # On a CPU one convolution, no unfolded patches: a_rot^T (B, D_in', R). Not on CUDA, where cuDNN may
        # convolve in TF32 by default (torch.backends.cudnn.allow_tf32) while GEMMs stay in float32.
        if isinstance(a, ConvPatches) and not a.x.is_cuda:
            a_rot = rotate_patches(a, qa, append_one).transpose(1, 2)
        else:
            a_rot = rotate_inputs(as_rows(a).to(dt), qa, append_one)
        for s in range(0, b, step):
            yield torch.bmm(g_rot[s:s + step], a_rot[s:s + step])
    else:
        # Q_G^T on the output side costs r*d_out^2 per example applied to g's rows, d_out^2*d_in' applied to W
        g_first = r <= d_in
        for s in range(0, b, step):
            g_s = g[s:s + step].to(dt)
            weight, bias = per_example_gradient_parts(a[s:s + step].to(dt), g_s @ qg if g_first else g_s,
                                                      append_one=append_one)
            right = weight @ qa[:weight.shape[-1]]  # [W, b] Q_A with the bias row added in place, no concatenation
            if bias is not None:
                right.addcmul_(bias.unsqueeze(-1), qa[-1])
            yield right if g_first else qg.T @ right


@register("eigenvalue_correction", "torch")
def eigenvalue_correction_reference(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, *,
                                    append_one: bool = False, out: Optional[torch.Tensor] = None,
                                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """``a: (B, R, D_in)``, ``g: (B, R, D_out)`` -> ``out += sum_b Z_b**2``, shape ``(D_out, D_in')``."""
    d_in = _check_bases(a, g, q_a, q_g, append_one)
    check_out(out, (g.shape[-1], d_in), a.device)
    dt = acc_dtype(a, g, q_a, q_g)
    if a.shape[1] == 1:  # R = 1: GEMM of squares
        a_rot = rotate_inputs(as_rows(a)[:, 0].to(dt), q_a.to(dt), append_one)
        g_rot = g[:, 0].to(dt) @ q_g.to(dt)
        return accumulate(out, (g_rot ** 2).T @ (a_rot ** 2))
    total = torch.zeros(g.shape[-1], d_in, dtype=dt, device=a.device)
    for z in rotated_gradients(a, g, q_a, q_g, append_one=append_one, chunk_size=chunk_size):
        total += z.square_().sum(0)  # z is a fresh chunk: squared in place
    return accumulate(out, total)


@register("eigenbasis_self_scores", "torch")
def eigenbasis_self_scores_reference(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor,
                                     eigenvalues: torch.Tensor, damping: Union[float, torch.Tensor], *,
                                     append_one: bool = False, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Self-influence ``(B,)``: ``sum Z_b**2 / (eigenvalues + damping)``."""
    d_in = _check_bases(a, g, q_a, q_g, append_one)
    if eigenvalues.shape != (g.shape[-1], d_in):
        raise ValueError(f"eigenvalues have shape {tuple(eigenvalues.shape)}, expected {(g.shape[-1], d_in)}")
    dt = acc_dtype(a, g, q_a, q_g)
    inv = 1.0 / (eigenvalues.to(dt) + damping)
    parts = [((z ** 2) * inv).sum(dim=(1, 2))
             for z in rotated_gradients(a, g, q_a, q_g, append_one=append_one, chunk_size=chunk_size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dt, device=a.device)


# ---------------------------------------------------------------------------------------------------------------
# Triton. The launchers rotate the inputs once (a' Q_A and g Q_G: two GEMMs, same size as a and g); the kernels
# then form each example's (BLOCK_O, BLOCK_I) tile of Z_b = g_rot^T a_rot on chip, summing over positions, and
# square it into Lambda (or weight it by 1 / (Lambda + damping) for self-scores). Z_b never reaches memory.
# ---------------------------------------------------------------------------------------------------------------
from ._triton import HAS_TRITON  # noqa: E402

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import (LOW_PRECISION, Target, any_float64, cdiv, device_target, fp32_precision,
                                 kernel_dtype, launch, num_programs_target, pick, split_count)

    @triton.jit
    def _ekfac_tile_kernel(g_ptr, a_ptr, out_ptr, inv_ptr, score_ptr, B, R, DO, DI, b_per_split, n_ti,
                           sgb, sgr, sgo, sab, sar, sai,
                           SELF_SCORES: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_O: tl.constexpr,
                           BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        """Per program: one (o, i) tile, examples [b_lo, b_hi). ``g: (B, R, DO)``, ``a: (B, R, DI)`` rotated.
        Correction: out (DO, DI) float32 [+]= sum_b Z_b**2. Self-scores: score[b] += sum Z_b**2 * inv (atomic)."""
        t = tl.program_id(0)
        oo = (t // n_ti) * BLOCK_O + tl.arange(0, BLOCK_O)
        ii = (t % n_ti) * BLOCK_I + tl.arange(0, BLOCK_I)
        omask = oo < DO
        imask = ii < DI
        b_lo = tl.program_id(1) * b_per_split
        b_hi = tl.minimum(B, b_lo + b_per_split)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        if SELF_SCORES:
            inv = tl.load(inv_ptr + oo[:, None] * DI + ii[None, :], mask=omask[:, None] & imask[None, :], other=0.0)
        for b in range(b_lo, b_hi):
            z = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                rmask = rr < R
                gt = tl.load(g_ptr + b * sgb + rr[None, :] * sgr + oo[:, None] * sgo,
                             mask=omask[:, None] & rmask[None, :], other=0.0)
                at = tl.load(a_ptr + b * sab + rr[:, None] * sar + ii[None, :] * sai,
                             mask=rmask[:, None] & imask[None, :], other=0.0)
                z = tl.dot(gt, at, z, input_precision=PRECISION)
            if SELF_SCORES:
                # Atomics: every (o, i) tile adds into score[b]; races cannot show in the interpreter (programs run
                # one at a time) and are covered by bench/gpu_check.sh, which repeats launches and compares.
                tl.atomic_add(score_ptr + b, tl.sum(tl.sum(z * z * inv, axis=1), axis=0))
            else:
                acc += z * z
        if not SELF_SCORES:
            p = out_ptr + oo[:, None] * DI + ii[None, :]
            mask = omask[:, None] & imask[None, :]
            if ATOMIC:  # example slices meet here (see the note above on races)
                tl.atomic_add(p, acc, mask=mask)
            else:
                tl.store(p, acc, mask=mask)

    @triton.jit
    def _square_gemm_kernel(g_ptr, a_ptr, out_ptr, B, DO, DI, b_per_split, n_ti, sgb, sgo, sab, sai,
                            ATOMIC: tl.constexpr, LOW: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                            BLOCK_B: tl.constexpr, PRECISION: tl.constexpr):
        """R = 1: out (DO, DI) [+]= (g_rot**2)^T (a_rot**2) over examples [b_lo, b_hi). The squares are taken in
        float32; LOW: they are rounded to the operands' half dtype and multiplied in it (float32 accumulation),
        as the same-dtype torch composition does; else they are multiplied in float32."""
        t = tl.program_id(0)
        oo = (t // n_ti) * BLOCK_O + tl.arange(0, BLOCK_O)
        ii = (t % n_ti) * BLOCK_I + tl.arange(0, BLOCK_I)
        b_lo = tl.program_id(1) * b_per_split
        b_hi = tl.minimum(B, b_lo + b_per_split)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for b0 in range(b_lo, b_hi, BLOCK_B):
            bb = b0 + tl.arange(0, BLOCK_B)
            bmask = bb < b_hi
            gt = tl.load(g_ptr + bb[None, :] * sgb + oo[:, None] * sgo, mask=bmask[None, :] & (oo < DO)[:, None],
                         other=0.0).to(tl.float32)
            at = tl.load(a_ptr + bb[:, None] * sab + ii[None, :] * sai, mask=bmask[:, None] & (ii < DI)[None, :],
                         other=0.0).to(tl.float32)
            if LOW:
                acc = tl.dot((gt * gt).to(g_ptr.dtype.element_ty), (at * at).to(a_ptr.dtype.element_ty), acc)
            else:
                acc = tl.dot(gt * gt, at * at, acc, input_precision=PRECISION)
        p = out_ptr + oo[:, None] * DI + ii[None, :]
        mask = (oo < DO)[:, None] & (ii < DI)[None, :]
        if ATOMIC:  # example slices meet here; races are checked by bench/gpu_check.sh, not the interpreter
            tl.atomic_add(p, acc, mask=mask)
        else:
            tl.store(p, acc, mask=mask)

    def _rotate(a, g, q_a, q_g, append_one):
        """(a' Q_A, g Q_G) in the kernels' operand dtype; the bias row of Q_A enters as addmm's bias."""
        dt = kernel_dtype(a, g)
        b, r, d_in = a.shape
        qa, qg = q_a.to(dt), q_g.to(dt)
        a2 = a.reshape(b * r, d_in).to(dt)
        if append_one:
            a_rot = torch.addmm(qa[d_in], a2, qa[:d_in])
        else:
            a_rot = a2 @ qa
        g_rot = g.reshape(b * r, -1).to(dt) @ qg
        return a_rot.view(b, r, -1), g_rot.view(b, r, -1)

    def tile_config(dtype: torch.dtype, target: Optional[Target]):
        """(BLOCK_O, BLOCK_I, BLOCK_R, warps, stages) of ``_ekfac_tile_kernel``."""
        if target is None:
            return (16, 16, 16, 4, 1)
        elem = torch.tensor([], dtype=dtype).element_size()
        w = 4 if dtype in LOW_PRECISION else 8
        cands = [(64, 64, 32, w, 3), (64, 64, 32, w, 2)]
        return pick(cands, target, lambda c: c[4] * (c[0] + c[1]) * c[2] * elem)

    def _launch_tiles(a_rot, g_rot, inv=None, split=None):
        b, r, d_in = a_rot.shape
        d_out = g_rot.shape[-1]
        target = device_target(a_rot.device)
        bo, bi, br, warps, stages = tile_config(a_rot.dtype, target)
        n_ti = cdiv(d_in, bi)
        n_tiles = cdiv(d_out, bo) * n_ti
        self_scores = inv is not None
        if self_scores:
            split = split or split_count(n_tiles, num_programs_target(target), max(1, b))
        elif split is None:
            split = split_count(n_tiles, num_programs_target(target), max(1, b // 4))
        b_per = cdiv(b, split)
        split = max(1, cdiv(b, b_per))
        out = torch.zeros((b,) if self_scores else (d_out, d_in), dtype=torch.float32, device=a_rot.device)
        if b == 0:
            return out
        launch(_ekfac_tile_kernel, (n_tiles, split),
               g_rot, a_rot, out, inv if self_scores else out, out, b, r, d_out, d_in, b_per, n_ti,
               *g_rot.stride(), *a_rot.stride(), SELF_SCORES=self_scores, ATOMIC=split > 1, BLOCK_O=bo, BLOCK_I=bi,
               BLOCK_R=br, PRECISION=fp32_precision(), num_warps=warps, num_stages=stages)
        return out

    def square_gemm_config(dtype: torch.dtype, target: Optional[Target]):
        """(BLOCK_O, BLOCK_I, BLOCK_B, warps, stages) of ``_square_gemm_kernel``."""
        if target is None:
            return (16, 16, 16, 4, 1)
        elem = torch.tensor([], dtype=dtype).element_size()
        cands = [(64, 64, 32, 4, 3), (64, 64, 32, 4, 2)]
        return pick(cands, target, lambda c: c[4] * (c[0] + c[1]) * c[2] * elem)

    def _launch_square_gemm(a_rot, g_rot, split=None):
        b, d_in = a_rot.shape
        d_out = g_rot.shape[-1]
        target = device_target(a_rot.device)
        bo, bi, bb, warps, stages = square_gemm_config(a_rot.dtype, target)
        n_ti = cdiv(d_in, bi)
        n_tiles = cdiv(d_out, bo) * n_ti
        if split is None:
            split = split_count(n_tiles, num_programs_target(target), max(1, cdiv(b, 4 * bb)))
        b_per = cdiv(cdiv(b, split), bb) * bb
        split = max(1, cdiv(b, b_per))
        out = torch.zeros((d_out, d_in), dtype=torch.float32, device=a_rot.device)
        if b:
            launch(_square_gemm_kernel, (n_tiles, split),
                   g_rot, a_rot, out, b, d_out, d_in, b_per, n_ti, *g_rot.stride(), *a_rot.stride(),
                   ATOMIC=split > 1, LOW=a_rot.dtype in LOW_PRECISION, BLOCK_O=bo, BLOCK_I=bi, BLOCK_B=bb,
                   PRECISION=fp32_precision(), num_warps=warps, num_stages=stages)
        return out

    @register("eigenvalue_correction", "triton")
    def eigenvalue_correction_triton(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, *,
                                     append_one: bool = False, out: Optional[torch.Tensor] = None,
                                     split: Optional[int] = None) -> torch.Tensor:
        """Triton ``eigenvalue_correction`` -> float32 ``(D_out, D_in')`` (float64 inputs: the reference)."""
        d_in = _check_bases(a, g, q_a, q_g, append_one)
        check_out(out, (g.shape[-1], d_in), a.device)
        if any_float64(a, g, q_a, q_g, out):
            return eigenvalue_correction_reference(a, g, q_a, q_g, append_one=append_one, out=out)
        a_rot, g_rot = _rotate(as_rows(a), g, q_a, q_g, append_one)
        if a.shape[1] == 1:
            total = _launch_square_gemm(a_rot[:, 0], g_rot[:, 0], split)
        else:
            total = _launch_tiles(a_rot, g_rot, split=split)
        return accumulate(out, total)

    @register("eigenbasis_self_scores", "triton")
    def eigenbasis_self_scores_triton(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor,
                                      eigenvalues: torch.Tensor, damping: Union[float, torch.Tensor], *,
                                      append_one: bool = False, split: Optional[int] = None) -> torch.Tensor:
        """Triton ``eigenbasis_self_scores`` -> float32 ``(B,)`` (float64 inputs: the reference)."""
        d_in = _check_bases(a, g, q_a, q_g, append_one)
        if eigenvalues.shape != (g.shape[-1], d_in):
            raise ValueError(f"eigenvalues have shape {tuple(eigenvalues.shape)}, expected {(g.shape[-1], d_in)}")
        if any_float64(a, g, q_a, q_g, eigenvalues, damping):
            return eigenbasis_self_scores_reference(a, g, q_a, q_g, eigenvalues, damping, append_one=append_one)
        inv = (1.0 / (eigenvalues.float() + damping)).contiguous()
        a_rot, g_rot = _rotate(as_rows(a), g, q_a, q_g, append_one)
        return _launch_tiles(a_rot, g_rot, inv=inv, split=split)
