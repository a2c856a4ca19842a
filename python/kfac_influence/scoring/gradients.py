"""Per-example gradients of a measurement (queries) or of the training loss, as per-layer matrices
``(Q, d_out, d_in')``: the mean over each example's draws of sum_r g a'^T. Queries are few, so they are stored."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import LayerCapture, calls_as_rows
from ..data_iter import num_examples
from ..engine import (check_draws_per_forward, draw_pass, examples_of_groups, finite_layer_sum, model_device_dtype,
                      total_groups)
from ..tasks.base import Task


def example_gradients(model: nn.Module, task: Task, modules: Mapping[str, nn.Module], data: Any, *,
                      purpose: str = "query", draws_per_forward: int = 32, num_draws: Optional[int] = None,
                      seed: Optional[int] = None, progress: bool = False, model_mode: str = "eval",
                      dtype: Optional[torch.dtype] = None,
                      groups: Optional[range] = None) -> Dict[str, torch.Tensor]:
    """Gradients of the per-example measurement (purpose "query") or training loss (purpose "train").

    Returns ``{layer: (N, d_out, d_in')}`` in ``dtype`` (default: the model's dtype) on the model's device.
    ``groups``: only this range of example groups (``max(1, draws_per_forward // M)`` examples each, numbered as
    in the full pass, so the draws are the same); the result then holds just those examples, in order.
    """
    draws_per_forward = check_draws_per_forward(draws_per_forward)
    device, mdtype = model_device_dtype(model)
    dtype = dtype or mdtype
    capture = LayerCapture(dict(modules))
    m = int(num_draws or task.num_draws(purpose))
    span = groups if groups is not None else range(0, total_groups(data, draws_per_forward, m))
    covered = examples_of_groups(span, num_examples(data), draws_per_forward, m)
    out = {nm: torch.zeros((len(covered),) + s.grad_shape, dtype=dtype, device=device)
           for nm, s in capture.specs.items()}
    output = task.measurement if purpose == "query" else task.train_loss
    for chunk in draw_pass(model, task, capture, data, purpose, num_draws=m,
                           seed=task.seed if seed is None else seed, draws_per_forward=draws_per_forward,
                           groups=span, progress=progress, desc=f"{purpose} gradients", model_mode=model_mode):
        idx = chunk.draws.example.to(device) - covered.start

        def on_layer(name, calls, idx=idx):  # during the backward pass
            a, gr = calls_as_rows(capture.specs[name], calls, patches=True)
            per_row = kk.per_example_gradients(a, gr, append_one=capture.specs[name].has_bias)
            out[name].index_add_(0, idx, finite_layer_sum(name, per_row, calls).to(dtype))
        chunk.backward(output(chunk.outputs, chunk.draws), on_layer)
    return out
