"""Per-example weight gradients ``sum_r g_r [a_r, 1]^T``: the tensor the fused kernels never materialise.

Used by tests as the slow reference and by the torch path in chunks.
"""
from __future__ import annotations

import torch

from ._checks import check_tensor
from .im2col import ConvPatches, as_rows


def check_ag(a, g: torch.Tensor) -> None:
    """a: (B, R, D_in) or ``ConvPatches``, g: (B, R, D_out) with matching B and R."""
    check_tensor("a", a.x if isinstance(a, ConvPatches) else a, 4 if isinstance(a, ConvPatches) else 3)
    check_tensor("g", g, 3)
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a {tuple(a.shape)} and g {tuple(g.shape)} must agree in (batch, positions)")
    if a.device != g.device:
        raise ValueError(f"a is on {a.device} but g on {g.device}")


def per_example_gradients(a, g: torch.Tensor, *, append_one: bool = False) -> torch.Tensor:
    """``a: (B, R, D_in)`` or ``ConvPatches``, ``g: (B, R, D_out)`` -> ``(B, D_out, D_in + append_one)``.

    For ``ConvPatches`` on a CPU the weight part is one convolution weight-gradient with the examples as groups,
    which reads the NCHW input directly (no im2col), where that is faster (``grouped_conv_wins``)."""
    weight, bias = per_example_gradient_parts(a, g, append_one=append_one)
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], dim=-1)


def per_example_gradient_parts(a, g: torch.Tensor, *, append_one: bool = False):
    """``per_example_gradients`` as ``(weight (B, D_out, D_in), bias (B, D_out) or None)``: callers that contract
    the two parts separately never copy them into one tensor."""
    check_ag(a, g)
    # On CUDA the patches are unfolded: cuDNN's grouped weight-gradient is untested here and may be
    # nondeterministic (the fused Triton ops never call this).
    if isinstance(a, ConvPatches) and not a.x.is_cuda and grouped_conv_wins(a, g.shape[-1]):
        weight = _conv_per_example_gradients(a, g)
    else:
        weight = torch.einsum("bro,bri->boi", g, as_rows(a))
    return weight, (g.sum(dim=1) if append_one else None)


def grouped_conv_wins(p: ConvPatches, d_out: int) -> bool:
    """Whether the grouped-convolution weight-gradient beats unfold + einsum on a CPU for these per-example
    gradients: faster for C_in >= C_out up to 160 channels and for >= 1024 output positions, slower for wider
    layers on few positions and for C_out > C_in (oneDNN's grouped kernel, not the arithmetic); the
    measurements behind the rule are in bench/RESULTS.md."""
    c_in = p.x.shape[1]
    return (d_out <= c_in <= 160) or p.shape[1] >= 1024


def _conv_per_example_gradients(p: ConvPatches, g: torch.Tensor) -> torch.Tensor:
    """Weight gradient of each example, ``(B, D_out, C*kh*kw)`` in ``weight.flatten(1)`` order."""
    b, c, h, w = p.x.shape
    d_out = g.shape[-1]
    if b == 0:
        return g.new_zeros(0, d_out, p.shape[-1])
    dt = torch.promote_types(p.x.dtype, g.dtype)
    go = p.grad_as_image(g).to(dt).reshape(1, b * d_out, *p.out_size)
    kernel, stride, padding, dilation = p.geometry
    gw = torch.nn.grad.conv2d_weight(p.x.to(dt).reshape(1, b * c, h, w), (b * d_out, c) + kernel, go,
                                     stride=stride, padding=padding, dilation=dilation, groups=b)
    return gw.reshape(b, d_out, -1)


def _check_q_a(q_a: torch.Tensor, d_in: int, append_one: bool, square: bool = True) -> None:
    rows = d_in + int(append_one)
    if q_a.dim() != 2 or q_a.shape[0] != rows or (square and q_a.shape[1] != rows):
        want = f"{(rows, rows)}" if square else f"({rows}, k)"
        raise ValueError(f"q_a has shape {tuple(q_a.shape)}, expected {want}")


def rotate_inputs(a: torch.Tensor, q_a: torch.Tensor, append_one: bool, square: bool = True) -> torch.Tensor:
    """``[a, 1] @ q_a`` without concatenating the ones column. a: (..., D_in), q_a: (D_in', D_in') (or
    (D_in', k) with ``square=False``: a projection)."""
    d_in = a.shape[-1]
    _check_q_a(q_a, d_in, append_one, square)
    if append_one:  # the ones column's row of q_a enters as addmm's bias: no second pass over the result
        flat = a.reshape(-1, d_in)
        return torch.addmm(q_a[d_in], flat, q_a[:d_in]).reshape(*a.shape[:-1], q_a.shape[1])
    return a @ q_a


def rotate_patches(p: ConvPatches, q_a: torch.Tensor, append_one: bool, square: bool = True) -> torch.Tensor:
    """``[rows(p), 1] @ q_a`` transposed, ``(B, D_in', R)``, as one convolution of ``p.x`` whose D_in' output
    channels are the columns of q_a (the ones row enters as the bias): the same multiply-adds as unfolding and
    multiplying, without the (B, R, C*kh*kw) patch tensor, at the convolution's speed (bench/RESULTS.md)."""
    b, c = p.x.shape[:2]
    d_in = p.shape[-1]
    _check_q_a(q_a, d_in, append_one, square)
    kernel, stride, padding, dilation = p.geometry
    weight = q_a[:d_in].T.reshape(q_a.shape[1], c, *kernel)  # output channel j = column j of q_a
    out = torch.nn.functional.conv2d(p.x.to(q_a.dtype), weight, q_a[d_in] if append_one else None, stride=stride,
                                     padding=padding, dilation=dilation)
    return out.reshape(b, q_a.shape[1], -1)


def chunk_size_for(b: int, bytes_per_example: int, budget_bytes: int = 256 << 20) -> int:
    """How many examples fit in ``budget_bytes`` of per-example scratch (at least 1)."""
    return max(1, min(b, budget_bytes // max(1, bytes_per_example)))
