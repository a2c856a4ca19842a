"""fit_curvature: K-FAC factors (pass 1), eigendecomposition, EK-FAC eigenvalue correction (pass 2).

Scale conventions (design.md section 2): expand: A = mean over (n, draw, r) of a a^T, G = mean over (n, draw) of
sum_r g g^T; reduce: a = mean_r a_r, g = sum_r g_r, both averaged over (n, draw). EK-FAC: Lambda = mean over
(n, draw) of (Q_G^T DW Q_A)^2 with DW = sum_r g_r a_r^T per draw (and per backpropagated vector for type2).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import (LayerCapture, LayerSpec, calls_as_rows, grads_as_rows, inputs_as_rows, joined_rows,
                       select_layers)
from ..data_iter import num_examples
from ..engine import (Checkpointer, checked, fisher_backprop, forward_capture, iter_groups, model_device_dtype,
                      progress_bar, seeded_rng, total_groups, use_model_mode)
from ..storage import load_tensors, model_fingerprint, save_tensors
from ..tasks.base import Task
from .config import CurvatureConfig
from .curvature import Curvature, tracked_parameters

STATE_FILE = "fit_state.safetensors"


def input_covariance(spec: LayerSpec, xs, approx: str):
    """(sum of a a^T over this chunk, count) for the list of call inputs ``xs`` of one layer."""
    if spec.kind == "conv2d" and len(xs) == 1:
        x = xs[0]
        cov = kk.conv_covariance(x, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                                 reduce=approx == "reduce", append_one=spec.has_bias)
        if approx == "reduce":
            return cov, x.shape[0]
        oh, ow = kk.conv_output_size(tuple(x.shape[-2:]), spec.kernel_size, spec.stride, spec.padding, spec.dilation)
        return cov, x.shape[0] * oh * ow
    a = joined_rows([inputs_as_rows(spec, x) for x in xs])
    if approx == "reduce":
        return kk.linear_covariance(a.mean(dim=1), append_one=spec.has_bias), a.shape[0]
    return kk.linear_covariance(a.reshape(-1, a.shape[-1]), append_one=spec.has_bias), a.shape[0] * a.shape[1]


def output_covariance(spec: LayerSpec, calls, approx: str) -> torch.Tensor:
    g = joined_rows([grads_as_rows(spec, gr) for _, gr in calls])
    rows = g.sum(dim=1) if approx == "reduce" else g.reshape(-1, g.shape[-1])
    return kk.linear_covariance(rows)


class _FitState:
    """Accumulators of a fit in progress; saved to / restored from ``checkpoint_dir``.

    Stage "factors": float64 sums of A and G. Once pass 1 is done (``finish_factors``) those sums give way to the
    per-layer results of the factors stage (``results``: means of A and G and their eigenvalues and eigenvectors),
    which a checkpoint then carries, so a resumed eigenvalue pass uses the very bases it started with and the
    pass holds no float64 copy of A or G. Stage "eigen" adds the float64 sums of the EK-FAC eigenvalues."""

    def __init__(self, specs: Dict[str, LayerSpec], device: torch.device):
        self.stage = "factors"
        self.groups_done = 0
        self.sums: Dict[str, torch.Tensor] = {}
        self.results: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, float] = {}
        for n, s in specs.items():
            self.sums[f"{n}::A"] = torch.zeros(s.d_in_total, s.d_in_total, dtype=torch.float64, device=device)
            self.sums[f"{n}::G"] = torch.zeros(s.d_out, s.d_out, dtype=torch.float64, device=device)
            self.counts[f"{n}::A"] = 0
        self.counts["draws"] = 0

    def finish_factors(self, results: Dict[str, torch.Tensor], specs: Dict[str, LayerSpec], device: torch.device,
                       eigen_pass: bool) -> None:
        """Replace the sums of A and G by ``results``; enter the eigenvalue pass (``eigen_pass``) or finish."""
        self.results = results
        self.sums = {}
        self.stage, self.groups_done = ("eigen" if eigen_pass else "done"), 0
        if eigen_pass:
            for n, s in specs.items():
                self.sums[f"{n}::Lambda"] = torch.zeros(s.d_out, s.d_in_total, dtype=torch.float64, device=device)
            self.counts["eigen_draws"] = 0

    def save(self, path: Path, header: dict) -> None:
        tensors = {**self.sums, **{f"{RESULT}{k}": v for k, v in self.results.items()}}
        save_tensors(path, tensors, {**header, "stage": self.stage, "groups_done": self.groups_done,
                                     "counts": self.counts})

    @classmethod
    def load(cls, path: Path, header: dict, specs, device) -> "_FitState":
        tensors, saved = load_tensors(path)
        for key in ("config", "fingerprint", "num_examples", "batch_size", "num_draws", "task", "model_dtype"):
            if saved.get(key) != header.get(key):
                raise ValueError(f"the checkpoint {path} was made with a different {key} "
                                 f"({saved.get(key)!r} vs {header.get(key)!r}); delete it or use another "
                                 "checkpoint_dir")
        st = cls(specs, device)
        st.stage, st.groups_done, st.counts = saved["stage"], saved["groups_done"], saved["counts"]
        st.sums = {k: v.to(device) for k, v in tensors.items() if not k.startswith(RESULT)}
        st.results = {k[len(RESULT):]: v.to(device) for k, v in tensors.items() if k.startswith(RESULT)}
        if st.stage != "factors" and not st.results:
            raise ValueError(f"the checkpoint {path} was written by an older version of kfac_influence (no "
                             "factor results past the first pass); delete it or use another checkpoint_dir")
        return st


RESULT = "result::"  # checkpoint key prefix of the factors stage's results


def mean_factor(state: "_FitState", name: str, which: str) -> torch.Tensor:
    """A (sum over input rows / their count) or G (sum / number of draws), float64, from pass 1's sums."""
    count = state.counts[f"{name}::A"] if which == "A" else state.counts["draws"]
    return state.sums[f"{name}::{which}"] / max(1, count)


def _eig(mat: torch.Tensor):
    s, q = torch.linalg.eigh(mat.double())
    return s.clamp_min(0), q


def _factor_results(state: "_FitState", specs: Dict[str, LayerSpec], config: CurvatureConfig,
                    model_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Per layer ``{name}::{k}``: A, G (means), QA, QG (eigenvectors from float64 eigh) in ``config.dtype``;
    sA, sG (eigenvalues, float64); for EK-FAC with a model dtype other than ``config.dtype``, QA_pass and QG_pass:
    the eigenvalue pass's bases, rounded from float64 to the model dtype. Each layer's float64 sums are dropped
    as soon as its results exist (no second float64 copy of A or G)."""
    out = {}
    for nm in specs:
        for which in ("A", "G"):
            mean = mean_factor(state, nm, which)
            s, q = _eig(mean)
            out[f"{nm}::{which}"] = mean.to(config.dtype)
            out[f"{nm}::s{which}"] = s
            # contiguous (eigh's are column-major), as a checkpoint loads them: a resumed pass then multiplies by
            # the same layout and rounds the same way
            out[f"{nm}::Q{which}"] = q.to(config.dtype).contiguous()
            if config.method == "ekfac" and model_dtype != config.dtype:
                out[f"{nm}::Q{which}_pass"] = q.to(model_dtype).contiguous()
            del state.sums[f"{nm}::{which}"], mean, q
    return out


def fit_curvature(model: nn.Module, task: Task, data: Any, config: CurvatureConfig = CurvatureConfig(), *,
                  batch_size: int = 32, checkpoint_dir: Optional[os.PathLike] = None, progress: bool = True,
                  model_mode: str = "eval", checkpoint_every: Optional[int] = None) -> Curvature:
    """Fit (E)K-FAC curvature of ``task``'s training loss on ``data``.

    Args:
        batch_size: draws (rows) per forward pass.
        checkpoint_dir: folder for resumable state; an interrupted fit resumed with it gives the same factors.
        model_mode: "eval" (dropout off, default) or "train" (dropout on, masks seeded per chunk); use the same
            mode for scoring.
        checkpoint_every: save every this many groups of examples (default: every 60 s).
    """
    if not isinstance(config, CurvatureConfig):
        raise TypeError("config must be a CurvatureConfig")
    device, dtype = model_device_dtype(model)
    modules = select_layers(model, config.modules, config.exclude)
    capture = LayerCapture(modules)
    specs = capture.specs
    n = num_examples(data)
    if n == 0:
        raise ValueError("the training data is empty")
    m = int(config.num_draws or task.num_draws("train"))
    header = {"kind": "fit_state", "config": config.to_dict(), "num_examples": n, "batch_size": int(batch_size),
              "num_draws": m, "task": type(task).__name__, "model_dtype": str(dtype),
              "fingerprint": model_fingerprint(tracked_parameters(modules))}
    ckpt = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    state = _FitState.load(ckpt, header, specs, device) if ckpt is not None and ckpt.exists() \
        else _FitState(specs, device)
    saver = Checkpointer((lambda done: state.save(ckpt, header)) if ckpt else None, every=checkpoint_every)
    groups = total_groups(data, batch_size, m)

    def run_pass(stage: str, on_chunk) -> None:
        bar = progress_bar(groups, f"curvature {stage}", progress, initial=state.groups_done)
        for g, _, chunks in iter_groups(task, data, "fit", num_draws=m, seed=config.seed, batch_size=batch_size,
                                        start=state.groups_done):
            for c, rows in enumerate(chunks):
                rows = rows.to(device, dtype)
                with seeded_rng(config.seed, g, c, device):
                    f = forward_capture(model, task, capture, rows)
                    on_chunk(rows, f)
            state.groups_done = g + 1
            saver.after_group(g + 1)
            bar.update(1)
        bar.close()

    def backprop(rows, f, on_layer):
        fisher_backprop(capture, task, f, rows, config.fisher, on_layer)

    def factors_chunk(rows, f):
        for name, calls in capture.records.items():
            xs = [x for x, _, _ in calls]
            cov, count = input_covariance(specs[name], xs, config.approx)
            state.sums[f"{name}::A"] += checked(name, cov, [(x, None) for x in xs])
            state.counts[f"{name}::A"] += int(count)
        def add_g(name, calls):
            state.sums[f"{name}::G"] += checked(name, output_covariance(specs[name], calls, config.approx), calls)
        backprop(rows, f, add_g)
        state.counts["draws"] += len(rows)

    with use_model_mode(model, model_mode):
        if state.stage == "factors":
            run_pass("factors", factors_chunk)
            # Eigendecompositions (float64); the sums of A and G give way to the results: the eigenvalue pass
            # holds A, G and their eigenbases in the stored dtype, and a checkpoint carries them (docs/memory.md).
            state.finish_factors(_factor_results(state, specs, config, dtype), specs, device,
                                 eigen_pass=config.method == "ekfac")
            if ckpt:
                state.save(ckpt, header)
        res = state.results
        if state.stage == "eigen":
            bases = {nm: tuple(res.get(f"{nm}::{q}_pass", res[f"{nm}::{q}"]) for q in ("QA", "QG")) for nm in specs}

            def add_lambda(name, calls):
                a, g = calls_as_rows(specs[name], calls, patches=True)
                qa, qg = bases[name]
                state.sums[f"{name}::Lambda"] += checked(name, kk.eigenvalue_correction(
                    a, g, qa, qg, append_one=specs[name].has_bias), calls)

            def eigen_chunk(rows, f):
                backprop(rows, f, add_lambda)
                state.counts["eigen_draws"] += len(rows)

            run_pass("eigenvalues", eigen_chunk)
            state.stage = "done"

    factors = {}
    for nm in specs:
        lam = state.sums[f"{nm}::Lambda"] / max(1, state.counts["eigen_draws"]) if config.method == "ekfac" \
            else torch.outer(res[f"{nm}::sG"], res[f"{nm}::sA"])
        factors[nm] = {k: v.detach().to("cpu", config.dtype) for k, v in
                       dict(A=res[f"{nm}::A"], G=res[f"{nm}::G"], QA=res[f"{nm}::QA"], QG=res[f"{nm}::QG"],
                            sA=res[f"{nm}::sA"], sG=res[f"{nm}::sG"], Lambda=lam).items()}
    curv = Curvature(config, specs, factors, header["fingerprint"], n, m)
    if ckpt:
        state.save(ckpt, header)
    return curv
