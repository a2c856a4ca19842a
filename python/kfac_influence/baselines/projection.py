"""Kronecker-structured random projection of per-example layer gradients (LoGra's idea), without building them.

For a layer with per-example gradient ``G = sum_r g_r a_r'^T`` (``d_out x d_in'``, a' = [a, 1] with a bias), the
projection is ``P_out G P_in^T = sum_r (P_out g_r)(P_in a_r')^T`` (``k_out x k_in``), flattened row-major. In
vectorised form this is the dense projection ``kron(P_out, P_in) @ vec(G)`` (row-major vec), which the tests use
as the reference. Entries are Gaussian with variance 1/k so that ``E[P^T P] = I`` (inner products preserved in
expectation). A layer whose dimension does not exceed the target (``d <= k``) is not projected on that side
(identity, exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from ..capture import LayerSpec


@dataclass(frozen=True)
class ProjectionConfig:
    """``dim_in`` (k_in) and ``dim_out`` (k_out) per layer (0: no projection on that side); ``seed``."""
    dim_in: int = 16
    dim_out: int = 16
    seed: int = 0

    def __post_init__(self):
        if int(self.dim_in) < 0 or int(self.dim_out) < 0:
            raise ValueError(f"projection dims must be >= 0, got {self.dim_in}, {self.dim_out}")


def _gaussian(rows: int, cols: int, seed: int, layer: int, side: int) -> torch.Tensor:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, layer, side, 23]).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / np.sqrt(rows)


class KroneckerProjector:
    """Per-layer ``P_in (k_in, d_in')`` and ``P_out (k_out, d_out)``; the projected gradient of all layers is the
    concatenation, in layer order, of each layer's flattened ``k_out x k_in`` block: ``dim = sum k_out k_in``."""

    def __init__(self, specs: Mapping[str, LayerSpec], config: ProjectionConfig = ProjectionConfig()):
        self.config = config
        self.specs = dict(specs)
        self.p_in: Dict[str, Optional[torch.Tensor]] = {}
        self.p_out: Dict[str, Optional[torch.Tensor]] = {}
        self.offsets: Dict[str, Tuple[int, int]] = {}
        off = 0
        for i, (name, s) in enumerate(self.specs.items()):
            din, dout = s.d_in_total, s.d_out
            self.p_in[name] = _gaussian(config.dim_in, din, config.seed, i, 0) \
                if 0 < config.dim_in < din else None
            self.p_out[name] = _gaussian(config.dim_out, dout, config.seed, i, 1) \
                if 0 < config.dim_out < dout else None
            k = self.block_shape(name)
            self.offsets[name] = (off, off + k[0] * k[1])
            off += k[0] * k[1]
        self.dim = off
        self._cache: Dict = {}

    def block_shape(self, name: str) -> Tuple[int, int]:
        s = self.specs[name]
        ko = s.d_out if self.p_out[name] is None else self.p_out[name].shape[0]
        ki = s.d_in_total if self.p_in[name] is None else self.p_in[name].shape[0]
        return ko, ki

    def _mats(self, name: str, device, dtype):
        key = (name, str(device), dtype)
        if key not in self._cache:
            conv = lambda p: None if p is None else p.to(device=device, dtype=dtype)  # noqa: E731
            self._cache[key] = (conv(self.p_in[name]), conv(self.p_out[name]))
        return self._cache[key]

    def project_rows(self, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Projected per-row gradients ``(n, k_out * k_in)`` from ``a: (n, R, d_in)`` (bias coordinate appended
        here when the layer has one) and ``g: (n, R, d_out)``; no ``(n, d_out, d_in')`` tensor is formed."""
        s = self.specs[name]
        p_in, p_out = self._mats(name, a.device, a.dtype)
        if p_in is not None:
            pa = a @ p_in[:, :s.d_in].T
            if s.has_bias:
                pa = pa + p_in[:, s.d_in]
        else:
            pa = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1) if s.has_bias else a
        pg = g @ p_out.T if p_out is not None else g
        return torch.einsum("nro,nri->noi", pg, pa).reshape(a.shape[0], -1)

    def project_gradients(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{layer: (N, d_out, d_in')}`` -> ``(N, dim)`` (explicit gradients; the slow path and test helper)."""
        parts = []
        for name in self.specs:
            v = grads[name]
            p_in, p_out = self._mats(name, v.device, v.dtype)
            if p_out is not None:
                v = p_out @ v
            if p_in is not None:
                v = v @ p_in.T
            parts.append(v.reshape(v.shape[0], -1))
        return torch.cat(parts, 1)

    def dense_matrix(self, name: str) -> torch.Tensor:
        """The equivalent dense projection ``(k_out k_in, d_out d_in')`` of one layer: ``kron(P_out, P_in)``."""
        s = self.specs[name]
        p_in = self.p_in[name] if self.p_in[name] is not None else torch.eye(s.d_in_total, dtype=torch.float64)
        p_out = self.p_out[name] if self.p_out[name] is not None else torch.eye(s.d_out, dtype=torch.float64)
        return torch.kron(p_out, p_in)
