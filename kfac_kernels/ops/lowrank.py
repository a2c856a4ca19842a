"""Low-rank query gradients: each preconditioned query gradient ``P_q (D_out, D_in')`` replaced by its best rank-k
approximation ``L_q R_q^T`` (truncated SVD, singular values folded into ``L_q``), and scores against training
examples computed without forming any gradient matrix:

    S[q, b] = <L_q R_q^T, sum_r g_br a_br'^T> = sum_r sum_j (g_br . L_q[:, j]) (a_br' . R_q[:, j])

i.e. the examples' output gradients projected on the Q*k left vectors and their inputs on the Q*k right vectors,
multiplied and summed over positions. Cost per example: R (D_out + D_in') Q k multiply-adds, against
D_out D_in' (R + Q) for the full-rank contraction; memory Q k (D_out + D_in') for the queries instead of
Q D_out D_in'.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

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
