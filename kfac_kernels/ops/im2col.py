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
