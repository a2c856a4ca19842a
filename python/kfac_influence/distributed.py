"""Fitting and scoring across processes with torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

    # torchrun --nproc_per_node 4 my_script.py
    from kfac_influence import distributed as kd
    kd.init_from_env()                                   # gloo on CPU, NCCL (one GPU per local rank) on CUDA
    curv = kd.fit_curvature(model, task, data, cfg, draws_per_forward=64, checkpoint_dir="ckpt")  # every rank
    scores = kd.pairwise_scores(model, task, curv, queries, data, draws_per_forward=64)   # (Q, N) on every rank
    self_inf = kd.self_scores(model, task, curv, data, draws_per_forward=64)              # (N,) on every rank

This module holds only the process-group helpers and thin entry points: the passes are the single-process ones
(``engine.draw_pass``), given this process's ``engine.Shard``.

Sharding. The engine groups examples into ``max(1, draws_per_forward // M)`` per group (M draws per example); the
groups are numbered globally and each rank takes one contiguous range of them (``shard_groups``). Draws are
seeded by the global example index and dropout masks by the global (group, chunk) number, so every rank processes
exactly the rows one process would, with the same random numbers.

Fitting. Pass 1: each rank sums ``a a^T`` and ``g g^T`` over its draws (un-normalised, float64) and counts them;
the sums and counts are all-reduced layer by layer, and layer i is normalised and eigendecomposed by rank i % W,
which broadcasts its results (every rank then holds bitwise-identical factors and bases). Pass 2 (EK-FAC): each
rank sums ``(Q_G^T DW Q_A)^2`` over its draws; the sums are all-reduced and normalised. The result equals
``fit_curvature`` on one process up to float64 summation order.

Scoring. Every rank computes all preconditioned query gradients (queries are few), scores its range of training
groups into its columns of a zero ``(Q, N)`` matrix, and the matrices are all-reduced (a gather: the column sets
are disjoint). With ``shard="queries"`` each rank instead holds only its range of query groups' gradients (for
many queries on a big model, where ``Q * W`` dominates memory), scores them against all training data and
contributes its rows. Self-scores: each rank scores its range of groups into a zero ``(N,)`` vector; same gather.

Resume. ``checkpoint_dir`` holds one folder per rank, ``rank{r}-of-{W}``, with that rank's state: its own partial
sums and stage, and after pass 1 the (shared) factor results; a job restarted with the same world size, inputs
and settings resumes every rank where it stopped and the collective steps are redone (a rank that lost its
partial sums of pass 1 takes the results from a rank that saved them).
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .curvature.config import CurvatureConfig
from .curvature.curvature import Curvature
from .curvature.fit import fit_curvature as _fit
from .engine import Shard, shard_groups
from .scoring import pairwise as _scoring
from .tasks.base import Task

__all__ = ["init_from_env", "world", "shard_groups", "fit_curvature", "pairwise_scores", "self_scores"]


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
    shard = Shard.of(group)
    return shard.rank, shard.world_size


def fit_curvature(model: nn.Module, task: Task, data: Any, config: CurvatureConfig = CurvatureConfig(), *,
                  group=None, **kwargs) -> Curvature:
    """``kfac_influence.fit_curvature`` with the data sharded over the ranks of ``group`` (default: the world);
    returns the same ``Curvature`` on every rank. Every rank passes the full ``data`` (only its shard is read)
    and the same model; ``checkpoint_dir`` gets one sub-folder per rank. Without an initialised process group
    this runs as one process."""
    return _fit(model, task, data, config, shard=Shard.of(group), **kwargs)


def pairwise_scores(model: nn.Module, task: Task, curvature: Curvature, queries: Any, train: Any, *, group=None,
                    shard: str = "train", **kwargs) -> torch.Tensor:
    """``kfac_influence.pairwise_scores`` across the ranks of ``group``; returns the full ``(Q, N)`` scores on
    every rank. ``shard="train"`` splits the training groups over the ranks, ``shard="queries"`` the query
    groups (see ``kfac_influence.scoring.pairwise``). Draws are those of one process either way."""
    return _scoring.pairwise_scores(model, task, curvature, queries, train, shard=Shard.of(group), split=shard,
                                    **kwargs)


def self_scores(model: nn.Module, task: Task, curvature: Curvature, train: Any, *, group=None,
                **kwargs) -> torch.Tensor:
    """``kfac_influence.self_scores`` with the training groups sharded over the ranks of ``group``; returns the
    full ``(N,)`` self-influence on every rank."""
    return _scoring.self_scores(model, task, curvature, train, shard=Shard.of(group), **kwargs)
