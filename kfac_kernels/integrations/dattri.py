"""dattri on kfac_kernels: ``EKFACAttributor``, a drop-in for ``dattri.algorithm.influence_function.
IFAttributorEKFAC`` (same constructor, ``cache`` and ``attribute``) whose inverse-FIM product on the test
representations runs on ``kfac_kernels.precondition`` (one fused rotate / divide / rotate-back per layer; Triton on
CUDA) instead of three einsum-chained matmuls per layer.

dattri stores eigenbases with eigenvectors as ROWS (``q_s @ v @ q_a.T`` rotates into the eigenbasis) and adds its
absolute ``damping`` to the corrected eigenvalues; kfac_kernels takes eigenvectors as columns, hence the transposes.
dattri 0.3.0 lays a layer's test representation out as ``[vec(W), b]`` reshaped to ``(d_out, d_in + 1)`` (which
is not ``[W | b]`` when there is a bias); the adapter keeps that layout so that its scores equal dattri's.
"""
from __future__ import annotations

import math

import torch
from dattri.algorithm.influence_function import IFAttributorEKFAC

import kfac_kernels as kk

__all__ = ["EKFACAttributor"]


class EKFACAttributor(IFAttributorEKFAC):
    """``IFAttributorEKFAC`` with ``transform_test_rep`` on ``kfac_kernels.precondition``.

    test_rep: ``(Q, sum of tracked parameter sizes)`` flattened as dattri lays them out (per module: weight
    ``(d_out, d_in)`` then bias ``(d_out,)``); returns the preconditioned representations, same layout as dattri's.
    """

    def transform_test_rep(self, ckpt_idx: int, test_rep: torch.Tensor) -> torch.Tensor:
        if ckpt_idx != 0:
            raise ValueError("EK-FAC only supports a single model checkpoint, but got a non-zero ckpt_idx")
        params = {k: p for k, p in self.task.model.named_parameters() if p.requires_grad}
        pieces, offset = {}, 0
        for name in self.layer_name:
            size = math.prod(params[name].shape)
            pieces[name] = test_rep[:, offset:offset + size].reshape(-1, *params[name].shape)
            offset += size
        out = []
        for name in self.module_name:
            w = pieces[name + ".weight"]
            if self.name_to_module[name].bias is not None:
                # dattri's layout, kept as is: [vec(W), b] cut into d_out rows of d_in + 1 (not [W | b])
                flat = torch.cat([w.flatten(start_dim=1), pieces[name + ".bias"].flatten(start_dim=1)], dim=-1)
                v = flat.reshape(-1, w.shape[1], w.shape[2] + 1)
            else:
                v = w
            q_a, q_s = self.cached_q[name]
            lam = self.cached_lambdas[name]
            p = kk.precondition(v.to(lam.dtype), q_a.T.contiguous(), q_s.T.contiguous(), lam, float(self.damping))
            out.append(p.flatten(start_dim=1).to(test_rep.dtype))
        return torch.cat(out, dim=1)
