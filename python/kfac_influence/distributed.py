"""Fitting and scoring across processes with torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

    # torchrun --nproc_per_node 4 my_script.py
    from kfac_influence import distributed as kd
    kd.init_from_env()                                   # gloo on CPU, NCCL (one GPU per local rank) on CUDA
    curv = kd.fit_curvature(model, task, data, cfg, batch_size=64, checkpoint_dir="ckpt")   # same on every rank
    scores = kd.pairwise_scores(model, task, curv, queries, data, batch_size=64)            # (Q, N) on every rank
    self_inf = kd.self_scores(model, task, curv, data, batch_size=64)                       # (N,) on every rank

Sharding. The engine groups examples into ``max(1, batch_size // M)`` per group (M draws per example); the
groups are numbered globally and each rank takes one contiguous range of them (``shard_groups``). Draws are
seeded by the global example index and dropout masks by the global (group, chunk) number, so every rank processes
exactly the rows one process would, with the same random numbers.

Fitting. Pass 1: each rank sums ``a a^T`` and ``g g^T`` over its rows (un-normalised, float64) and counts rows;
the sums and counts are all-reduced, then normalised and eigendecomposed (on rank 0, bases broadcast so that all
ranks hold bitwise-identical bases). Pass 2 (EK-FAC): each rank sums ``(Q_G^T DW Q_A)^2`` over its draws; the sums
are all-reduced and normalised. The result equals ``fit_curvature`` on one process up to float64 summation order.

Scoring. Every rank computes all preconditioned query gradients (queries are few), scores its range of training
groups into its columns of a zero ``(Q, N)`` matrix, and the matrices are all-reduced (a gather: the column sets
are disjoint). With ``shard="queries"`` each rank instead holds only its range of query groups' gradients (for
many queries on a big model, where ``Q * W`` dominates memory), scores them against all training data and
contributes its rows. Self-scores: each rank scores its range of groups into a zero ``(N,)`` vector; same gather.

Resume. ``checkpoint_dir`` holds one folder per rank, ``rank{r}-of-{W}``, with that rank's own partial sums (never
the reduced ones) and its stage; a job restarted with the same world size, data, batch size and config resumes
every rank where it stopped and the collective steps are simply redone.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

import kfac_kernels as kk

from .capture import LayerCapture, LayerSpec, calls_as_rows, select_layers
from .curvature.config import CurvatureConfig
from .curvature.curvature import Curvature, tracked_parameters
from .curvature.fit import _eig, input_covariance, output_covariance
from .data_iter import num_examples
from .engine import (Checkpointer, examples_of_groups, fisher_backprop, forward_capture, iter_groups,
                     layer_gradients, model_device_dtype, progress_bar, seeded_rng, total_groups, use_model_mode)
from .scoring import pairwise as _single
from .scoring.pairwise import preconditioned_query_gradients
from .storage import load_tensors, model_fingerprint, save_tensors
from .tasks.base import Task

__all__ = ["init_from_env", "world", "shard_groups", "fit_curvature", "pairwise_scores", "self_scores", "FIT_STATE",
           "SCORE_STATE"]

FIT_STATE = "dist_fit_state.safetensors"
SCORE_STATE = "dist_score_state.safetensors"


def init_from_env(backend: Optional[str] = None, timeout_s: float = 1800.0) -> Tuple[int, int]:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    ``backend``: "gloo" or "nccl" (default: NCCL when CUDA is available, else gloo). With NCCL the process's CUDA
    device is set to LOCAL_RANK. Returns ``(rank, world_size)``; a no-op when already initialised.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("RANK / WORLD_SIZE are not set: launch with torchrun (or call "
                               "torch.distributed.init_process_group yourself)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def world(group=None) -> Tuple[int, int]:
    """``(rank, world_size)`` of ``group`` (the default group when None); ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_groups(num_groups: int, world_size: int, rank: int) -> range:
    """Contiguous range of global group numbers for ``rank``: sizes differ by at most one, lower ranks first."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    base, extra = divmod(num_groups, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + int(rank < extra))


def _all_reduce(tensors, group) -> None:
    """Sum tensors across ranks in place, flattened into one buffer per dtype (one collective per dtype)."""
    if world(group)[1] == 1:
        return
    by_dtype: Dict[torch.dtype, list] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()


def _broadcast(tensors, group) -> None:
    if world(group)[1] == 1:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for t in tensors:
        dist.broadcast(t, src=src, group=group)


class _RankState:
    """One rank's partial (un-normalised) sums, counts, stage and progress within its group range."""

    def __init__(self, specs: Dict[str, LayerSpec], device: torch.device):
        self.stage, self.done = "factors", 0
        self.sums = {}
        for n, s in specs.items():
            self.sums[f"{n}::A"] = torch.zeros(s.d_in_total, s.d_in_total, dtype=torch.float64, device=device)
            self.sums[f"{n}::G"] = torch.zeros(s.d_out, s.d_out, dtype=torch.float64, device=device)
            self.sums[f"{n}::Lambda"] = torch.zeros(s.d_out, s.d_in_total, dtype=torch.float64, device=device)
        # counts as float64 tensors so that they reduce with the sums: A rows per layer, draws, eigen draws
        self.counts = torch.zeros(len(specs) + 2, dtype=torch.float64, device=device)

    def save(self, path: Path, header: dict) -> None:
        save_tensors(path, {**self.sums, "__counts__": self.counts},
                     {**header, "stage": self.stage, "groups_done": self.done})

    @classmethod
    def load(cls, path: Path, header: dict, specs, device) -> "_RankState":
        tensors, saved = load_tensors(path)
        for key, want in header.items():
            if saved.get(key) != want:
                raise ValueError(f"the checkpoint {path} was made with a different {key} ({saved.get(key)!r} vs "
                                 f"{want!r}); delete it or use another checkpoint_dir")
        st = cls(specs, device)
        st.stage, st.done = saved["stage"], int(saved["groups_done"])
        st.counts = tensors.pop("__counts__").to(device)
        st.sums = {k: v.to(device) for k, v in tensors.items()}
        return st


def _rank_dir(checkpoint_dir, rank: int, size: int) -> Optional[Path]:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"rank{rank}-of-{size}"


def _shard_pass(model, task, capture, data, groups: range, *, purpose, num_draws, seed, batch_size, start, saver,
                on_chunk, desc, progress, device, dtype, done_callback=None):
    """Forward (with capture) every chunk of the global groups ``groups`` from ``groups.start + start`` on."""
    bar = progress_bar(len(groups), desc, progress, initial=start)
    if groups.start + start < groups.stop:
        for g, idx, chunks in iter_groups(task, data, purpose, num_draws=num_draws, seed=seed,
                                          batch_size=batch_size, start=groups.start + start, stop=groups.stop):
            for c, rows in enumerate(chunks):
                rows = rows.to(device, dtype)
                with seeded_rng(seed, g, c, device):
                    f = forward_capture(model, task, capture, rows)
                    on_chunk(g, idx, rows, f)
            if done_callback is not None:
                done_callback(g - groups.start + 1)
            saver.after_group(g - groups.start + 1)
            bar.update(1)
    bar.close()


def fit_curvature(model: nn.Module, task: Task, data: Any, config: CurvatureConfig = CurvatureConfig(), *,
                  batch_size: int = 32, checkpoint_dir: Optional[os.PathLike] = None, progress: bool = True,
                  model_mode: str = "eval", checkpoint_every: Optional[int] = None, group=None) -> Curvature:
    """``kfac_influence.fit_curvature`` with the data sharded over the ranks of ``group``; returns the same
    ``Curvature`` on every rank. Every rank passes the full ``data`` (only its shard is read) and the same model.

    Args: as ``fit_curvature``; ``checkpoint_dir`` gets one sub-folder per rank; ``group``: a process group
    (default: the world). Without an initialised process group this runs as one process.
    """
    if not isinstance(config, CurvatureConfig):
        raise TypeError("config must be a CurvatureConfig")
    rank, size = world(group)
    device, dtype = model_device_dtype(model)
    modules = select_layers(model, config.modules, config.exclude)
    capture = LayerCapture(modules)
    specs = capture.specs
    names = list(specs)
    n = num_examples(data)
    if n == 0:
        raise ValueError("the training data is empty")
    m = int(config.num_draws or task.num_draws("train"))
    groups = shard_groups(total_groups(data, batch_size, m), size, rank)
    fingerprint = model_fingerprint(tracked_parameters(modules))
    header = {"kind": "dist_fit_state", "config": config.to_dict(), "num_examples": n, "batch_size": int(batch_size),
              "num_draws": m, "task": type(task).__name__, "fingerprint": fingerprint, "rank": rank,
              "world_size": size, "groups": [groups.start, groups.stop]}
    folder = _rank_dir(checkpoint_dir, rank, size)
    ckpt = folder / FIT_STATE if folder is not None else None
    st = _RankState.load(ckpt, header, specs, device) if ckpt is not None and ckpt.exists() \
        else _RankState(specs, device)
    saver = Checkpointer((lambda done: st.save(ckpt, header)) if ckpt else None, every=checkpoint_every)
    col = {nm: i for i, nm in enumerate(names)}
    ndraw, neig = len(names), len(names) + 1

    def set_done(k):
        st.done = k

    def backprop(rows, f, on_layer):
        fisher_backprop(capture, task, f, rows, config.fisher, on_layer)

    def factors_chunk(g, idx, rows, f):
        for name, calls in capture.records.items():
            cov, count = input_covariance(specs[name], [x for x, _, _ in calls], config.approx)
            st.sums[f"{name}::A"] += cov
            st.counts[col[name]] += float(count)
        def add_g(name, calls):
            st.sums[f"{name}::G"] += output_covariance(specs[name], calls, config.approx)
        backprop(rows, f, add_g)
        st.counts[ndraw] += len(rows)

    run = dict(purpose="fit", num_draws=m, seed=config.seed, batch_size=batch_size, saver=saver, progress=progress,
               device=device, dtype=dtype, done_callback=set_done)
    with use_model_mode(model, model_mode):
        if st.stage == "factors":
            _shard_pass(model, task, capture, data, groups, start=st.done, on_chunk=factors_chunk,
                        desc="curvature factors", **run)
        # reduce copies: the rank's own sums stay partial (and checkpointed as such)
        A = {nm: st.sums[f"{nm}::A"].clone() for nm in names}
        G = {nm: st.sums[f"{nm}::G"].clone() for nm in names}
        counts = st.counts.clone()
        _all_reduce([*A.values(), *G.values(), counts], group)
        for nm in names:
            A[nm] /= max(1.0, float(counts[col[nm]]))
            G[nm] /= max(1.0, float(counts[ndraw]))
        eig = {}
        for nm in names:
            (sA, QA), (sG, QG) = _eig(A[nm]), _eig(G[nm])
            sA, QA, sG, QG = (t.contiguous() for t in (sA, QA, sG, QG))
            _broadcast([sA, QA, sG, QG], group)
            eig[nm] = ((sA, QA), (sG, QG))
        lam = {}
        if config.method == "ekfac":
            if st.stage == "factors":
                st.stage, st.done = "eigen", 0
                if ckpt:
                    st.save(ckpt, header)
            bases = {nm: (eig[nm][0][1].to(dtype), eig[nm][1][1].to(dtype)) for nm in names}

            def add_lambda(name, calls):
                a, gr = calls_as_rows(specs[name], calls, patches=True)
                qa, qg = bases[name]
                st.sums[f"{name}::Lambda"] += kk.eigenvalue_correction(a, gr, qa, qg, append_one=specs[name].has_bias)

            def eigen_chunk(g, idx, rows, f):
                backprop(rows, f, add_lambda)
                st.counts[neig] += len(rows)

            if st.stage == "eigen":
                _shard_pass(model, task, capture, data, groups, start=st.done, on_chunk=eigen_chunk,
                            desc="curvature eigenvalues", **run)
            lam = {nm: st.sums[f"{nm}::Lambda"].clone() for nm in names}
            ecount = st.counts[neig:neig + 1].clone()
            _all_reduce([*lam.values(), ecount], group)
            lam = {nm: v / max(1.0, float(ecount)) for nm, v in lam.items()}
        st.stage = "done"
        if ckpt:
            st.save(ckpt, header)

    factors = {}
    for nm in names:
        (sA, QA), (sG, QG) = eig[nm]
        lam_nm = lam[nm] if config.method == "ekfac" else torch.outer(sG, sA)
        factors[nm] = {k: v.detach().to("cpu", config.dtype) for k, v in
                       dict(A=A[nm], G=G[nm], QA=QA, QG=QG, sA=sA, sG=sG, Lambda=lam_nm).items()}
    return Curvature(config, specs, factors, fingerprint, n, m)


def pairwise_scores(model: nn.Module, task: Task, curvature: Curvature, queries: Any, train: Any, *,
                    batch_size: int = 32, progress: bool = True, model_mode: str = "eval",
                    checkpoint_dir: Optional[os.PathLike] = None, checkpoint_every: Optional[int] = None,
                    check_values: bool = True, int8_queries: bool = False,
                    preconditioned: Optional[Dict[str, torch.Tensor]] = None, group=None,
                    shard: str = "train") -> torch.Tensor:
    """``kfac_influence.pairwise_scores`` across the ranks of ``group``; returns the full ``(Q, N)`` scores on
    every rank (float32, or float64 for float64 models).

    ``shard="train"``: every rank computes all preconditioned query gradients (or takes ``preconditioned``),
    scores its range of training groups, and the column blocks are gathered by an all-reduce of disjoint columns.
    ``shard="queries"``: every rank computes only its range of query groups' gradients (a ``1/world`` share of
    the ``Q * W`` query memory, which dominates for many queries on a big model) and scores them against the
    whole training set (each rank reads all of it); the row blocks are gathered the same way. Draws are those of
    one process either way. ``checkpoint_dir`` gets one sub-folder per rank with that rank's block and progress.
    """
    if shard not in ("train", "queries"):
        raise ValueError(f"shard must be 'train' or 'queries', got {shard!r}")
    rank, size = world(group)
    modules = curvature.check_model(model, check_values=check_values)
    device, mdtype = model_device_dtype(model)
    n = num_examples(train)
    m = task.num_draws("train")
    nq_total = num_examples(queries)
    if shard == "queries":
        qgroups = shard_groups(total_groups(queries, batch_size, task.num_draws("query")), size, rank)
        q_rows = examples_of_groups(qgroups, nq_total, batch_size, task.num_draws("query"))
        groups = range(0, total_groups(train, batch_size, m))
    else:
        qgroups, q_rows = None, range(0, nq_total)
        groups = shard_groups(total_groups(train, batch_size, m), size, rank)
    if preconditioned is not None:
        pre = {k: v[q_rows.start:q_rows.stop] for k, v in preconditioned.items()}
    else:
        pre = preconditioned_query_gradients(model, task, curvature, queries, batch_size=batch_size,
                                             progress=progress and rank == 0, model_mode=model_mode,
                                             check_values=False, groups=qgroups)
    pre = {k: (kk.quantize_int8(v) if int8_queries else v.to(device=device, dtype=mdtype)) for k, v in pre.items()}
    nq = len(q_rows)
    if nq == 0:  # more ranks than query groups: nothing to score here, but join the gather below
        groups = range(groups.start, groups.start)
    acc = torch.float64 if mdtype == torch.float64 else torch.float32
    scores = torch.zeros(nq, n, dtype=acc, device=device)
    header = {"kind": "dist_score_state", "num_queries": nq, "num_examples": n, "batch_size": int(batch_size),
              "num_draws": m, "fingerprint": curvature.fingerprint, "seed": task.seed, "rank": rank,
              "world_size": size, "groups": [groups.start, groups.stop], "int8_queries": bool(int8_queries),
              "shard": shard, "query_rows": [q_rows.start, q_rows.stop]}
    folder = _rank_dir(checkpoint_dir, rank, size)
    ckpt = folder / SCORE_STATE if folder is not None else None
    progress_state = {"done": 0}
    if ckpt is not None and ckpt.exists():
        tensors, saved = load_tensors(ckpt)
        for key, want in header.items():
            if saved.get(key) != want:
                raise ValueError(f"the checkpoint {ckpt} was made with a different {key}; delete it or use "
                                 "another checkpoint_dir")
        scores = tensors["scores"].to(device)
        progress_state["done"] = int(saved["groups_done"])

    capture = LayerCapture(dict(modules))
    specs = capture.specs

    def on_chunk(g, idx, rows, f):
        loss = task.train_loss(f, rows)
        part = torch.zeros(nq, len(rows), dtype=acc, device=device)

        def on_layer(name, calls):  # during the backward pass
            a, gr = calls_as_rows(specs[name], calls, patches=True)
            part.add_(kk.pairwise_scores(a, gr, pre[name], append_one=specs[name].has_bias).to(acc))
        layer_gradients(capture, loss, torch.full_like(loss, rows.weight), False, on_layer=on_layer)
        scores.index_add_(1, rows.example.to(device), part)

    def save(done):
        save_tensors(ckpt, {"scores": scores}, {**header, "groups_done": done})

    def set_done(k):
        progress_state["done"] = k

    with use_model_mode(model, model_mode):
        _shard_pass(model, task, capture, train, groups, purpose="train", num_draws=m, seed=task.seed,
                    batch_size=batch_size, start=progress_state["done"],
                    saver=Checkpointer(save if ckpt else None, every=checkpoint_every), on_chunk=on_chunk,
                    desc="pairwise scores", progress=progress and rank == 0, device=device, dtype=mdtype,
                    done_callback=set_done)
    if ckpt is not None:
        save(len(groups))
    out = torch.zeros(nq_total, n, dtype=acc, device=device)
    out[q_rows.start:q_rows.stop] = scores
    _all_reduce([out], group)
    return out


def self_scores(model: nn.Module, task: Task, curvature: Curvature, train: Any, *, batch_size: int = 32,
                progress: bool = True, model_mode: str = "eval", check_values: bool = True,
                group=None) -> torch.Tensor:
    """``kfac_influence.self_scores`` with the training set sharded over the ranks of ``group``; returns the full
    ``(N,)`` self-influence on every rank. Each rank scores its range of example groups (one pass, no checkpoint,
    like the single-process function) and the disjoint entries are gathered by an all-reduce."""
    rank, size = world(group)
    shard = shard_groups(total_groups(train, batch_size, task.num_draws("train")), size, rank)
    out = _single.self_scores(model, task, curvature, train, batch_size=batch_size, progress=progress and rank == 0,
                              model_mode=model_mode, check_values=check_values, groups=shard)
    _all_reduce([out], group)
    return out
