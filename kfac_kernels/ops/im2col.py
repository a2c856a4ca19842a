"""Explicit im2col for Conv2d inputs: the slow, readable reference the fused kernels avoid.

Convention: a conv weight (C_out, C_in, kh, kw) is a matrix (C_out, C_in*kh*kw) in ``weight.flatten(1)`` order
(channel-major, then kernel row, then kernel column), which is the order of ``F.unfold``.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F

IntPair = Union[int, Tuple[int, int]]


def pair(v: IntPair) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return (int(v[0]), int(v[1]))


def conv_output_size(size: Tuple[int, int], kernel_size: IntPair, stride: IntPair, padding: IntPair,
                     dilation: IntPair) -> Tuple[int, int]:
    k, s, p, d = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
    return tuple((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def unfold_conv_input(x: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                      dilation: IntPair = 1) -> torch.Tensor:
    """Patches of ``x: (B, C, H, W)`` as ``(B, R, C*kh*kw)`` with R = output positions (row-major)."""
    if x.dim() != 4:
        raise ValueError(f"conv input must be (B, C, H, W), got shape {tuple(x.shape)}")
    cols = F.unfold(x, pair(kernel_size), dilation=pair(dilation), padding=pair(padding), stride=pair(stride))
    return cols.transpose(1, 2)


class ConvPatches:
    """A Conv2d input kept as ``x: (B, C, H, W)`` standing for its patch rows ``a: (B, R, C*kh*kw)``.

    Ops take it wherever they take ``a``. The torch path then never unfolds where it need not: per-example
    gradients come from one grouped convolution, and patch covariances from shifted Gram matrices; other paths
    call ``rows()``. Slicing (``p[s:e]``) selects examples; ``shape``, ``device`` and ``dtype`` are those of the rows.
    """

    __slots__ = ("x", "kernel_size", "stride", "padding", "dilation", "out_size")

    def __init__(self, x: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                 dilation: IntPair = 1):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"conv input must be a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        self.x = x
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.out_size = conv_output_size(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.padding,
                                         self.dilation)
        if min(self.out_size) < 1:
            raise ValueError(f"a {tuple(x.shape[-2:])} input gives no output positions for kernel "
                             f"{self.kernel_size}, padding {self.padding}, dilation {self.dilation}")

    @property
    def geometry(self) -> tuple:
        """(kernel_size, stride, padding, dilation) as pairs."""
        return self.kernel_size, self.stride, self.padding, self.dilation

    @property
    def shape(self) -> torch.Size:
        b, c = self.x.shape[:2]
        return torch.Size((b, self.out_size[0] * self.out_size[1], c * self.kernel_size[0] * self.kernel_size[1]))

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def __getitem__(self, index: slice) -> "ConvPatches":
        if not isinstance(index, slice):
            raise TypeError("ConvPatches can only be sliced along the batch (p[start:stop])")
        return ConvPatches(self.x[index], *self.geometry)

    def to(self, dtype: torch.dtype) -> "ConvPatches":
        return self if dtype == self.x.dtype else ConvPatches(self.x.to(dtype), *self.geometry)

    def rows(self) -> torch.Tensor:
        """The unfolded patches ``(B, R, C*kh*kw)``."""
        return unfold_conv_input(self.x, *self.geometry)

    def grad_as_image(self, g: torch.Tensor) -> torch.Tensor:
        """Output-gradient rows ``g: (B, R, D_out)`` -> ``(B, D_out, OH, OW)`` (a view when g came from NCHW)."""
        return g.transpose(1, 2).reshape(g.shape[0], g.shape[2], *self.out_size)


def as_rows(a) -> torch.Tensor:
    """Patch rows of ``a`` (a tensor is returned as is, ``ConvPatches`` unfolded)."""
    return a.rows() if isinstance(a, ConvPatches) else a
