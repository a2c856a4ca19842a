"""Memory model of the pipeline (docs/memory.md) and a ``max_memory`` helper that picks draws per forward.

Peak of a stage = fixed bytes (model, curvature sums / factors, query gradients, score matrix) + draws_per_forward *
per-row bytes (the autograd graph of one forward, the captured output gradients of one backpropagated vector, the
largest layer's transient copies). Per-row activation bytes are measured, not guessed: one forward on two draws
with ``torch.autograd.graph.saved_tensors_hooks`` counting every distinct tensor autograd keeps (parameters
excluded), plus the layer inputs the capture holds.

    from kfac_influence.memory import choose_draws_per_forward
    bs = choose_draws_per_forward(model, task, train[:2], "6GiB", stage="fit")
    curv = fit_curvature(model, task, train, cfg, draws_per_forward=bs)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .capture import LayerCapture, LayerSpec, select_layers
from .curvature.config import CurvatureConfig
from .data_iter import get_batch, num_examples
from .engine import model_device_dtype, use_model_mode

__all__ = ["Footprint", "MemoryEstimate", "FitPlan", "measure_footprint", "estimate", "choose_draws_per_forward",
           "plan_fit", "ScorePlan", "plan_scores", "layer_state_bytes", "partition_state_peak", "parse_bytes", "STAGES",
           "SCRATCH_BYTES", "ADD_BLOCK_BYTES"]

STAGES = ("fit", "scores")
SCRATCH_BYTES = 256 << 20  # kfac_kernels' torch path: per-example scratch budget per op call (chunk_size_for)
ADD_BLOCK_BYTES = 16 << 20  # the fit adds a chunk's float32 terms into its float64 sums in row blocks this size
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(size: Union[int, float, str]) -> int:
    """``4_000_000``, ``"512MiB"``, ``"6GB"``, ``"1.5 GiB"`` -> bytes."""
    if isinstance(size, (int, float)):
        if size <= 0:
            raise ValueError(f"a memory size must be positive, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {size!r}; use e.g. 512MiB, 6GB or a number of bytes")
    return parse_bytes(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Footprint:
    """Sizes that drive memory. Per layer ``l``: ``d_in'``, ``d_out``, positions per row ``R``.

    ``act_bytes_per_row``: bytes autograd saves for backward per draw (parameters excluded);
    ``out_bytes_per_row``: captured layer outputs' gradients per draw (sum_l R_l d_out_l * itemsize);
    ``unfold_bytes_per_row``: the largest layer's ``R (d_in' + d_out)`` per draw (torch-path unfold / rotation);
    ``output_numel``: D, values of f per draw; ``param_bytes``: the model's parameters and buffers.
    """
    layers: Tuple[Tuple[str, int, int, int], ...]  # (name, d_in', d_out, R)
    itemsize: int
    act_bytes_per_row: int
    out_bytes_per_row: int
    unfold_bytes_per_row: int
    output_numel: int
    param_bytes: int

    @property
    def grad_numel(self) -> int:
        """Tracked weights (bias included): sum_l d_out d_in'."""
        return sum(di * do for _, di, do, _ in self.layers)

    @property
    def factor_numel(self) -> int:
        """One set of K-FAC factors and EK-FAC eigenvalues: sum_l d_in'^2 + d_out^2 + d_out d_in'."""
        return sum(di * di + do * do + di * do for _, di, do, _ in self.layers)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one stage: ``max(fixed + draws_per_forward * per_row + scratch, floor)``, ``floor``: the peak
    of a phase with no draw alive (scoring's preconditioning of the query gradients; 0 for the fit)."""
    stage: str
    draws_per_forward: int
    fixed: int
    per_row: int
    scratch: int
    floor: int = 0

    @property
    def total(self) -> int:
        return max(self.fixed + self.draws_per_forward * self.per_row + self.scratch, self.floor)


def _storage_key(t: torch.Tensor):
    """Identity of a tensor's storage: the storage object itself (views share it). Not its address: on the meta
    device every storage has address 0, and a footprint measured there (no memory, any model size) must still
    tell tensors apart."""
    return t.untyped_storage()._cdata


def _unique_bytes(tensors, exclude) -> int:
    seen, total = set(), 0
    for t in tensors:
        try:
            st = t.untyped_storage()
        except Exception:
            continue
        key = st._cdata
        if key in exclude or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def measure_footprint(model: nn.Module, task, sample: Any, *, config: CurvatureConfig = CurvatureConfig(),
                      purpose: str = "fit", model_mode: str = "eval") -> Footprint:
    """Forward the first example of ``sample`` (its ``M`` draws; at least 2 rows) with capture on and count
    what the forward keeps. ``sample``: the kind of data passed to ``fit_curvature`` (one or more examples, with
    their conditions for a conditional task). Works for a model on the meta device (built under
    ``torch.device("meta")``: no memory, no weights), which sizes models too large to instantiate; activations are
    then those of the meta device's attention kernel choice (see bench/memory_table.py)."""
    device, dtype = model_device_dtype(model)
    modules = select_layers(model, config.modules, config.exclude)
    capture = LayerCapture(modules)
    idx = torch.arange(min(2, num_examples(sample)))
    rows = task.draws(get_batch(sample, idx), idx, purpose, num_draws=1, seed=0).to(device, dtype)
    n = len(rows)
    params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # a detached alias (same storage): packing the tensor itself would tie an op's output to its own graph
        # node, a reference cycle that keeps every saved activation alive after this function (0.9 GiB per call
        # for the SD-1.5 UNet at two draws)
        t = t.detach()
        saved.append(t)
        return t

    with use_model_mode(model, model_mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with capture, torch.enable_grad():
            f = task.forward(model, rows)
    kept = saved + [x for calls in capture.records.values() for x, out, _ in calls] + [f]
    act = _unique_bytes(kept, params)
    layers, out_bytes, unfold = [], 0, 0
    for name, spec in capture.specs.items():
        calls = capture.records.get(name, [])
        r = sum(math.prod(out.shape[1:]) // spec.d_out for _, out, _ in calls) if calls else 1
        layers.append((name, spec.d_in_total, spec.d_out, max(1, r)))
        out_bytes += sum(out.numel() for _, out, _ in calls) // n * out_itemsize(calls, dtype)
        unfold = max(unfold, r * (spec.d_in_total + spec.d_out))
    item = torch.empty((), dtype=dtype).element_size()
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    capture.reset()
    return Footprint(tuple(layers), item, -(-act // n), out_bytes, unfold * max(item, 4),
                     int(f[0].numel()), pbytes)


def out_itemsize(calls, dtype) -> int:
    return calls[0][1].element_size() if calls else torch.empty((), dtype=dtype).element_size()


def estimate(fp: Footprint, stage: str, draws_per_forward: int, *, num_queries: int = 0, num_examples: int = 0,
             int8_queries: bool = False, factor_itemsize: int = 4, fisher_vectors: int = 1,
             streamed: bool = False) -> MemoryEstimate:
    """The memory model of docs/memory.md for one stage at ``draws_per_forward`` draws per forward.

    fit:    fixed = params + 8 * F (float64 sums) + 2 * factor_itemsize * F (factors, eigenbases: output)
            per_row = act + out_grads * fisher_vectors + 2 D * itemsize (f, the vector) + unfold
    scores: fixed = params + factor_itemsize * F_kept + max(Q W max(itemsize, factor_itemsize) (query pass: the
            raw gradients), Q W (1 if int8 else itemsize) + Q N max(itemsize, 4) (train pass: the held queries
            and the score matrix))
            per_row = act + out_grads + D * itemsize + unfold
            floor = params + factor_itemsize * F_used + Q (W max(itemsize, factor_itemsize) + max_l d_out d_in'
            (itemsize + 2 factor_itemsize)) (between the passes: the gradients, preconditioned a layer at a time)
            F_kept = F_used = F for a curvature in memory; streamed, F_used = two layers' (one and the next, read
            ahead) and F_kept = the last layer's, which stays cached through the passes
    with F = sum_l (d_in'^2 + d_out^2 + d_out d_in'), W = sum_l d_out d_in'; scratch: the kernels' per-example
    chunk (<= SCRATCH_BYTES on the torch path, 0 when the whole batch's chunk is smaller).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if draws_per_forward < 1:
        raise ValueError(f"draws_per_forward must be >= 1, got {draws_per_forward}")
    item = fp.itemsize
    largest = max(di * do for _, di, do, _ in fp.layers) * max(item, 4)
    scratch = min(SCRATCH_BYTES, draws_per_forward * largest)
    if stage == "fit":
        fixed = fp.param_bytes + 8 * fp.factor_numel + 2 * factor_itemsize * fp.factor_numel
        per_row = fp.act_bytes_per_row + fp.out_bytes_per_row * fisher_vectors + 2 * fp.output_numel * item \
            + fp.unfold_bytes_per_row
    else:
        qbytes = 1 if int8_queries else item
        grads = num_queries * fp.grad_numel * max(item, factor_itemsize)
        train_pass = num_queries * fp.grad_numel * qbytes + max(item, 4) * num_queries * num_examples
        # a streamed curvature (load_curvature(stream=True)) holds one layer's (Q_A, Q_G, Lambda) and the next
        # one read ahead while it preconditions, and keeps the last layer cached afterwards
        sizes = [di * di + do * do + di * do for _, di, do, _ in fp.layers]
        used, kept = (2 * max(sizes), sizes[-1]) if streamed else (fp.factor_numel, fp.factor_numel)
        fixed = fp.param_bytes + factor_itemsize * kept + max(grads, train_pass)
        # preconditioning, with no draw alive: the gradients (each raw layer dropped once preconditioned, the
        # result in the factors' dtype) and the preconditioner's two temporaries for the largest layer
        largest_numel = max(di * do for _, di, do, _ in fp.layers)
        floor = fp.param_bytes + factor_itemsize * used + grads \
            + num_queries * largest_numel * (item + 2 * factor_itemsize)
        scratch = max(scratch, min(SCRATCH_BYTES, num_queries * largest))
        per_row = fp.act_bytes_per_row + fp.out_bytes_per_row + fp.output_numel * item + fp.unfold_bytes_per_row
        return MemoryEstimate(stage, int(draws_per_forward), int(fixed), int(per_row), int(scratch), int(floor))
    return MemoryEstimate(stage, int(draws_per_forward), int(fixed), int(per_row), int(scratch))


def choose_draws_per_forward(model: nn.Module, task, sample: Any, max_memory: Union[int, str], *, stage: str = "fit",
                      config: CurvatureConfig = CurvatureConfig(), num_queries: int = 0, num_examples: int = 0,
                      int8_queries: bool = False, max_batch: int = 4096, headroom: float = 0.9,
                      footprint: Optional[Footprint] = None, streamed: bool = False) -> int:
    """The largest draws-per-forward ``draws_per_forward`` (<= ``max_batch``) whose estimated peak fits in
    ``headroom * max_memory``. Raises ``MemoryError`` (with the breakdown) when even 1 does not fit."""
    budget = int(parse_bytes(max_memory) * headroom)
    fp = footprint or measure_footprint(model, task, sample, config=config)
    nvec = fp.output_numel if config.fisher == "type2" else 1
    fitem = torch.empty((), dtype=config.dtype).element_size()

    def total(b):
        return estimate(fp, stage, b, num_queries=num_queries, num_examples=num_examples, int8_queries=int8_queries,
                        factor_itemsize=fitem, fisher_vectors=nvec, streamed=streamed).total

    if total(1) > budget:
        e = estimate(fp, stage, 1, num_queries=num_queries, num_examples=num_examples, int8_queries=int8_queries,
                     factor_itemsize=fitem, fisher_vectors=nvec, streamed=streamed)
        hint = " (int8_queries=True or fewer queries per run would shrink the query gradients)" \
            if stage == "scores" and not int8_queries and num_queries else ""
        floor = f", preconditioning {e.floor / 2**20:.0f} MiB" if e.floor else ""
        raise MemoryError(f"{stage}: even one draw per forward needs ~{e.total / 2**20:.0f} MiB (fixed "
                          f"{e.fixed / 2**20:.0f} MiB, per draw {e.per_row / 2**20:.1f} MiB, scratch "
                          f"{e.scratch / 2**20:.0f} MiB{floor}) > {budget / 2**20:.0f} MiB{hint}")
    lo, hi = 1, max_batch
    while lo < hi:  # total() is non-decreasing in b
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def layer_state_bytes(spec: LayerSpec, config: CurvatureConfig, model_dtype: torch.dtype) -> int:
    """A layer's share of the fit's state, for balancing partitions: its float64 sums of A and G (pass 1)."""
    a, g = spec.d_in_total, spec.d_out
    return 8 * (a * a + g * g)


def partition_state_peak(specs: Sequence[LayerSpec], config: CurvatureConfig, model_dtype: torch.dtype,
                         draws_bytes: int = 0, device: Union[str, torch.device] = "cpu") -> int:
    """Peak bytes of the fit's state for one partition of layers, over its timeline (docs/memory.md):

    pass 1        sum_l 8 (a^2 + g^2)  (float64 sums of A, G)            + ``draws_bytes`` + add(max(a^2, g^2))
    eigh of l     the sums of the layers not yet done + the results of those done + l's results so far +, for
                  the factor being decomposed (n = a, then g; its float64 mean is formed in place of its sum):
                  its stored copy (item n^2, made first; none in float64, where the mean is stored) and the
                  eigendecomposition's transient (``curvature.eigen.transient_bytes``: 8 n^2 in place on the
                  CPU, 24 n^2 for torch.linalg.eigh)
    pass 2        sum_l results + 8 a g (float64 EK-FAC eigenvalue sums)      + ``draws_bytes`` + add(a g)
    with a = d_in', g = d_out and results = (2 item + pass_item) (a^2 + g^2) + 16 (a + g): A, G and their
    eigenbases in the stored dtype (and the pass's bases in the model dtype when it differs). add(n), over the
    partition's largest layer: a chunk's term of n values (the ops' output, float32, or float64 for a float64
    model), as much again for the op's own scratch (measured by the allocator's trace, bench/RESULTS.md: 2.0x
    for ``linear_covariance`` with its bias row and the unfolding conv path, 1.8x for the shifted-Gram conv path,
    2.0x for ``eigenvalue_correction`` beside its per-example scratch) and, below float64, one row block of it
    converted for the float64 sum (``ADD_BLOCK_BYTES``)."""
    from .curvature.eigen import transient_bytes

    item = torch.empty((), dtype=config.dtype).element_size()
    pass_item = torch.empty((), dtype=model_dtype).element_size() if model_dtype != config.dtype else 0
    copy = item if config.dtype != torch.float64 else 0  # the stored copy beside the float64 mean

    def sums(s):
        return 8 * (s.d_in_total ** 2 + s.d_out ** 2)

    def results(s):
        return (2 * item + pass_item) * (s.d_in_total ** 2 + s.d_out ** 2) + 16 * (s.d_in_total + s.d_out)

    term_item = max(torch.empty((), dtype=model_dtype).element_size(), 4)

    def add(n):  # a chunk's term of n values on its way into a float64 sum (curvature.fit.add_into)
        return 2 * term_item * n + (min(ADD_BLOCK_BYTES, 8 * n) if term_item < 8 else 0)

    def factor(n):  # beside the state: during the decomposition, then while the eigenvectors are converted
        return max(copy * n * n + transient_bytes(n, device, overwrite=copy > 0),
                   (2 * item + pass_item) * n * n + 8 * n)

    peak = sum(map(sums, specs)) + draws_bytes + max(add(max(s.d_in_total, s.d_out) ** 2) for s in specs)
    pending, done = sum(map(sums, specs)), 0
    for s in specs:
        a, g = s.d_in_total, s.d_out
        # A first, then G: during G's decomposition A's results exist and A's sum is gone
        peak = max(peak, pending + done + factor(a),
                   pending - 8 * a * a + done + (2 * item + pass_item) * a * a + 8 * a + factor(g))
        pending -= sums(s)
        done += results(s)
    if config.method != "ekfac":
        return peak
    lam = sum(8 * s.d_in_total * s.d_out for s in specs)
    return max(peak, done + lam + draws_bytes + max(add(s.d_in_total * s.d_out) for s in specs))


@dataclass(frozen=True)
class FitPlan:
    """What ``fit_curvature(max_memory=...)`` runs: ``draws_per_forward``, the layer ``partitions`` (one pair of
    data passes each) and the predicted peak bytes (``peak``: fixed + activations + the largest partition's
    state)."""
    draws_per_forward: int
    partitions: Tuple[Tuple[str, ...], ...]
    peak: int


def plan_fit(model: nn.Module, task, sample: Any, max_memory: Union[int, str], *,
             config: CurvatureConfig = CurvatureConfig(), partitions=None, headroom: float = 0.9,
             max_batch: int = 4096, footprint: Optional[Footprint] = None) -> FitPlan:
    """The fit's plan under ``headroom * max_memory``: at most half of what the parameters leave goes to the
    draws of one forward (activations, captured gradients, scratch), the rest to the fit's state
    (``partition_state_peak``), split into as few partitions of consecutive layers as fit (``partitions``: keep
    these). Raises ``MemoryError`` naming the layer when one layer alone does not fit."""
    budget = int(parse_bytes(max_memory) * headroom)
    fp = footprint or measure_footprint(model, task, sample, config=config)
    _, model_dtype = model_device_dtype(model)
    nvec = fp.output_numel if config.fisher == "type2" else 1
    specs = LayerCapture(select_layers(model, config.modules, config.exclude)).specs
    free = budget - fp.param_bytes
    if free <= 0:
        raise MemoryError(f"fit: the model's parameters alone ({fp.param_bytes / 2**20:.0f} MiB) exceed "
                          f"{budget / 2**20:.0f} MiB")

    def draws_bytes(b: int) -> int:
        e = estimate(fp, "fit", b, fisher_vectors=nvec)
        return e.per_row * b + e.scratch

    device, _ = model_device_dtype(model)

    def peak_of(names, b) -> int:
        return partition_state_peak([specs[nm] for nm in names], config, model_dtype, draws_bytes(b), device)

    alone = {nm: peak_of([nm], 1) for nm in specs}
    largest = max(alone, key=alone.get)
    if alone[largest] > free:
        raise MemoryError(f"fit: layer {largest!r} alone needs {alone[largest] / 2**20:.0f} MiB (its fit state "
                          f"and eigendecomposition, one draw per forward): over the {free / 2**20:.0f} MiB the "
                          f"parameters leave of {budget / 2**20:.0f} MiB")
    # draws per forward: as many as fit in half of what the parameters leave (and beside the largest layer)
    cap = max(draws_bytes(1), min(free - (alone[largest] - draws_bytes(1)), free // 2))
    lo, hi = 1, max_batch
    while lo < hi:  # draws_bytes is non-decreasing
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if draws_bytes(mid) <= cap else (lo, mid - 1)
    per_forward = lo
    if partitions is None:
        parts, cur = [], []
        for nm in specs:
            if cur and peak_of(cur + [nm], per_forward) > free:
                parts.append(tuple(cur))
                cur = []
            cur.append(nm)
        parts.append(tuple(cur))
    else:
        parts = [tuple(p) for p in partitions]
    biggest = max(peak_of(list(p), per_forward) for p in parts)
    return FitPlan(per_forward, tuple(parts), fp.param_bytes + biggest)


@dataclass(frozen=True)
class ScorePlan:
    """What ``pairwise_scores`` runs under a budget: ``query_batch`` queries' gradients held at once (one
    training pass per block: ``passes``), ``draws_per_forward`` and the predicted peak bytes (``peak``)."""
    draws_per_forward: int
    query_batch: int
    passes: int
    peak: int


def plan_scores(model: nn.Module, task, sample: Any, max_memory: Union[int, str], *, num_queries: int,
                num_examples: int, config: CurvatureConfig = CurvatureConfig(), int8_queries: bool = False,
                streamed: bool = False, headroom: float = 0.9, max_batch: int = 4096,
                footprint: Optional[Footprint] = None) -> ScorePlan:
    """The scoring plan under ``headroom * max_memory``: the fewest training passes (the largest query block whose
    estimate at one draw per forward fits), then the most draws per forward for that block, capped so that one
    query group (``draws_per_forward // num_draws`` queries) stays within the block. Raises ``MemoryError``
    (with the breakdown) when one query at one draw per forward does not fit."""
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    budget = int(parse_bytes(max_memory) * headroom)
    fp = footprint or measure_footprint(model, task, sample, config=config)
    fitem = torch.empty((), dtype=config.dtype).element_size()
    mq = task.num_draws("query")

    def est(q: int, b: int) -> MemoryEstimate:
        return estimate(fp, "scores", b, num_queries=q, num_examples=num_examples, int8_queries=int8_queries,
                        factor_itemsize=fitem, streamed=streamed)

    def total(q: int, b: int) -> int:  # in blocks, the whole score matrix is held beside the block's
        whole = max(fp.itemsize, 4) * num_queries * num_examples if q < num_queries else 0
        return est(q, b).total + whole

    if total(1, 1) > budget:
        e = est(1, 1)
        raise MemoryError(f"scores: even one query at one draw per forward needs ~{total(1, 1) / 2**20:.0f} MiB "
                          f"(fixed {e.fixed / 2**20:.0f} MiB, per draw {e.per_row / 2**20:.1f} MiB, "
                          f"preconditioning {e.floor / 2**20:.0f} MiB) > {budget / 2**20:.0f} MiB")
    lo, hi = 1, num_queries
    while lo < hi:  # total(q, 1) is non-decreasing in q (but for the jump at q = Q, which only adds the block's)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid, 1) <= budget else (lo, mid - 1)
    block = num_queries if total(num_queries, 1) <= budget else lo
    cap = max_batch if block >= num_queries else min(max_batch, block * mq)
    lo, hi = 1, max(1, cap)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(block, mid) <= budget else (lo, mid - 1)
    if block < num_queries:  # pairwise_scores' blocks are whole query groups of draws_per_forward // M queries
        group = max(1, lo // mq)
        block = block // group * group
    return ScorePlan(lo, block, math.ceil(num_queries / block), total(block, lo))
