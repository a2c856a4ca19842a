"""kfac_kernels: tensor-level K-FAC / EK-FAC ops with a torch reference and fused Triton kernels.

Every public op dispatches by device (CUDA -> Triton, else torch); pass ``backend="torch"|"triton"``
or set ``KFAC_KERNELS_BACKEND`` to force one. A Triton kernel that fails on the user's device (by default, not
when forced) falls back to the op's torch implementation with one warning (``dispatch.guarded``).
Shapes: ``a: (B, R, D_in)`` layer inputs per example and position, ``g: (B, R, D_out)`` output gradients,
``append_one`` appends the homogeneous bias coordinate (last index).
Wherever an op takes ``a`` it also takes ``ConvPatches(x, kernel_size, stride, padding, dilation)``: a Conv2d
input ``x: (B, C, H, W)`` standing for its unfolded patches, which the torch path then never materialises.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import dispatch
from .ops import covariance as _cov, eigen_correction as _ec, pairwise as _pw, precondition as _pc  # noqa: F401
from .ops import lowrank as _lr  # noqa: F401
from .ops.lowrank import LowRankQueries, lowrank_queries
from .ops.im2col import ConvPatches, conv_output_size, unfold_conv_input
from .ops.pairwise import Int8Queries, quantize_int8
from .ops.per_example import per_example_gradients


__all__ = [
    "linear_covariance", "conv_covariance", "eigenvalue_correction", "eigenbasis_self_scores", "precondition",
    "pairwise_scores", "per_example_gradients", "unfold_conv_input", "conv_output_size", "Int8Queries",
    "quantize_int8", "dispatch", "ConvPatches", "LowRankQueries", "lowrank_queries", "lowrank_pairwise_scores",
]


def linear_covariance(a: torch.Tensor, *, append_one: bool = False, out: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """``out += [a, 1]^T [a, 1]`` for rows ``a: (M, D)``; returns ``(D', D')`` (a sum, not a mean)."""
    return dispatch.resolve("linear_covariance", a.device, backend)(a, append_one=append_one, out=out)


def conv_covariance(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, *, reduce: bool = False,
                    append_one: bool = False, out: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Patch covariance of ``x: (B, C, H, W)`` (expand) or of per-example patch means (reduce); a sum."""
    return dispatch.resolve("conv_covariance", x.device, backend)(
        x, kernel_size, stride, padding, dilation, reduce=reduce, append_one=append_one, out=out)


def eigenvalue_correction(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, *,
                          append_one: bool = False, out: Optional[torch.Tensor] = None,
                          backend: Optional[str] = None) -> torch.Tensor:
    """``out += sum_b (Q_G^T grad_b Q_A) ** 2``, shape ``(D_out, D_in')``."""
    return dispatch.resolve("eigenvalue_correction", a.device, backend)(
        a, g, q_a, q_g, append_one=append_one, out=out)


def eigenbasis_self_scores(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor,
                           eigenvalues: torch.Tensor, damping: Union[float, torch.Tensor], *,
                           append_one: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Self-influence ``(B,)`` = ``<P(grad_b), grad_b>`` from (a, g) without per-example gradients in memory."""
    return dispatch.resolve("eigenbasis_self_scores", a.device, backend)(
        a, g, q_a, q_g, eigenvalues, damping, append_one=append_one)


def precondition(grads: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, eigenvalues: torch.Tensor,
                 damping: Union[float, torch.Tensor], *, backend: Optional[str] = None) -> torch.Tensor:
    """``Q_G [(Q_G^T V Q_A) / (Lambda + damping)] Q_A^T`` for ``grads: (Q, D_out, D_in')``."""
    return dispatch.resolve("precondition", grads.device, backend)(grads, q_a, q_g, eigenvalues, damping)


def pairwise_scores(a: torch.Tensor, g: torch.Tensor, queries, *, append_one: bool = False,
                    out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``out += S``, ``S[q, b] = <queries[q], sum_r g_br a_br'^T>``, shape ``(Q, B)``."""
    return dispatch.resolve("pairwise_scores", a.device, backend)(a, g, queries, append_one=append_one, out=out)


def lowrank_pairwise_scores(a: torch.Tensor, g: torch.Tensor, queries: LowRankQueries, *, append_one: bool = False,
                            out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``out += S``, ``S[q, b] = <left_q right_q^T, sum_r g_br a_br'^T>`` for rank-k queries
    (``lowrank_queries``), without forming any gradient matrix; shape ``(Q, B)``."""
    return dispatch.resolve("lowrank_pairwise_scores", g.device, backend)(a, g, queries, append_one=append_one,
                                                                           out=out)
