"""kronfluence 1.0.x on kfac_kernels ops: ``with use_kfac_kernels(): analyzer.fit_all_factors(...)``.

Inside the context, for tracked ``nn.Linear`` / ``nn.Conv2d`` modules (kronfluence's ``TrackedLinear`` /
``TrackedConv2d``):

* covariance stage: the activation covariance of a Conv2d comes from ``kfac_kernels.conv_covariance`` on the raw
  NCHW input (no im2col tensor; the Triton kernel forms patches on chip), of a Linear from ``linear_covariance``;
  the gradient covariance stays kronfluence's (one GEMM already).
* lambda stage (EK-FAC eigenvalue correction): ``kfac_kernels.eigenvalue_correction(a, g, Q_A, Q_G)`` instead of
  materialising per-sample gradients then rotating them.
* pairwise stage: ``TrackedModule.compute_pairwise_score`` becomes ``kfac_kernels.pairwise_scores(a, g, P)`` (the
  train gradients are formed tile by tile, never for the whole batch).

Conventions are kronfluence's (weight and bias as one (d_out, d_in + 1) matrix, bias last, conv weights in
``F.unfold`` order), which are also ours, so results equal kronfluence's own up to float rounding. Cases the ops
do not cover fall back to kronfluence's code: attention masks, grouped or non-zero-padded convolutions, string
padding other than "valid", shared parameters (``has_shared_parameters``), low-rank query gradients, per-token
scores, ``per_sample_gradient_process_fnc``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from kronfluence.factor.config import FactorConfig
from kronfluence.module.conv2d import TrackedConv2d
from kronfluence.module.linear import TrackedLinear
from kronfluence.module.tracker.factor import CovarianceTracker, LambdaTracker
from kronfluence.utils.constants import (ACTIVATION_COVARIANCE_MATRIX_NAME, ACTIVATION_EIGENVECTORS_NAME,
                                         GRADIENT_EIGENVECTORS_NAME, LAMBDA_MATRIX_NAME,
                                         NUM_ACTIVATION_COVARIANCE_PROCESSED, NUM_LAMBDA_PROCESSED)
from kronfluence.utils.exceptions import FactorsNotFoundError

import kfac_kernels as kk

__all__ = ["use_kfac_kernels", "layer_rows"]


def _conv_geometry(m: nn.Conv2d) -> Optional[Tuple]:
    if m.groups != 1 or m.padding_mode != "zeros":
        return None
    pad = m.padding
    if isinstance(pad, str):
        if pad != "valid":
            return None
        pad = (0, 0)
    return tuple(m.kernel_size), tuple(m.stride), tuple(pad), tuple(m.dilation)


def _supported(tm) -> bool:
    if tm.attention_mask is not None or tm.per_sample_gradient_process_fnc is not None:
        return False
    if isinstance(tm, TrackedConv2d):
        return _conv_geometry(tm.original_module) is not None
    return isinstance(tm, TrackedLinear)


def layer_rows(tm, x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """kronfluence module input ``x`` and output gradient ``g`` -> ``a: (B, R, d_in)``, ``g: (B, R, d_out)``."""
    if isinstance(tm, TrackedConv2d):
        k, s, p, d = _conv_geometry(tm.original_module)
        return kk.unfold_conv_input(x, k, s, p, d), g.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])


def _has_bias(tm) -> bool:
    return tm.original_module.bias is not None


# ------------------------------------------------------------------------------------------ covariance stage
def _covariance_register_hooks(self: CovarianceTracker) -> None:
    tm = self.module
    if not _supported(tm):
        return _ORIGINAL["cov_hooks"](self)

    @torch.no_grad()
    def forward_hook(module, inputs, outputs):
        x = inputs[0].detach().to(dtype=tm.factor_args.activation_covariance_dtype)
        if isinstance(tm, TrackedConv2d):
            k, s, p, d = _conv_geometry(tm.original_module)
            cov = kk.conv_covariance(x, k, s, p, d, append_one=_has_bias(tm))
            oh, ow = kk.conv_output_size(tuple(x.shape[-2:]), k, s, p, d)
            count = x.shape[0] * oh * ow
        else:
            rows = x.reshape(-1, x.shape[-1])
            cov = kk.linear_covariance(rows, append_one=_has_bias(tm))
            count = rows.shape[0]
        if not self._activation_covariance_initialized:
            tm.storage[NUM_ACTIVATION_COVARIANCE_PROCESSED] = torch.zeros((1,), dtype=torch.int64)
            tm.storage[ACTIVATION_COVARIANCE_MATRIX_NAME] = torch.zeros_like(cov, dtype=x.dtype)
            self._activation_covariance_initialized = True
        tm.storage[NUM_ACTIVATION_COVARIANCE_PROCESSED].add_(count)
        tm.storage[ACTIVATION_COVARIANCE_MATRIX_NAME].add_(cov.to(x.dtype))
        self.cached_hooks.append(outputs.register_hook(backward_hook))

    @torch.no_grad()
    def backward_hook(output_gradient):
        self.cached_hooks.pop().remove()
        g = output_gradient.detach().to(dtype=tm.factor_args.gradient_covariance_dtype)
        g, count = tm.get_flattened_gradient(output_gradient=g)
        self._update_gradient_covariance_matrix(output_gradient=g, count=count)

    self.registered_hooks.append(tm.register_forward_hook(forward_hook))


# ---------------------------------------------------------------------------------------------- lambda stage
def _lambda_register_hooks(self: LambdaTracker) -> None:
    tm = self.module
    strategy = FactorConfig.CONFIGS[tm.factor_args.strategy]
    if not _supported(tm) or tm.factor_args.has_shared_parameters or \
            not strategy.requires_eigendecomposition_for_lambda:
        return _ORIGINAL["lambda_hooks"](self)

    @torch.no_grad()
    def forward_hook(module, inputs, outputs):
        self.cached_activations = inputs[0].detach().to(dtype=tm.factor_args.per_sample_gradient_dtype, copy=True)
        self.cached_hooks.append(outputs.register_hook(backward_hook))

    @torch.no_grad()
    def backward_hook(output_gradient):
        if self.cached_activations is None:
            self._raise_cache_not_found_exception()
        self.cached_hooks.pop().remove()
        g = output_gradient.detach().to(dtype=tm.factor_args.per_sample_gradient_dtype)
        a, g = layer_rows(tm, self.cached_activations.to(device=g.device), g)
        self.clear_all_cache()
        st = tm.storage
        dt = tm.factor_args.lambda_dtype
        if st[NUM_LAMBDA_PROCESSED] is None:
            if st[ACTIVATION_EIGENVECTORS_NAME] is None or st[GRADIENT_EIGENVECTORS_NAME] is None:
                raise FactorsNotFoundError(f"the strategy {tm.factor_args.strategy} needs eigendecomposition "
                                           "results for Lambda, but they are not found")
            st[NUM_LAMBDA_PROCESSED] = torch.zeros((1,), dtype=torch.int64)
            st[LAMBDA_MATRIX_NAME] = torch.zeros((g.shape[-1], a.shape[-1] + int(_has_bias(tm))), dtype=dt,
                                                 device=g.device)
            for key in (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME):
                st[key] = st[key].to(dtype=a.dtype, device=g.device)
        lam = kk.eigenvalue_correction(a, g, st[ACTIVATION_EIGENVECTORS_NAME], st[GRADIENT_EIGENVECTORS_NAME],
                                       append_one=_has_bias(tm))
        scale = tm.gradient_scale ** 2 if tm.gradient_scale != 1.0 else 1.0
        st[NUM_LAMBDA_PROCESSED].add_(a.shape[0])
        st[LAMBDA_MATRIX_NAME].add_(lam.to(dt), alpha=scale)

    self.registered_hooks.append(tm.register_forward_hook(forward_hook))


# -------------------------------------------------------------------------------------------- pairwise stage
def _pairwise_score(original):
    def compute_pairwise_score(self, preconditioned_gradient, input_activation, output_gradient):
        if isinstance(preconditioned_gradient, list) or not _supported(self) or \
                self.score_args.compute_per_token_scores:
            return original(self, preconditioned_gradient, input_activation, output_gradient)
        a, g = layer_rows(self, input_activation, output_gradient)
        p = preconditioned_gradient.to(dtype=a.dtype)
        return kk.pairwise_scores(a, g, p, append_one=_has_bias(self)).to(preconditioned_gradient.dtype)
    return compute_pairwise_score


_ORIGINAL = {}


@contextlib.contextmanager
def use_kfac_kernels() -> Iterator[None]:
    """Within the block, kronfluence's covariance, lambda and pairwise stages run on kfac_kernels ops.

    Patches kronfluence's classes (process-wide) and restores them on exit; not re-entrant across threads."""
    if _ORIGINAL:
        raise RuntimeError("use_kfac_kernels() is already active")
    _ORIGINAL.update(cov_hooks=CovarianceTracker.register_hooks, lambda_hooks=LambdaTracker.register_hooks,
                     lin_pair=TrackedLinear.compute_pairwise_score, conv_pair=TrackedConv2d.compute_pairwise_score)
    CovarianceTracker.register_hooks = _covariance_register_hooks
    LambdaTracker.register_hooks = _lambda_register_hooks
    TrackedLinear.compute_pairwise_score = _pairwise_score(_ORIGINAL["lin_pair"])
    TrackedConv2d.compute_pairwise_score = _pairwise_score(_ORIGINAL["conv_pair"])
    try:
        yield
    finally:
        CovarianceTracker.register_hooks = _ORIGINAL["cov_hooks"]
        LambdaTracker.register_hooks = _ORIGINAL["lambda_hooks"]
        TrackedLinear.compute_pairwise_score = _ORIGINAL["lin_pair"]
        TrackedConv2d.compute_pairwise_score = _ORIGINAL["conv_pair"]
        _ORIGINAL.clear()
