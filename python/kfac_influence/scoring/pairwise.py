"""Influence scores. S[q, n] = grad m(x_q)^T (G_hat + lambda I)^-1 grad l(x_n), summed over tracked layers
(no 1/N, no minus sign: positive = removing x_n is predicted to raise the query's measurement).

``pairwise_scores`` makes ONE pass over the training data for all queries: the preconditioned query gradients are
held on the device and each chunk's per-draw training gradients are formed inside the fused contraction
(``kfac_kernels.pairwise_scores``), never for the whole data set. Damping (lambda) is chosen here, per call: one
fitted curvature serves a damping sweep.

Sharded (``shard=``, as ``kfac_influence.distributed`` passes it): with ``split="train"`` every rank computes all
preconditioned query gradients and scores its range of training groups into its columns; with
``split="queries"`` every rank holds only its range of query groups' gradients (a ``1/world`` share of the
``Q * W`` query memory) and scores them against the whole training set into its rows. The blocks are disjoint,
so an all-reduce of zero-padded matrices gathers them. Self-scores shard the training groups the same way.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

import kfac_kernels as kk

from ..capture import LayerCapture, calls_as_rows, rounded_calls
from ..curvature.config import PRECISIONS
from ..curvature.curvature import Curvature
from ..data_iter import num_examples
from ..engine import (Checkpoint, Shard, check_draws_per_forward, draw_pass, finite_layer_sum, group_size,
                      model_device_dtype, total_groups)
from ..identity import data_fingerprint, task_fingerprint, tensors_fingerprint
from ..tasks.base import Task
from .gradients import example_gradients

STATE_FILE = "score_state.safetensors"
SPLITS = ("train", "queries")


def preconditioned_query_gradients(model: nn.Module, task: Task, curvature: Curvature, queries: Any, *,
                                   draws_per_forward: int = 32, progress: bool = False, model_mode: str = "eval",
                                   check_values: bool = True, damping: Optional[float] = None,
                                   damping_mode: Optional[str] = None, query_rank: Optional[int] = None,
                                   groups: Optional[range] = None) -> Dict[str, Any]:
    """``{layer: (Q, d_out, d_in')}``: (G_hat + lambda I)^-1 grad m(x_q), on the model's device (``damping`` /
    ``damping_mode``: as in ``Curvature.precondition``; ``groups``: only those query groups, as in
    ``example_gradients``). ``query_rank``: each layer's matrices replaced by their best rank-k approximations
    (``kfac_kernels.LowRankQueries``), a layer at a time, so the full preconditioned gradients never coexist."""
    modules = curvature.check_model(model, check_values=check_values)
    damp = curvature.resolve_damping(damping, damping_mode)
    grads = example_gradients(model, task, modules, queries, purpose="query", draws_per_forward=draws_per_forward,
                              progress=progress, model_mode=model_mode, groups=groups)
    # a layer at a time, each raw gradient dropped once preconditioned: Q * (W + largest layer), not 2 Q * W
    out = {}
    for name in list(grads):
        pre = curvature.precondition({name: grads.pop(name)}, damping=damp)[name]
        out[name] = pre if query_rank is None else kk.lowrank_queries(pre, query_rank)
    return out


def _held_queries(v, int8: bool, device: torch.device, dtype: torch.dtype):
    """A layer's preconditioned query gradients as the train pass holds them: int8, low rank or dense, on the
    model's device and dtype."""
    if int8:
        return kk.quantize_int8(v)
    if isinstance(v, kk.LowRankQueries):
        return kk.LowRankQueries(v.left.to(device=device, dtype=dtype), v.right.to(device=device, dtype=dtype))
    return v.to(device=device, dtype=dtype)


def _accumulator_dtype(model_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def pairwise_scores(model: nn.Module, task: Task, curvature: Curvature, queries: Any, train: Any, *,
                    draws_per_forward: int = 32, progress: bool = True, model_mode: str = "eval",
                    checkpoint_dir: Optional[os.PathLike] = None, checkpoint_every: Optional[int] = None,
                    checkpoint_seconds: float = 60.0, check_values: bool = True, int8_queries: bool = False,
                    damping: Optional[float] = None, damping_mode: Optional[str] = None,
                    query_rank: Optional[int] = None, precision: str = "float32",
                    preconditioned: Optional[Dict[str, torch.Tensor]] = None,
                    shard: Shard = Shard(), split: str = "train", query_batch: Optional[int] = None) -> torch.Tensor:
    """Scores ``(Q, N)`` of every query against every training example (float32, or float64 for float64 models).

    Args:
        draws_per_forward: draws per forward pass.
        checkpoint_dir: resumable state of the training pass (same result after an interruption). The state
            records what it was computed from (model, curvature values, damping, queries, training data, task
            settings); a call with other inputs refuses it (``engine.CheckpointMismatch``). Saved every
            ``checkpoint_every`` groups and ``checkpoint_seconds`` seconds; SIGINT / SIGTERM stop the pass at the
            end of the current group, after saving.
        int8_queries: quantise the preconditioned query gradients to int8 (per query and layer affine).
        query_rank: replace each layer's preconditioned query gradients by their best rank-k approximations
            (truncated SVD) and score from the projections of each example's a and g on their singular vectors
            (``kfac_kernels.lowrank_pairwise_scores``): Q k (d_out + d_in') numbers per layer instead of
            Q d_out d_in'. bench/RESULTS.md says what it costs in accuracy.
        precision: "float32" (the model's dtype), "bfloat16" or "float16": the train pass's operands (layer
            inputs, output gradients) and the held query gradients are rounded to it; products accumulate in
            float32 (see ``CurvatureConfig.precision``).
        damping, damping_mode: lambda (absolute) or rho (relative: lambda = rho * mean(Lambda) per layer);
            None: the curvature's ``default_damping``.
        preconditioned: precomputed ``preconditioned_query_gradients`` (skips the query pass; damping was
            applied when they were computed).
        shard, split: this process's share (see the module docstring); every rank returns the full matrix.
        query_batch: at most this many queries' gradients held at once (None: all of this process's): the
            queries are scored in blocks, each block a query pass and a training pass of its own, so the held
            query memory (Q W numbers, the largest term at scale) drops to ``query_batch`` W at the cost of
            ceil(Q / query_batch) training passes (``memory.plan_scores`` picks it for a budget). A block is
            whole query groups, so it holds at least ``max(1, draws_per_forward // num_draws)`` queries. With
            several blocks each has its own checkpoint folder under ``checkpoint_dir``
            (``queries-<first>-<stop>``), and a finished block is not recomputed on resume.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    low = None if precision == "float32" else PRECISIONS[precision]
    if query_rank is not None and (int(query_rank) < 1 or int8_queries):
        raise ValueError("query_rank must be >= 1, and cannot be combined with int8_queries"
                         if int8_queries else f"query_rank must be >= 1, got {query_rank}")
    if query_batch is not None and int(query_batch) < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    draws_per_forward = check_draws_per_forward(draws_per_forward)
    modules = curvature.check_model(model, check_values=check_values)
    damp = curvature.resolve_damping(damping, damping_mode)
    device, mdtype = model_device_dtype(model)
    n = num_examples(train)
    m = task.num_draws("train")
    train_groups = range(0, total_groups(train, draws_per_forward, m))
    if preconditioned is not None:
        nq_total = next(iter(preconditioned.values())).shape[0]
    else:
        nq_total = num_examples(queries)
    # query "groups": the pass's example groups of the queries, or single rows of precomputed gradients
    mq = task.num_draws("query")
    per_group = 1 if preconditioned is not None else group_size(draws_per_forward, mq)
    all_query_groups = range(0, nq_total) if preconditioned is not None \
        else range(0, total_groups(queries, draws_per_forward, mq))
    if split == "queries":
        query_groups = shard.owned(len(all_query_groups))
        if len(query_groups) == 0:  # more ranks than query groups: nothing to score here, but join the gather
            train_groups = range(0, 0)
    else:
        query_groups = all_query_groups
        train_groups = shard.owned(len(train_groups))

    def rows_of(groups: range) -> range:
        return range(min(nq_total, groups.start * per_group), min(nq_total, groups.stop * per_group))

    q_rows = rows_of(query_groups)
    blocks = [query_groups]
    if query_batch is not None and int(query_batch) < len(q_rows):  # whole groups, at most query_batch rows each
        blocks, g = [], query_groups.start
        while g < query_groups.stop:
            e = g + 1
            while e < query_groups.stop and len(rows_of(range(g, e + 1))) <= int(query_batch):
                e += 1
            blocks.append(range(g, e))
            g = e
    ids = None
    if checkpoint_dir is not None:  # hashed once, not once per block
        ids = (tensors_fingerprint([preconditioned]) if preconditioned is not None else data_fingerprint(queries),
               data_fingerprint(train))
    scores = None
    for block in blocks:
        rows = rows_of(block)
        block_dir = checkpoint_dir
        if checkpoint_dir is not None and len(blocks) > 1:
            block_dir = os.path.join(os.fspath(checkpoint_dir), f"queries-{rows.start}-{rows.stop}")
        part = _score_block(
            model, task, curvature, modules, queries, train, preconditioned=preconditioned, damp=damp,
            rows=rows, groups=None if preconditioned is not None or block == all_query_groups else block,
            train_groups=train_groups, nq_total=nq_total, draws_per_forward=draws_per_forward,
            progress=progress, model_mode=model_mode, checkpoint_dir=block_dir, ids=ids,
            checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds, int8_queries=int8_queries,
            query_rank=query_rank, precision=precision, low=low, shard=shard, split=split)
        if len(blocks) == 1:
            scores = part
        else:  # the whole matrix and one block's (memory.plan_scores counts both)
            if scores is None:
                scores = torch.zeros(len(q_rows), n, dtype=part.dtype, device=device)
            scores[rows.start - q_rows.start:rows.stop - q_rows.start] = part
        del part
    if shard.single:
        return scores
    out = torch.zeros(nq_total, n, dtype=scores.dtype, device=device)
    out[q_rows.start:q_rows.stop] = scores
    shard.all_reduce([out])
    return out


def _score_block(model, task, curvature, modules, queries, train, *, preconditioned, damp, rows: range,
                 groups: Optional[range], train_groups: range, nq_total: int, draws_per_forward: int, progress,
                 model_mode, checkpoint_dir, ids, checkpoint_every, checkpoint_seconds, int8_queries, query_rank,
                 precision, low, shard: Shard, split: str) -> torch.Tensor:
    """Scores ``(len(rows), N)`` of the query rows ``rows`` (the query groups ``groups``; None: all) against
    this process's training groups: one query pass, one training pass, one checkpoint."""
    device, mdtype = model_device_dtype(model)
    n = num_examples(train)
    m = task.num_draws("train")
    q_rows = rows
    query_groups = groups
    identity = {}
    if checkpoint_dir is not None:
        queries_id, train_id = ids
        identity = {"kind": "score_state", "version": 2, "num_queries": nq_total, "num_examples": n,
                    "draws_per_forward": draws_per_forward, "num_draws": m, "fingerprint": curvature.fingerprint,
                    "curvature": curvature.values_fingerprint(),
                    "damping": None if preconditioned is not None else damp.to_dict(),
                    "queries": queries_id, "train": train_id, "task": task_fingerprint(task),
                    "model_mode": model_mode, "int8_queries": bool(int8_queries), "query_rank": query_rank,
                    "precision": precision,
                    "split": split,
                    "shard": [shard.rank, shard.world_size], "groups": [train_groups.start, train_groups.stop],
                    "query_rows": [q_rows.start, q_rows.stop]}
    ckpt = Checkpoint(shard.checkpoint_dir(checkpoint_dir), STATE_FILE, identity, every=checkpoint_every,
                      seconds=checkpoint_seconds)
    acc = _accumulator_dtype(mdtype)
    scores = torch.zeros(len(q_rows), n, dtype=acc, device=device)
    progress_at = {"next_group": train_groups.start}
    loaded = ckpt.load()  # before the query pass: a refused checkpoint costs nothing
    if loaded is not None:
        scores = loaded[0]["scores"].to(device)
        progress_at["next_group"] = int(loaded[1]["next_group"])

    if preconditioned is not None:
        pre = {k: v[q_rows.start:q_rows.stop] for k, v in preconditioned.items()}
        if query_rank is not None:
            pre = {k: kk.lowrank_queries(v, query_rank) for k, v in pre.items()}
    elif progress_at["next_group"] >= train_groups.stop:  # a finished checkpoint: no query pass needed
        pre = {}
    else:
        pre = preconditioned_query_gradients(model, task, curvature, queries, draws_per_forward=draws_per_forward,
                                             progress=progress and shard.rank == 0, model_mode=model_mode,
                                             check_values=False, damping=damp, query_rank=query_rank,
                                             groups=query_groups)
    held = {}
    for k in list(pre):  # a layer at a time: the preconditioned and the held copy of one layer at most coexist
        held[k] = _held_queries(pre.pop(k), int8_queries, device, low or mdtype)
    pre = held

    def after_group(next_group: int) -> None:
        progress_at["next_group"] = next_group
        if ckpt.should_save(next_group):
            ckpt.save({"scores": scores}, next_group=next_group)
            ckpt.after_save()

    capture = LayerCapture(dict(modules))
    specs = capture.specs
    nq = len(q_rows)
    with ckpt.deferring_signals():
        for chunk in draw_pass(model, task, capture, train, "train", num_draws=m, seed=task.seed,
                               draws_per_forward=draws_per_forward, groups=train_groups,
                               start=progress_at["next_group"], progress=progress and shard.rank == 0,
                               desc="pairwise scores", model_mode=model_mode, after_group=after_group):
            part = torch.zeros(nq, len(chunk.draws), dtype=acc, device=device)

            def on_layer(name, calls):  # during the backward pass, as the layer's output gradient appears
                a, gr = calls_as_rows(specs[name], rounded_calls(calls, low), patches=True)
                contract = kk.lowrank_pairwise_scores if query_rank is not None else kk.pairwise_scores
                part.add_(finite_layer_sum(name, contract(
                    a, gr, pre[name], append_one=specs[name].has_bias), calls).to(acc))
            chunk.backward(task.train_loss(chunk.outputs, chunk.draws), on_layer)
            scores.index_add_(1, chunk.draws.example.to(device), part)
        ckpt.save({"scores": scores}, next_group=train_groups.stop)
    return scores


def self_scores(model: nn.Module, task: Task, curvature: Curvature, train: Any, *, draws_per_forward: int = 32,
                progress: bool = True, model_mode: str = "eval", check_values: bool = True,
                damping: Optional[float] = None, damping_mode: Optional[str] = None,
                shard: Shard = Shard()) -> torch.Tensor:
    """Self-influence ``(N,)``: grad l(x_n)^T (G_hat + lambda I)^-1 grad l(x_n) with the measurement = train loss.

    When all of an example group's draws fit in one chunk the fused ``eigenbasis_self_scores`` op is used;
    otherwise the group's per-example gradients are accumulated over chunks, then rotated. ``damping`` as in
    ``pairwise_scores``; ``shard``: score this rank's range of example groups (every rank returns the whole
    vector).
    """
    draws_per_forward = check_draws_per_forward(draws_per_forward)
    modules = curvature.check_model(model, check_values=check_values)
    damp = curvature.resolve_damping(damping, damping_mode)
    device, mdtype = model_device_dtype(model)
    n = num_examples(train)
    m = task.num_draws("train")
    acc = _accumulator_dtype(mdtype)
    out = torch.zeros(n, dtype=acc, device=device)
    capture = LayerCapture(dict(modules))
    specs = capture.specs
    pending: Dict[str, torch.Tensor] = {}

    def flush(idx):
        pre = curvature.precondition(pending, damping=damp)
        for name, v in pending.items():
            out[idx] += (pre[name].to(acc) * v.to(acc)).flatten(1).sum(1)
        pending.clear()

    for chunk in draw_pass(model, task, capture, train, "train", num_draws=m, seed=task.seed,
                           draws_per_forward=draws_per_forward,
                           groups=shard.owned(total_groups(train, draws_per_forward, m)),
                           progress=progress and shard.rank == 0, desc="self scores", model_mode=model_mode):
        idx, draws = chunk.examples, chunk.draws
        whole = len(draws) == len(idx) * m  # the whole group is in this chunk
        local = draws.example.to(device) - int(idx[0])

        def on_layer(name, calls):  # during the backward pass
            # draws of an example become extra positions below, which ConvPatches cannot express: rows then
            a, gr = calls_as_rows(specs[name], calls, patches=m == 1 or not whole)
            s = specs[name]
            if whole:
                qa, qg, lam = curvature.device_factors(name, device, mdtype)
                b = len(idx)
                a3 = a if m == 1 else a.reshape(b, -1, a.shape[-1])
                g3 = gr if m == 1 else gr.reshape(b, -1, gr.shape[-1])
                part = kk.eigenbasis_self_scores(a3, g3, qa, qg, lam, curvature.layer_damping(name, damp),
                                                 append_one=s.has_bias)
                out[idx.to(device)] += finite_layer_sum(name, part, calls).to(acc)
            else:
                per_row = kk.per_example_gradients(a, gr, append_one=s.has_bias)
                if name not in pending:
                    pending[name] = torch.zeros((len(idx),) + s.grad_shape, dtype=mdtype, device=device)
                pending[name].index_add_(0, local, finite_layer_sum(name, per_row, calls))
        chunk.backward(task.train_loss(chunk.outputs, draws), on_layer)
        if not whole and int(draws.example[-1]) == int(idx[-1]) and int(draws.draw[-1]) == m - 1:
            flush(idx.to(device))
    shard.all_reduce([out])
    return out
