"""The one pass loop under fitting, query gradients, pairwise and self scores (single process or sharded).

Vocabulary. An example expands into M *draws* (for diffusion: (t, eps) pairs; ``tasks.base.Draws``). Examples
are taken in *groups* of ``max(1, draws_per_forward // M)``, numbered from 0 over the whole data set; a group's
draws are split into *chunks* of at most ``draws_per_forward`` draws, one forward pass each. Draws are seeded by
the global example index and dropout masks by the global (group, chunk) number, so any batching and any sharding
sees the same random numbers.

``draw_pass`` runs the forward passes of a range of groups (with layer capture) and yields one ``Chunk`` per
forward; the caller backpropagates what it needs through ``Chunk.backward`` / ``Chunk.fisher_backward`` and
receives each layer's ``(input, grad_output)`` calls inside the backward pass. ``Shard`` says which groups a
process owns and how partial sums meet (``Shard()``: one process, everything, no communication). ``Checkpoint``
is the one load-compare-save helper of every resumable pass.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .capture import LayerCapture, check_finite
from .data_iter import iter_batches, num_batches
from .storage import load_tensors, save_tensors
from .tasks.base import Draws, Task
from .tensorfile import TensorFile

MODEL_MODES = ("eval", "train")

OnLayer = Callable[[str, List[Tuple[torch.Tensor, torch.Tensor]]], None]


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


def check_draws_per_forward(draws_per_forward: int) -> int:
    if isinstance(draws_per_forward, bool) or int(draws_per_forward) != draws_per_forward or draws_per_forward < 1:
        raise ValueError(f"draws_per_forward must be a whole number >= 1, got {draws_per_forward!r}")
    return int(draws_per_forward)


def group_size(draws_per_forward: int, num_draws: int) -> int:
    """Examples per group."""
    return max(1, draws_per_forward // num_draws)


def iter_groups(task: Task, data: Any, purpose: str, *, num_draws: int, seed: int, draws_per_forward: int,
                start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[int, torch.Tensor, List[Draws]]]:
    """Yield ``(group_number, example_indices, chunks)`` for groups ``start`` to ``stop`` (default: all)."""
    for g, idx, batch in iter_batches(data, group_size(draws_per_forward, num_draws), start, stop):
        draws = task.draws(batch, idx, purpose, num_draws=num_draws, seed=seed)
        yield g, idx, [draws.slice(s, s + draws_per_forward) for s in range(0, len(draws), draws_per_forward)]


def total_groups(data: Any, draws_per_forward: int, num_draws: int) -> int:
    return num_batches(data, group_size(draws_per_forward, num_draws))


def examples_of_groups(groups: range, num_examples: int, draws_per_forward: int, num_draws: int) -> range:
    """The example indices that the example groups ``groups`` cover (clipped to the data)."""
    size = group_size(draws_per_forward, num_draws)
    return range(min(num_examples, groups.start * size), min(num_examples, max(groups.start, groups.stop) * size))


def forward_capture(model: nn.Module, task: Task, capture: LayerCapture, draws: Draws) -> torch.Tensor:
    """Forward one chunk with capture on; check the outputs are finite."""
    with capture, torch.enable_grad():
        out = task.forward(model, draws)
    if not bool(torch.isfinite(out).all()):
        # name the first tracked layer that sees or makes NaN: the capture keeps no outputs, so run the forward
        # again checking each layer as it runs (only on this error path)
        capture.diagnose = True
        try:
            with capture, torch.enable_grad():
                task.forward(model, draws)
        finally:
            capture.diagnose = False
        raise FloatingPointError("the model produced NaN or inf outputs for this batch "
                                 "(every tracked layer's inputs and outputs were finite)")
    missing = [n for n in capture.modules if n not in capture.records]
    if missing and len(missing) == len(capture.modules):
        raise RuntimeError("no tracked layer was called in the forward pass (is the model the one the layers "
                           "were selected from?)")
    return out


def finite_layer_sum(name: str, value: torch.Tensor, calls) -> torch.Tensor:
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


@dataclass
class Chunk:
    """One forward pass of ``draw_pass``: ``group`` (global number), ``examples`` (the group's global example
    indices), ``draws`` (this chunk's draws, on the model's device) and ``outputs`` f. Its backward passes must
    run before the next chunk's forward (the capture then holds another forward's inputs)."""

    group: int
    examples: torch.Tensor
    draws: Draws
    outputs: torch.Tensor
    capture: LayerCapture
    forward_number: int

    def _check_latest(self) -> None:
        if self.capture.forward_count != self.forward_number:
            raise RuntimeError("a streamed chunk's backward must run before the next chunk's forward")

    def backward(self, value: torch.Tensor, on_layer: OnLayer) -> None:
        """Backpropagate ``sum_draws weight * value`` (``value: (n,)`` per draw, weight 1/M: each example's mean
        over its draws), calling ``on_layer(name, [(input, grad_output) per call])`` per layer as its output
        gradient appears (no layer's output gradient outlives its processing)."""
        self._check_latest()
        self.capture.gradients(value, torch.full_like(value, self.draws.weight), False, on_layer=on_layer)

    def fisher_backward(self, task: Task, fisher: str, on_layer: OnLayer) -> None:
        """Backpropagate each of ``task``'s Fisher vectors for this chunk's outputs (one graph, retained between
        them); ``on_layer`` as in ``backward``, once per vector."""
        self._check_latest()
        vecs = list(task.fisher_vectors(self.outputs, self.draws, fisher))
        for i, v in enumerate(vecs):
            self.capture.gradients(self.outputs, v, retain_graph=i + 1 < len(vecs), on_layer=on_layer)


def draw_pass(model: nn.Module, task: Task, capture: LayerCapture, data: Any, purpose: str, *, num_draws: int,
              seed: int, draws_per_forward: int, groups: Optional[range] = None, start: Optional[int] = None,
              progress: bool = False, desc: Optional[str] = None, model_mode: str = "eval",
              after_group: Optional[Callable[[int], None]] = None) -> Iterator[Chunk]:
    """THE pass loop: forward every chunk of the example groups ``groups`` (default: all) from group ``start``
    (default: ``groups.start``; a resumed pass gives its next group) and yield a ``Chunk`` per forward.
    ``after_group(next_group)`` runs once a group's chunks have all been yielded (and handled): the place to
    update progress and checkpoint."""
    device, dtype = model_device_dtype(model)
    total = total_groups(data, draws_per_forward, num_draws)
    groups = range(0, total) if groups is None else range(groups.start, min(groups.stop, total))
    first = groups.start if start is None else max(int(start), groups.start)
    bar = progress_bar(len(groups), desc or f"{purpose} pass", progress, initial=min(len(groups),
                                                                                      first - groups.start))
    try:
        if first >= groups.stop:
            return
        with use_model_mode(model, model_mode):
            for g, idx, chunks in iter_groups(task, data, purpose, num_draws=num_draws, seed=seed,
                                              draws_per_forward=draws_per_forward, start=first, stop=groups.stop):
                for c, draws in enumerate(chunks):
                    draws = draws.to(device, dtype)
                    with seeded_rng(seed, g, c, device):
                        f = forward_capture(model, task, capture, draws)
                    yield Chunk(g, idx, draws, f, capture, capture.forward_count)
                if after_group is not None:
                    after_group(g + 1)
                bar.update(1)
    finally:
        bar.close()


@dataclass(frozen=True)
class Shard:
    """The part of a pass one process does, and how its partial sums meet the other processes'.

    ``Shard()`` is one process: it owns every group and its reductions do nothing. ``Shard.of(group)`` is this
    process's share in a ``torch.distributed`` process group (``group`` None: the default group, or one process
    when none is initialised): a contiguous range of example groups (``owned``), sums added across ranks in
    place (``all_reduce``), and per-rank checkpoint folders ``rank{r}-of-{W}``."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @classmethod
    def of(cls, group: Any = None) -> "Shard":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(group), dist.get_world_size(group), group)
        return cls()

    @property
    def single(self) -> bool:
        return self.world_size == 1

    def owned(self, num_groups: int) -> range:
        """Contiguous range of global group numbers for this rank: sizes differ by at most one, lower ranks
        first."""
        return shard_groups(num_groups, self.world_size, self.rank)

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor across ranks in place (one collective per tensor: no flattened copy of big sums)."""
        if self.single:
            return
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Overwrite each tensor with rank ``src``'s (a rank number within this shard's group)."""
        if self.single:
            return
        root = dist.get_global_rank(self.group, src) if self.group is not None else src
        for t in tensors:
            dist.broadcast(t, src=root, group=self.group)

    def first_rank_where(self, flag: bool) -> Optional[int]:
        """The lowest rank whose ``flag`` is true (every rank must call this), or None."""
        if self.single:
            return 0 if flag else None
        t = torch.tensor([self.rank if flag else self.world_size], dtype=torch.int64,
                         device=_collective_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        r = int(t.item())
        return None if r == self.world_size else r

    def checkpoint_dir(self, base: Optional[os.PathLike]) -> Optional[Path]:
        if base is None:
            return None
        return Path(base) if self.single else Path(base) / f"rank{self.rank}-of-{self.world_size}"


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def shard_groups(num_groups: int, world_size: int, rank: int) -> range:
    """Contiguous range of global group numbers for ``rank``: sizes differ by at most one, lower ranks first."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    base, extra = divmod(num_groups, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + int(rank < extra))


class CheckpointMismatch(ValueError):
    """A checkpoint was made from other inputs or settings than the resuming call's; the message names them."""


class Checkpoint:
    """The resumable state file of a pass: ``identity`` (what the state was computed from) is stored with it and
    compared on load. Between groups the pass asks ``should_save(next_group)``: every ``every`` groups, or
    ``seconds`` seconds after the last save (whichever first), or once SIGINT / SIGTERM arrived inside
    ``deferring_signals()``; after the save, ``after_save()`` raises ``KeyboardInterrupt`` if a signal asked to
    stop. ``folder`` None: no checkpointing (signals keep their usual effect)."""

    def __init__(self, folder: Optional[Path], name: str, identity: Dict[str, Any], *,
                 every: Optional[int] = None, seconds: float = 60.0):
        if every is not None and int(every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1 groups, got {every}")
        if not seconds > 0:
            raise ValueError(f"checkpoint_seconds must be > 0, got {seconds}")
        self.path = Path(folder) / name if folder is not None else None
        self.identity = identity
        self.every, self.seconds = every, float(seconds)
        self._last = time.monotonic()
        self._signal: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """``(tensors, header)`` of an existing checkpoint with the same identity; None when there is none;
        ``CheckpointMismatch`` naming the differing entries otherwise."""
        if self.path is None or not self.path.exists():
            return None
        tensors, saved = load_tensors(self.path)
        self._compare(saved)
        return tensors, saved

    def peek(self) -> Optional[Dict[str, Any]]:
        """The header of an existing checkpoint with the same identity, its tensors left unread; None when there
        is none; ``CheckpointMismatch`` otherwise."""
        if self.path is None or not self.path.exists():
            return None
        saved = TensorFile(self.path).header
        self._compare(saved)
        return saved

    def _compare(self, saved: Dict[str, Any]) -> None:
        differs = [k for k, v in self.identity.items() if saved.get(k) != _json_like(v)]
        if differs:
            detail = "; ".join(f"{k}: {_short(saved.get(k))} in the checkpoint, {_short(self.identity[k])} now"
                               for k in differs)
            raise CheckpointMismatch(f"the checkpoint {self.path} was made from other inputs or settings "
                                     f"({detail}); delete it or use another checkpoint_dir")

    def save(self, tensors: Dict[str, torch.Tensor], **progress: Any) -> None:
        if self.path is None:
            return
        save_tensors(self.path, tensors, {**self.identity, **progress})
        self._last = time.monotonic()

    def should_save(self, next_group: int) -> bool:
        if self.path is None:
            return False
        return self._signal is not None or (self.every is not None and next_group % self.every == 0) or \
            time.monotonic() - self._last >= self.seconds

    def after_save(self) -> None:
        """Stop the pass (``KeyboardInterrupt``) if a deferred signal asked for it; the state is saved."""
        if self._signal is not None:
            name = signal.Signals(self._signal).name
            self._signal = None
            raise KeyboardInterrupt(f"{name}: stopped after saving the checkpoint {self.path}")

    @contextlib.contextmanager
    def deferring_signals(self):
        """While the pass runs (main thread, checkpointing on): the first SIGINT / SIGTERM is held until the
        current group ends, which is then checkpointed before the pass stops; a second one stops at once."""
        if self.path is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def hold(signum, frame):
            if self._signal is not None:  # asked twice: stop now (the last checkpoint stays valid)
                raise KeyboardInterrupt(signal.Signals(signum).name)
            self._signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, hold)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.after_save()  # a signal held past the last group: the work is saved, stop as asked


def _json_like(v):
    """``v`` as it reads back from a JSON header (tuples become lists)."""
    if isinstance(v, (list, tuple)):
        return [_json_like(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_like(x) for k, x in v.items()}
    return v


def _short(v, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, unit="group", leave=False)
