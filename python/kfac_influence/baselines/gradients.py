"""Gradient passes for the baselines, on the engine's draw machinery (same seeds, batching and capture as the
influence pipeline): Kronecker-projected per-example gradients, and exact per-example gradients one group of
examples at a time.

Per-example gradient of example n = mean over its M draws of the gradient of the per-draw value ``output(f, rows)``
(default: ``task.measurement`` for purpose "query", ``task.train_loss`` otherwise).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import LayerCapture, calls_as_rows, select_layers
from ..data_iter import num_examples
from ..engine import draw_pass, model_device_dtype
from ..tasks.base import Draws, Task
from .projection import KroneckerProjector

OutputFn = Callable[[torch.Tensor, Draws], torch.Tensor]


def default_output(task: Task, purpose: str) -> OutputFn:
    return task.measurement if purpose == "query" else task.train_loss


def _chunks(model, task, capture, data, *, purpose, num_draws, seed, draws_per_forward, output, progress,
            model_mode):
    """Yield ``(group, group_indices, draws, {layer: (a, g)})`` for every chunk: the captured rows of each
    layer, gathered from one backward pass."""
    m = int(num_draws or task.num_draws(purpose))
    seed = task.seed if seed is None else int(seed)
    output = output or default_output(task, purpose)
    for chunk in draw_pass(model, task, capture, data, purpose, num_draws=m, seed=seed,
                           draws_per_forward=draws_per_forward, progress=progress, model_mode=model_mode,
                           desc=f"{purpose} gradients"):
        ag = {}
        chunk.backward(output(chunk.outputs, chunk.draws),
                       lambda name, calls: ag.__setitem__(name, calls_as_rows(capture.specs[name], calls)))
        yield chunk.group, chunk.examples, chunk.draws, ag


def projected_gradients(model: nn.Module, task: Task, data: Any, projector: KroneckerProjector, *,
                        purpose: str = "train", num_draws: Optional[int] = None, seed: Optional[int] = None,
                        draws_per_forward: int = 64, output: Optional[OutputFn] = None, progress: bool = False,
                        model_mode: str = "eval") -> torch.Tensor:
    """``(N, projector.dim)`` float32: ``sum_r (P_out g_r)(P_in a_r')^T`` per row, times the row weight 1/M,
    summed into its example. Neither per-example nor per-row full gradients are formed."""
    modules = {n: m for n, m in select_layers(model).items() if n in projector.specs}
    missing = set(projector.specs) - set(modules)
    if missing:
        raise ValueError(f"the projector has layers the model lacks: {sorted(missing)[:5]}")
    capture = LayerCapture(modules)
    device, mdtype = model_device_dtype(model)
    out = torch.zeros(num_examples(data), projector.dim, dtype=torch.float64, device=device)
    for _, _, rows, ag in _chunks(model, task, capture, data, purpose=purpose, num_draws=num_draws, seed=seed,
                                  draws_per_forward=draws_per_forward, output=output, progress=progress, model_mode=model_mode):
        idx = rows.example.to(device)
        for name, (a, g) in ag.items():
            lo, hi = projector.offsets[name]
            out[:, lo:hi].index_add_(0, idx, projector.project_rows(name, a, g).double())
    return out.float()


def iter_example_gradients(model: nn.Module, task: Task, modules: Mapping[str, nn.Module], data: Any, *,
                           purpose: str = "train", num_draws: Optional[int] = None, seed: Optional[int] = None,
                           draws_per_forward: int = 64, output: Optional[OutputFn] = None, progress: bool = False,
                           model_mode: str = "eval") -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Yield ``(indices (B,), {layer: (B, d_out, d_in')})`` one group of examples at a time (B = draws_per_forward // M
    examples): exact per-example gradients, held for one group only."""
    capture = LayerCapture(dict(modules))
    device, mdtype = model_device_dtype(model)
    cur_g, cur_idx, acc = None, None, None
    for g, idx, rows, ag in _chunks(model, task, capture, data, purpose=purpose, num_draws=num_draws, seed=seed,
                                    draws_per_forward=draws_per_forward, output=output, progress=progress,
                                    model_mode=model_mode):
        if g != cur_g:
            if acc is not None:
                yield cur_idx, acc
            cur_g, cur_idx = g, idx
            acc = {n: torch.zeros((len(idx),) + s.grad_shape, dtype=mdtype, device=device)
                   for n, s in capture.specs.items()}
        local = rows.example.to(device) - int(idx[0])
        for name, (a, gr) in ag.items():
            acc[name].index_add_(0, local, kk.per_example_gradients(a, gr, append_one=capture.specs[name].has_bias))
    if acc is not None:
        yield cur_idx, acc
