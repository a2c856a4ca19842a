"""fit_curvature: K-FAC factors (pass 1), eigendecomposition, EK-FAC eigenvalue correction (pass 2).

Scale conventions (design.md section 2): expand: A = mean over (n, draw, r) of a a^T, G = mean over (n, draw) of
sum_r g g^T; reduce: a = mean_r a_r, g = sum_r g_r, both averaged over (n, draw). EK-FAC: Lambda = mean over
(n, draw) of (Q_G^T DW Q_A)^2 with DW = sum_r g_r a_r^T per draw (and per backpropagated vector for type2).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import (LayerCapture, LayerSpec, calls_as_rows, grads_as_rows, inputs_as_rows, joined_rows,
                       layer_spec, rounded_calls, select_layers)
from ..data_iter import num_examples
from ..engine import (Checkpoint, Shard, check_draws_per_forward, draw_pass, finite_layer_sum, model_device_dtype,
                      total_groups)
from ..identity import data_fingerprint, task_fingerprint
from ..memory import ADD_BLOCK_BYTES, layer_state_bytes, plan_fit
from ..storage import model_fingerprint
from ..tasks.base import Task
from .config import CurvatureConfig
from ..tensorfile import TensorFile
from .curvature import Curvature, LayerFiles, tracked_parameters
from .eigen import eigh_psd

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


def add_into(total: torch.Tensor, value: torch.Tensor) -> None:
    """``total += value`` for a float64 sum and a lower-precision ``value`` without a whole float64 copy of
    ``value``: on the CPU torch first converts the whole operand to the sum's dtype (8 d^2 bytes beside a float32
    d x d covariance: 1 GiB for an 11521-wide conv factor), so add row blocks of at most ``ADD_BLOCK_BYTES``
    (CUDA converts inside the kernel; the blocks cost it nothing). Bitwise the plain ``+=``."""
    if value.shape != total.shape:
        raise ValueError(f"add_into: a term of shape {tuple(value.shape)} for a sum of shape {tuple(total.shape)}")
    if value.dtype == total.dtype or value.dim() == 0:
        total += value
        return
    rows = max(1, ADD_BLOCK_BYTES // max(1, value[0].numel() * total.element_size()))
    for i in range(0, value.shape[0], rows):
        total[i:i + rows] += value[i:i + rows]


def output_covariance(spec: LayerSpec, calls, approx: str) -> torch.Tensor:
    g = joined_rows([grads_as_rows(spec, gr) for _, gr in calls])
    rows = g.sum(dim=1) if approx == "reduce" else g.reshape(-1, g.shape[-1])
    return kk.linear_covariance(rows)


class _FitState:
    """Accumulators of a fit in progress on one process; saved to / restored from its checkpoint.

    Stage "factors": float64 sums of A and G over this process's groups. Once pass 1 is done (``finish_factors``)
    those sums give way to the per-layer results of the factors stage (``results``: means of A and G and their
    eigenvalues and eigenvectors, equal on every rank), which a checkpoint then carries, so a resumed eigenvalue
    pass uses the very bases it started with and the pass holds no float64 copy of A or G. Stage "eigen" adds
    the float64 sums of the EK-FAC eigenvalues (this process's share; reduced on copies at the end).
    ``next_group``: the first global example group not yet processed in the current stage."""

    def __init__(self, specs: Dict[str, LayerSpec], device: torch.device, next_group: int, allocate: bool = True):
        self.stage = "factors"
        self.next_group = next_group
        self.sums: Dict[str, torch.Tensor] = {}
        self.results: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {"draws": 0}
        for n, s in (specs.items() if allocate else ()):
            self.sums[f"{n}::A"] = torch.zeros(s.d_in_total, s.d_in_total, dtype=torch.float64, device=device)
            self.sums[f"{n}::G"] = torch.zeros(s.d_out, s.d_out, dtype=torch.float64, device=device)
            self.counts[f"{n}::A"] = 0

    def finish_factors(self, results: Dict[str, torch.Tensor], specs: Dict[str, LayerSpec], device: torch.device,
                       eigen_pass: bool, first_group: int) -> None:
        """Replace the sums of A and G by ``results``; enter the eigenvalue pass (``eigen_pass``) or finish."""
        self.results = results
        self.sums = {}
        self.stage, self.next_group = ("eigen" if eigen_pass else "done"), first_group
        if eigen_pass:
            for n, s in specs.items():
                self.sums[f"{n}::Lambda"] = torch.zeros(s.d_out, s.d_in_total, dtype=torch.float64, device=device)
            self.counts["eigen_draws"] = 0

    def save(self, checkpoint: Checkpoint) -> None:
        checkpoint.save({**self.sums, **{f"{RESULT}{k}": v for k, v in self.results.items()}},
                        stage=self.stage, next_group=self.next_group, counts=self.counts)

    @classmethod
    def restore(cls, loaded, specs, device) -> "_FitState":
        tensors, saved = loaded
        st = cls(specs, device, 0, allocate=False)  # the checkpoint's tensors are the state: no zeros beside them
        st.stage, st.next_group, st.counts = saved["stage"], int(saved["next_group"]), saved["counts"]
        st.sums = {k: v.to(device) for k, v in tensors.items() if not k.startswith(RESULT)}
        st.results = {k[len(RESULT):]: v.to(device) for k, v in tensors.items() if k.startswith(RESULT)}
        return st


RESULT = "result::"  # checkpoint key prefix of the factors stage's results
STATE_VERSION = 2  # checkpoints of other layouts are refused by their identity


def _eig(mat: torch.Tensor, overwrite: bool = False):
    return eigh_psd(mat.double(), overwrite=overwrite)


def _row_major(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` (eigh's column-major eigenvectors) as a contiguous ``dtype`` tensor, in one allocation."""
    return torch.empty(q.shape, dtype=dtype, device=q.device).copy_(q)


def _result_layout(spec: LayerSpec, config: CurvatureConfig, model_dtype: torch.dtype) -> Dict[str, tuple]:
    """``{key: (shape, dtype)}`` of one layer's factor results (see ``_layer_results``)."""
    out = {}
    for which, d in (("A", spec.d_in_total), ("G", spec.d_out)):
        out[which] = ((d, d), config.dtype)
        out[f"s{which}"] = ((d,), torch.float64)
        out[f"Q{which}"] = ((d, d), config.dtype)
        if config.method == "ekfac" and model_dtype != config.dtype:
            out[f"Q{which}_pass"] = ((d, d), model_dtype)
    return out


def _layer_results(sums: List[torch.Tensor], count_a: int, draws: int, config: CurvatureConfig,
                   model_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """One layer's factor results from its float64 sums ``[sum_A, sum_G]`` (consumed: taken from the list and
    freed as they are used, as memory.partition_state_peak counts): A (sum over input rows / their count) and G
    (sum / number of draws) in ``config.dtype``; QA, QG (eigenvectors from float64 eigh, contiguous) in
    ``config.dtype``; sA, sG (eigenvalues, float64); for EK-FAC with a model dtype other than ``config.dtype``,
    QA_pass and QG_pass: the eigenvalue pass's bases, rounded from float64 to the model dtype."""
    out = {}
    for which, count in (("A", count_a), ("G", draws)):
        mean = sums.pop(0).div_(max(1, count))  # the mean in place of the sum
        out[which] = mean.to(config.dtype)  # before the eigendecomposition, which may work in the mean's memory
        s, q = _eig(mean, overwrite=out[which] is not mean)
        del mean
        out[f"s{which}"] = s
        # contiguous (eigh's are column-major), as a checkpoint loads them: a resumed pass then multiplies by
        # the same layout and rounds the same way
        out[f"Q{which}"] = _row_major(q, config.dtype)
        if config.method == "ekfac" and model_dtype != config.dtype:
            out[f"Q{which}_pass"] = _row_major(q, model_dtype)
        del q, s
    return out


def _finish_factors(state: _FitState, specs: Dict[str, LayerSpec], config: CurvatureConfig,
                    model_dtype: torch.dtype, device: torch.device, shard: Shard, first_group: int) -> bool:
    """After pass 1, on every rank: the factor results, equal on every rank, replace the sums of A and G.
    Returns whether this rank's state changed (it was still in the factors stage).

    Normally the sums and counts are added across ranks and layer i is eigendecomposed by rank i % W, which
    broadcasts its results (one process: all layers here, nothing sent). A rank that already holds results
    (it saved them before an interruption that caught another rank earlier) sends them to all instead: the
    other ranks' partial sums may be gone."""
    had = state.stage != "factors"
    holder = shard.first_rank_where(had)
    names = list(specs)
    if holder is not None:
        if not had:
            state.results = {f"{nm}::{k}": torch.empty(shape, dtype=dt, device=device)
                             for nm in names for k, (shape, dt) in _result_layout(specs[nm], config,
                                                                                 model_dtype).items()}
        shard.broadcast([state.results[k] for k in sorted(state.results)], holder)
        results = state.results
    else:
        keys = sorted(state.counts)
        counts = torch.tensor([float(state.counts[k]) for k in keys], dtype=torch.float64, device=device)
        shard.all_reduce([counts])
        total = dict(zip(keys, (int(c) for c in counts.tolist())))
        results = {}
        for i, nm in enumerate(names):
            pair = [state.sums.pop(f"{nm}::A"), state.sums.pop(f"{nm}::G")]
            shard.all_reduce(pair)
            owner = i % shard.world_size
            if owner == shard.rank:  # consumes the sums: each goes as soon as its results exist
                layer = _layer_results(pair, total[f"{nm}::A"], total["draws"], config, model_dtype)
            else:
                pair.clear()
                layer = {k: torch.empty(shape, dtype=dt, device=device)
                         for k, (shape, dt) in _result_layout(specs[nm], config, model_dtype).items()}
            shard.broadcast([layer[k] for k in sorted(layer)], owner)
            results.update({f"{nm}::{k}": v for k, v in layer.items()})
    if not had:
        state.finish_factors(results, specs, device, eigen_pass=config.method == "ekfac", first_group=first_group)
    return not had


def fit_curvature(model: nn.Module, task: Task, data: Any, config: CurvatureConfig = CurvatureConfig(), *,
                  draws_per_forward: int = 32, checkpoint_dir: Optional[os.PathLike] = None, progress: bool = True,
                  model_mode: str = "eval", checkpoint_every: Optional[int] = None,
                  checkpoint_seconds: float = 60.0, partitions: Optional[Union[int, Sequence[Sequence[str]]]] = None,
                  max_memory: Optional[Union[int, str]] = None, shard: Shard = Shard()) -> Curvature:
    """Fit (E)K-FAC curvature of ``task``'s training loss on ``data``.

    Args:
        draws_per_forward: draws per forward pass (examples per group: ``max(1, draws_per_forward // M)``).
        checkpoint_dir: folder for resumable state; an interrupted fit resumed with it gives the same factors.
            The state records what it was computed from (model weights, data, settings); a fit with other
            inputs refuses it (``engine.CheckpointMismatch``) instead of resuming.
        model_mode: "eval" (dropout off, default) or "train" (dropout on, masks seeded per chunk); use the same
            mode for scoring.
        checkpoint_every: save every this many groups of examples; checkpoint_seconds: and at the end of the
            first group this long after the last save. SIGINT / SIGTERM during the fit stop it at the end of the
            current group, after saving (a second signal stops at once).
        partitions: fit the layers in this many groups (contiguous in module order, balanced by state size), or
            in these lists of layer names: one pair of data passes per partition, each partition's factors
            written to ``checkpoint_dir`` and dropped from memory as soon as they are done. The result is then a
            streamed ``Curvature`` (read from those files a layer at a time; ``save`` writes one file).
            Partitioned factors equal unpartitioned ones (bitwise in float64).
        max_memory: a budget (bytes or "8GiB") for the whole fit: picks ``draws_per_forward`` and the partitions
            from the memory model (``memory.plan_fit``; explicit ``partitions`` are kept).
        shard: this process's share of the data (``kfac_influence.distributed.fit_curvature`` passes it); the
            result is the same on every rank and equals one process's up to float64 summation order.
    """
    if not isinstance(config, CurvatureConfig):
        raise TypeError("config must be a CurvatureConfig")
    draws_per_forward = check_draws_per_forward(draws_per_forward)
    device, dtype = model_device_dtype(model)
    modules = select_layers(model, config.modules, config.exclude)
    specs = {nm: layer_spec(nm, mod) for nm, mod in modules.items()}
    n = num_examples(data)
    if n == 0:
        raise ValueError("the training data is empty")
    if max_memory is not None:
        plan = plan_fit(model, task, data, max_memory, config=config,
                        partitions=None if partitions is None else _partition_lists(partitions, specs, config,
                                                                                   dtype))
        draws_per_forward, partitions = plan.draws_per_forward, plan.partitions
    parts = _partition_lists(partitions if partitions is not None else 1, specs, config, dtype)
    m = int(config.num_draws or task.num_draws("train"))
    groups = shard.owned(total_groups(data, draws_per_forward, m))
    fingerprint = model_fingerprint(tracked_parameters(modules))
    identity = {"kind": "fit_state", "version": STATE_VERSION, "config": config.to_dict(), "num_examples": n,
                "draws_per_forward": draws_per_forward, "num_draws": m, "task": task_fingerprint(task),
                "model_dtype": str(dtype), "fingerprint": fingerprint, "shard": [shard.rank, shard.world_size],
                "groups": [groups.start, groups.stop], "partitions": [list(p) for p in parts]}
    folder = shard.checkpoint_dir(checkpoint_dir)
    if folder is not None:  # hashing the data costs a read: only where a checkpoint needs it
        identity["data"] = data_fingerprint(data)
    run = dict(model=model, task=task, data=data, config=config, draws_per_forward=draws_per_forward, m=m,
               groups=groups, shard=shard, progress=progress, model_mode=model_mode, device=device, dtype=dtype)
    if len(parts) == 1:
        ckpt = Checkpoint(folder, STATE_FILE, identity, every=checkpoint_every, seconds=checkpoint_seconds)
        factors = _fit_layers(modules, ckpt, **run)
        return Curvature(config, specs, factors, fingerprint, n, m)
    if folder is None:
        raise ValueError("a partitioned fit writes each partition's factors to checkpoint_dir: pass one")
    files = {}
    for k, names in enumerate(parts):
        tag = f"{k + 1}-of-{len(parts)}"
        result = Checkpoint(folder, f"partition-{tag}.safetensors", {**identity, "partition": k})
        if result.peek() is None:
            ckpt = Checkpoint(folder, f"fit_state-{tag}.safetensors", {**identity, "partition": k},
                              every=checkpoint_every, seconds=checkpoint_seconds)
            factors = _fit_layers({nm: modules[nm] for nm in names}, ckpt, **run)
            result.save({f"{nm}::{key}": t for nm, f in factors.items() for key, t in f.items()})
            del factors  # this partition's layers leave memory before the next partition's passes
            ckpt.path.unlink(missing_ok=True)  # its pass state (float64 sums) is redundant beside the result
        file = TensorFile(result.path)
        files.update({nm: file for nm in names})
    return Curvature(config, specs, LayerFiles(files), fingerprint, n, m)


def _partition_lists(partitions: Union[int, Sequence[Sequence[str]]], specs: Dict[str, LayerSpec],
                     config: CurvatureConfig, model_dtype: torch.dtype) -> List[List[str]]:
    """Layer-name lists from a partition count (contiguous in module order, balanced by fit-state bytes) or
    explicit lists (checked: every tracked layer exactly once)."""
    names = list(specs)
    if isinstance(partitions, int) and not isinstance(partitions, bool):
        k = int(partitions)
        if not 1 <= k <= len(names):
            raise ValueError(f"partitions must be between 1 and the number of tracked layers ({len(names)}), "
                             f"got {k}")
        sizes = [layer_state_bytes(specs[nm], config, model_dtype) for nm in names]
        total, out, cur, acc = sum(sizes), [], [], 0
        for i, (nm, size) in enumerate(zip(names, sizes)):
            left_parts, left_layers = k - len(out), len(names) - i
            if cur and len(out) < k - 1 and (acc + size / 2 > total * (len(out) + 1) / k
                                             or left_layers < left_parts):
                out.append(cur)
                cur = []
            cur.append(nm)
            acc += size
        out.append(cur)
        return out
    lists = [list(p) for p in partitions]
    flat = [nm for p in lists for nm in p]
    if sorted(flat) != sorted(names) or len(set(flat)) != len(flat) or any(not p for p in lists):
        raise ValueError("partitions must list every tracked layer exactly once, in non-empty groups "
                         f"(tracked: {len(names)} layers, e.g. {names[:3]})")
    return lists


def _fit_layers(modules: Dict[str, nn.Module], ckpt: Checkpoint, *, model, task, data, config, draws_per_forward, m,
                groups, shard, progress, model_mode, device, dtype) -> Dict[str, Dict[str, torch.Tensor]]:
    """Both passes and the eigendecompositions for the layers ``modules``; ``{layer: {factor: CPU tensor}}``."""
    capture = LayerCapture(modules)
    specs = capture.specs
    low = config.streamed_dtype
    loaded = ckpt.load()
    state = _FitState.restore(loaded, specs, device) if loaded else _FitState(specs, device, groups.start)

    def after_group(next_group: int) -> None:
        state.next_group = next_group
        if ckpt.should_save(next_group):
            state.save(ckpt)
            ckpt.after_save()

    def chunks(stage: str):
        return draw_pass(model, task, capture, data, "fit", num_draws=m, seed=config.seed,
                         draws_per_forward=draws_per_forward, groups=groups, start=state.next_group,
                         progress=progress, desc=f"curvature {stage}", model_mode=model_mode,
                         after_group=after_group)

    with ckpt.deferring_signals():
        if state.stage == "factors":
            def add_g(name, calls):
                cov = output_covariance(specs[name], rounded_calls(calls, low), config.approx)
                add_into(state.sums[f"{name}::G"], finite_layer_sum(name, cov, calls))
            for chunk in chunks("factors"):
                for name, calls in capture.records.items():
                    xs = [x if low is None else x.to(low) for x, _, _ in calls]
                    cov, count = input_covariance(specs[name], xs, config.approx)
                    add_into(state.sums[f"{name}::A"], finite_layer_sum(name, cov, [(x, None) for x in xs]))
                    state.counts[f"{name}::A"] += int(count)
                chunk.fisher_backward(task, config.fisher, add_g)
                state.counts["draws"] += len(chunk.draws)
        # Eigendecompositions (float64); the sums of A and G give way to the results: the eigenvalue pass holds
        # A, G and their eigenbases in the stored dtype, and a checkpoint carries them (docs/memory.md). Ranks
        # meet here even when resumed past it, since another rank may not be.
        if (state.stage == "factors" or not shard.single) and \
                _finish_factors(state, specs, config, dtype, device, shard, groups.start):
            state.save(ckpt)
        res = state.results
        if state.stage == "eigen":
            bases = {nm: tuple(res.get(f"{nm}::{q}_pass", res[f"{nm}::{q}"]) for q in ("QA", "QG"))
                     for nm in specs}
            if low is not None:
                bases = {nm: (qa.to(low), qg.to(low)) for nm, (qa, qg) in bases.items()}

            def add_lambda(name, calls):
                a, g = calls_as_rows(specs[name], rounded_calls(calls, low), patches=True)
                qa, qg = bases[name]
                add_into(state.sums[f"{name}::Lambda"], finite_layer_sum(name, kk.eigenvalue_correction(
                    a, g, qa, qg, append_one=specs[name].has_bias), calls))

            for chunk in chunks("eigenvalues"):
                chunk.fisher_backward(task, config.fisher, add_lambda)
                state.counts["eigen_draws"] += len(chunk.draws)
            state.stage = "done"
        state.save(ckpt)

    # The state is saved ("done"): its sums may now be consumed in place, a layer at a time, so the float64
    # eigenvalue sums never coexist with a reduced copy or with the whole stored-dtype result (memory.py)
    draws = torch.tensor([float(state.counts.get("eigen_draws", 0))], dtype=torch.float64, device=device)
    shard.all_reduce([draws])
    factors = {}
    for nm in specs:
        if config.method == "ekfac":
            lam = state.sums.pop(f"{nm}::Lambda")
            shard.all_reduce([lam])  # this rank's partial sums: only the saved checkpoint needed them partial
            lam = lam.div_(max(1.0, float(draws))).to("cpu", config.dtype)
        else:
            lam = torch.outer(res[f"{nm}::sG"], res[f"{nm}::sA"])
        factors[nm] = {k: v.detach().to("cpu", config.dtype) for k, v in
                       dict(A=res[f"{nm}::A"], G=res[f"{nm}::G"], QA=res[f"{nm}::QA"], QG=res[f"{nm}::QG"],
                            sA=res[f"{nm}::sA"], sG=res[f"{nm}::sG"], Lambda=lam).items()}
    return factors
