"""Ground-truth measurements with common random numbers, and a diffusion trainer for retraining.

``task_measurements(model, task, queries, num_draws=, seed=)`` evaluates every query's measurement as the mean over
its draws of ``task.measurement`` (no gradients). The draws come from ``task.draws(purpose="query", seed=seed)``,
whose generators depend only on (seed, query index): every model sees the SAME (t, eps) draws, so differences
between retrained models are not drowned by Monte Carlo noise.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..data_iter import iter_batches, num_examples
from ..engine import group_size, model_device_dtype, use_model_mode
from ..tasks.base import Task


@torch.no_grad()
def task_measurements(model: nn.Module, task: Task, queries: Any, *, num_draws: Optional[int] = None,
                      seed: Optional[int] = None, draws_per_forward: int = 512,
                      also: Optional[Mapping[str, Task]] = None):
    """``(Q,)`` float64: the mean over ``num_draws`` (default: the task's query draws) of ``task.measurement``.

    ``also``: other tasks whose measurements are evaluated on the SAME rows and outputs (they must draw rows like
    ``task``, e.g. DiffusionTasks with uniform t and another measurement); then a dict ``{"": (Q,), name: (Q,)}``
    is returned, "" being ``task``'s own measurement."""
    device, dtype = model_device_dtype(model)
    m = int(num_draws or task.num_draws("query"))
    seed = task.seed if seed is None else int(seed)
    q = num_examples(queries)
    tasks = {"": task, **dict(also or {})}
    out = {name: torch.zeros(q, dtype=torch.float64) for name in tasks}
    with use_model_mode(model, "eval"):
        for _, idx, batch in iter_batches(queries, group_size(draws_per_forward, m)):
            rows = task.draws(batch, idx, "query", num_draws=m, seed=seed).to(device, dtype)
            for s in range(0, len(rows), draws_per_forward):
                part = rows.slice(s, s + draws_per_forward)
                f = task.forward(model, part)
                for name, t in tasks.items():
                    vals = t.measurement(f, part).double().cpu()
                    out[name].index_add_(0, part.example, vals * part.weight)
    return out[""] if also is None else out


def measure_all(tasks: Mapping[str, Task], queries: Any, *, num_draws: int, seed: int, draws_per_forward: int = 512,
                share_rows: bool = False) -> Callable[[nn.Module], dict]:
    """A ``measure_fn`` for ``LDSRun.measure``: ``model -> {name: (Q,)}`` for each named task's measurement,
    all on the draws of ``seed``. ``share_rows``: one forward pass for all (the tasks must draw identical rows,
    e.g. DiffusionTasks differing only in a uniform-t measurement)."""
    names = list(tasks)

    def fn(model):
        if share_rows:
            first = tasks[names[0]]
            res = task_measurements(model, first, queries, num_draws=num_draws, seed=seed, draws_per_forward=draws_per_forward,
                                    also={n: tasks[n] for n in names[1:]})
            res[names[0]] = res.pop("")
            return res
        return {name: task_measurements(model, t, queries, num_draws=num_draws, seed=seed, draws_per_forward=draws_per_forward)
                for name, t in tasks.items()}
    return fn


def diffusion_train_fn(images: torch.Tensor, build_fn: Callable[[int], nn.Module], scheduler,
                       config, *, use_ema: bool = True, progress: bool = False,
                       labels: Optional[torch.Tensor] = None,
                       null_label: Optional[int] = None) -> Callable[[torch.Tensor, int], nn.Module]:
    """A ``train_fn(kept_indices, seed)`` for ``LDSRun``: builds ``build_fn(seed)`` and trains it with
    ``kfac_influence.diffusion.train`` on ``images[kept_indices]`` ``(n_keep, C, H, W)`` with ``config`` (a
    ``TrainConfig``) and ``seed``; returns the EMA model (or the raw one).

    Class-conditional retraining: ``labels`` ``(N,)`` integers (one per row of ``images``) and ``null_label``
    (the reserved label of the null condition, e.g. ``num_class_embeds - 1``): the kept examples are trained with
    their own labels, ``labels[kept_indices]``, and ``config.condition_dropout`` (what the attributed model was
    trained with)."""
    import dataclasses

    from ..diffusion.training import train

    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},) (one per training image), got "
                             f"{tuple(labels.shape)}")
        if null_label is None:
            raise ValueError("class-conditional retraining needs null_label (the null condition's label)")
    elif null_label is not None:
        raise ValueError("null_label is for class-conditional retraining: pass labels too")

    def fn(indices: torch.Tensor, seed: int) -> nn.Module:
        model = build_fn(int(seed))
        cfg = dataclasses.replace(config, seed=int(seed))
        cond = {} if labels is None else {"labels": labels[indices], "null_label": int(null_label)}
        res = train(model, scheduler, images[indices], cfg, progress=progress, **cond)
        return res.model if use_ema else res.raw_model
    return fn


Number = Union[int, float]
