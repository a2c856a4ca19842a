"""Influence scores. S[q, n] = grad m(x_q)^T (G_hat + lambda I)^-1 grad l(x_n), summed over tracked layers
(no 1/N, no minus sign: positive = removing x_n is predicted to raise the query's measurement).

``pairwise_scores`` makes ONE pass over the training data for all queries: the preconditioned query gradients are
held on the device and each chunk's per-row training gradients are formed inside the fused contraction
(``kfac_kernels.pairwise_scores``), never for the whole data set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import LayerCapture, calls_as_rows
from ..curvature.curvature import Curvature
from ..data_iter import num_examples
from ..engine import Checkpointer, checked, gradient_chunks, model_device_dtype, total_groups
from ..storage import load_tensors, save_tensors
from ..tasks.base import Task
from .gradients import example_gradients

STATE_FILE = "score_state.safetensors"


def preconditioned_query_gradients(model: nn.Module, task: Task, curvature: Curvature, queries: Any, *,
                                   batch_size: int = 32, progress: bool = False, model_mode: str = "eval",
                                   check_values: bool = True,
                                   groups: Optional[range] = None) -> Dict[str, torch.Tensor]:
    """``{layer: (Q, d_out, d_in')}``: (G_hat + lambda I)^-1 grad m(x_q), on the model's device (``groups``:
    only those query groups, as in ``example_gradients``)."""
    modules = curvature.check_model(model, check_values=check_values)
    grads = example_gradients(model, task, modules, queries, purpose="query", batch_size=batch_size,
                              progress=progress, model_mode=model_mode, groups=groups)
    # a layer at a time, each raw gradient dropped once preconditioned: Q * (W + largest layer), not 2 Q * W
    return {name: curvature.precondition({name: grads.pop(name)})[name] for name in list(grads)}


def pairwise_scores(model: nn.Module, task: Task, curvature: Curvature, queries: Any, train: Any, *,
                    batch_size: int = 32, progress: bool = True, model_mode: str = "eval",
                    checkpoint_dir: Optional[os.PathLike] = None, checkpoint_every: Optional[int] = None,
                    check_values: bool = True, int8_queries: bool = False,
                    preconditioned: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Scores ``(Q, N)`` of every query against every training example (float32, or float64 for float64 models).

    Args:
        batch_size: draws (rows) per forward pass.
        checkpoint_dir: resumable state of the training pass (same result after an interruption).
        int8_queries: quantise the preconditioned query gradients to int8 (per query and layer affine).
        preconditioned: precomputed ``preconditioned_query_gradients`` (skips the query pass).
    """
    modules = curvature.check_model(model, check_values=check_values)
    device, mdtype = model_device_dtype(model)
    pre = preconditioned if preconditioned is not None else preconditioned_query_gradients(
        model, task, curvature, queries, batch_size=batch_size, progress=progress, model_mode=model_mode,
        check_values=False)
    pre = {k: (kk.quantize_int8(v) if int8_queries else v.to(device=device, dtype=mdtype)) for k, v in pre.items()}
    nq = next(iter(pre.values())).q.shape[0] if int8_queries else next(iter(pre.values())).shape[0]
    n = num_examples(train)
    m = task.num_draws("train")
    acc_dtype = torch.float64 if mdtype == torch.float64 else torch.float32
    scores = torch.zeros(nq, n, dtype=acc_dtype, device=device)
    start = 0
    ckpt = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    header = {"kind": "score_state", "num_queries": nq, "num_examples": n, "batch_size": batch_size,
              "num_draws": m, "fingerprint": curvature.fingerprint, "seed": task.seed}
    if ckpt is not None and ckpt.exists():
        tensors, saved = load_tensors(ckpt)
        for key in ("num_queries", "num_examples", "batch_size", "num_draws", "fingerprint", "seed"):
            if saved.get(key) != header[key]:
                raise ValueError(f"the checkpoint {ckpt} was made with a different {key}; delete it or use "
                                 "another checkpoint_dir")
        scores = tensors["scores"].to(device)
        start = saved["groups_done"]
    capture = LayerCapture(dict(modules))
    specs = capture.specs

    def on_chunk(g, idx, rows, backward):
        cols = rows.example.to(device)
        part = torch.zeros(nq, len(rows), dtype=acc_dtype, device=device)

        def on_layer(name, calls):  # during the backward pass, as the layer's output gradient appears
            a, gr = calls_as_rows(specs[name], calls, patches=True)
            part.add_(checked(name, kk.pairwise_scores(a, gr, pre[name], append_one=specs[name].has_bias),
                              calls).to(acc_dtype))
        backward(on_layer)
        scores.index_add_(1, cols, part)

    def save(done):
        save_tensors(ckpt, {"scores": scores}, {**header, "groups_done": done})

    saver = Checkpointer(save if ckpt else None, every=checkpoint_every)
    for g, idx, rows, grads in gradient_chunks(model, task, capture, train, "train", num_draws=m, seed=task.seed,
                                               batch_size=batch_size, progress=progress, model_mode=model_mode,
                                               start=start, desc="pairwise scores", after_group=saver.after_group,
                                               stream=True):
        on_chunk(g, idx, rows, grads)
    if ckpt is not None:
        save(total_groups(train, batch_size, m))
    return scores


def self_scores(model: nn.Module, task: Task, curvature: Curvature, train: Any, *, batch_size: int = 32,
                progress: bool = True, model_mode: str = "eval", check_values: bool = True,
                groups: Optional[range] = None) -> torch.Tensor:
    """Self-influence ``(N,)``: grad l(x_n)^T (G_hat + lambda I)^-1 grad l(x_n) with the measurement = train loss.

    When all of an example group's draws fit in one chunk the fused ``eigenbasis_self_scores`` op is used;
    otherwise the group's per-example gradients are accumulated over chunks, then rotated. ``groups``: score
    only this range of example groups (``max(1, batch_size // M)`` examples each; the others stay 0), as
    ``kfac_influence.distributed.self_scores`` does for a rank's shard.
    """
    modules = curvature.check_model(model, check_values=check_values)
    device, mdtype = model_device_dtype(model)
    n = num_examples(train)
    m = task.num_draws("train")
    acc_dtype = torch.float64 if mdtype == torch.float64 else torch.float32
    out = torch.zeros(n, dtype=acc_dtype, device=device)
    capture = LayerCapture(dict(modules))
    specs = capture.specs
    pending: Dict[str, torch.Tensor] = {}

    def flush(idx):
        pre = curvature.precondition(pending)
        for name, v in pending.items():
            out[idx] += (pre[name].to(acc_dtype) * v.to(acc_dtype)).flatten(1).sum(1)
        pending.clear()

    def on_chunk(g, idx, rows, backward):
        whole = len(rows) == len(idx) * m  # the whole group is in this chunk
        local = rows.example.to(device) - int(idx[0])

        def on_layer(name, calls):  # during the backward pass
            # draws of an example become extra positions below, which ConvPatches cannot express: rows then
            a, gr = calls_as_rows(specs[name], calls, patches=m == 1 or not whole)
            s = specs[name]
            if whole:
                qa, qg, lam = curvature.on(name, device, mdtype)
                b = len(idx)
                a3 = a if m == 1 else a.reshape(b, -1, a.shape[-1])
                g3 = gr if m == 1 else gr.reshape(b, -1, gr.shape[-1])
                part = kk.eigenbasis_self_scores(a3, g3, qa, qg, lam, curvature.damping(name), append_one=s.has_bias)
                out[idx.to(device)] += checked(name, part, calls).to(acc_dtype)
            else:
                per_row = kk.per_example_gradients(a, gr, append_one=s.has_bias)
                if name not in pending:
                    pending[name] = torch.zeros((len(idx),) + s.grad_shape, dtype=mdtype, device=device)
                pending[name].index_add_(0, local, checked(name, per_row, calls))
        backward(on_layer)
        if not whole and int(rows.example[-1]) == int(idx[-1]) and int(rows.draw[-1]) == m - 1:
            flush(idx.to(device))

    span = groups if groups is not None else range(0, total_groups(train, batch_size, m))
    for g, idx, rows, grads in gradient_chunks(model, task, capture, train, "train", num_draws=m, seed=task.seed,
                                               batch_size=batch_size, progress=progress, model_mode=model_mode,
                                               desc="self scores", start=span.start, stop=span.stop,
                                               stream=True):
        on_chunk(g, idx, rows, grads)
    return out
