"""The pass loop shared by fitting and scoring: examples -> draws (rows) -> chunks -> forward -> output gradients.

``batch_size`` counts rows (draws) per forward pass; groups hold max(1, batch_size // M) examples, and a group's
rows are split into chunks of at most ``batch_size``. Checkpoints are taken between groups.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .capture import LayerCapture, check_finite
from .data_iter import iter_batches, num_batches
from .tasks.base import Rows, Task

MODEL_MODES = ("eval", "train")


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("the model has no parameters")
    return p.device, p.dtype


@contextlib.contextmanager
def use_model_mode(model: nn.Module, mode: str):
    """Put the model in eval (dropout off) or train (dropout on) mode for a pass; restore afterwards."""
    if mode not in MODEL_MODES:
        raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {mode!r}")
    was = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def seeded_rng(seed: int, group: int, chunk: int, device: torch.device):
    """Fork the global RNG so that dropout masks in train mode are reproducible per chunk."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        s = np.random.SeedSequence([seed & 0xFFFFFFFF, group, chunk, 7]).generate_state(1)[0]
        torch.manual_seed(int(s))
        yield


def group_size(batch_size: int, num_draws: int) -> int:
    return max(1, batch_size // num_draws)


def iter_groups(task: Task, data: Any, purpose: str, *, num_draws: int, seed: int, batch_size: int,
                start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[int, torch.Tensor, List[Rows]]]:
    """Yield ``(group_number, example_indices, row_chunks)`` for groups ``start`` to ``stop`` (default: all)."""
    for g, idx, batch in iter_batches(data, group_size(batch_size, num_draws), start, stop):
        rows = task.rows(batch, idx, purpose, num_draws=num_draws, seed=seed)
        yield g, idx, [rows.slice(s, s + batch_size) for s in range(0, len(rows), batch_size)]


def total_groups(data: Any, batch_size: int, num_draws: int) -> int:
    return num_batches(data, group_size(batch_size, num_draws))


def examples_of_groups(groups: range, num_examples: int, batch_size: int, num_draws: int) -> range:
    """The example indices that the example groups ``groups`` cover (clipped to the data)."""
    size = group_size(batch_size, num_draws)
    return range(min(num_examples, groups.start * size), min(num_examples, max(groups.start, groups.stop) * size))


def forward_capture(model: nn.Module, task: Task, capture: LayerCapture, rows: Rows) -> torch.Tensor:
    """Forward one chunk with capture on; check the outputs are finite."""
    with capture, torch.enable_grad():
        out = task.forward(model, rows)
    if not bool(torch.isfinite(out).all()):
        # name the first tracked layer that sees or makes NaN: the capture keeps no outputs, so run the forward
        # again checking each layer as it runs (only on this error path)
        capture.diagnose = True
        try:
            with capture, torch.enable_grad():
                task.forward(model, rows)
        finally:
            capture.diagnose = False
        raise FloatingPointError("the model produced NaN or inf outputs for this batch "
                                 "(every tracked layer's inputs and outputs were finite)")
    missing = [n for n in capture.modules if n not in capture.records]
    if missing and len(missing) == len(capture.modules):
        raise RuntimeError("no tracked layer was called in the forward pass (is the model the one the layers "
                           "were selected from?)")
    return out


def layer_gradients(capture: LayerCapture, f: torch.Tensor, v: torch.Tensor, retain_graph: bool,
                    on_layer: Optional[Callable[[str, List], None]] = None) -> Optional[Dict[str, List]]:
    """Output gradients per layer and call: ``{name: [(input, grad_output), ...]}``; or, with ``on_layer``,
    ``on_layer(name, calls)`` for each layer during the backward pass (nothing returned, nothing kept)."""
    return capture.gradients(f, v, retain_graph, on_layer=on_layer)


def fisher_backprop(capture: LayerCapture, task, f: torch.Tensor, rows: Rows, fisher: str,
                    on_layer: Callable[[str, List], None]) -> None:
    """Backpropagate each of ``task``'s Fisher vectors for ``f`` (one graph, retained between them);
    ``on_layer(name, calls)`` runs per layer inside each backward pass."""
    vecs = list(task.fisher_vectors(f, rows, fisher))
    for i, v in enumerate(vecs):
        layer_gradients(capture, f, v, retain_graph=i + 1 < len(vecs), on_layer=on_layer)


def _backward_of_latest(capture: LayerCapture, value: torch.Tensor, weights: torch.Tensor):
    """``backward(on_layer)`` for the chunk just forwarded; refuses to run once another forward has replaced the
    capture's records (it would pair this chunk's gradients with that forward's inputs)."""
    forward = capture.forward_count

    def backward(on_layer):
        if capture.forward_count != forward:
            raise RuntimeError("a streamed chunk's backward must run before the next chunk's forward")
        layer_gradients(capture, value, weights, False, on_layer=on_layer)
    return backward


def checked(name: str, value: torch.Tensor, calls) -> torch.Tensor:
    """Return ``value`` (a per-chunk sum computed from a layer's (input, grad) ``calls``) if it is finite; else
    raise naming the layer and whether its activations or output gradients hold NaN/inf.

    Checking the small result instead of every activation keeps the check off the hot path."""
    if bool(torch.isfinite(value.sum())):
        return value
    for x, g in calls:
        check_finite(name, "activations (layer inputs)", x)
        if g is not None:
            check_finite(name, "output gradients", g)
    raise FloatingPointError(f"layer {name!r}: its curvature or score terms overflowed (finite but huge inputs)")


def gradient_chunks(model: nn.Module, task: Task, capture: LayerCapture, data: Any, purpose: str, *,
                    num_draws: int, seed: int, batch_size: int, progress: bool = False, model_mode: str = "eval",
                    output: Optional[Callable[[torch.Tensor, Rows], torch.Tensor]] = None, start: int = 0,
                    stop: Optional[int] = None, desc: Optional[str] = None,
                    after_group: Optional[Callable[[int], None]] = None, stream: bool = False):
    """One pass of per-example gradients: yield ``(group, group_indices, rows, {layer: [(input, grad_output)]})``
    per chunk, where the output gradients are those of ``sum_rows weight * output(f, rows)`` (default: the
    measurement for queries, the training loss otherwise), over groups ``start`` to ``stop`` (default: the
    last). ``after_group(groups_done)`` runs after each group. With ``stream`` the last item is instead a
    function ``backward(on_layer)`` that runs the chunk's backward pass calling ``on_layer(name, calls)`` per
    layer as its gradients appear (no layer's output gradient outlives its processing)."""
    device, mdtype = model_device_dtype(model)
    if output is None:
        output = task.measurement if purpose == "query" else task.train_loss
    total = total_groups(data, batch_size, num_draws)
    stop = total if stop is None else min(int(stop), total)
    bar = progress_bar(stop, desc or f"{purpose} gradients", progress, initial=start)
    with use_model_mode(model, model_mode):
        for g, idx, chunks in iter_groups(task, data, purpose, num_draws=num_draws, seed=seed,
                                          batch_size=batch_size, start=start, stop=stop):
            for c, rows in enumerate(chunks):
                rows = rows.to(device, mdtype)
                with seeded_rng(seed, g, c, device):
                    f = forward_capture(model, task, capture, rows)
                    value = output(f, rows)
                weights = torch.full_like(value, rows.weight)
                if stream:
                    yield g, idx, rows, _backward_of_latest(capture, value, weights)
                else:
                    yield g, idx, rows, layer_gradients(capture, value, weights, False)
            if after_group is not None:
                after_group(g + 1)
            bar.update(1)
    bar.close()


class Checkpointer:
    """Saves pass state between groups every ``every`` groups or ``seconds`` seconds (whichever first)."""

    def __init__(self, save: Optional[Callable[[int], None]], every: Optional[int] = None, seconds: float = 60.0):
        self.save, self.every, self.seconds = save, every, seconds
        self._last = time.monotonic()

    def after_group(self, groups_done: int) -> None:
        if self.save is None:
            return
        due = (self.every is not None and groups_done % self.every == 0) or \
            (time.monotonic() - self._last >= self.seconds)
        if due:
            self.save(groups_done)
            self._last = time.monotonic()


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, unit="batch", leave=False)
