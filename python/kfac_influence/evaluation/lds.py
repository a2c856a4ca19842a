"""Linear datamodelling score (LDS): does the attribution predict how retraining on a subset changes a query?

Protocol (Park et al. 2023; Mlodozeniec et al. 2025, section 5):
  1. M random subsets S_j of the N training examples, each keeping ``round(alpha * N)`` examples
     (``keep: (M, N)`` bool).
  2. Retrain K times per subset (training seeds ``seed_offset + k``, the same K seeds for every subset, so a seed's
     initialisation is shared across subsets: common random numbers for the retraining noise).
  3. Ground truth: measurement of every query under every retrained model, ``(K, Q, M)``, with the SAME (t, eps)
     draws for every model (``ground_truth.task_measurements`` draws them from seeds that depend only on the query
     index), averaged over the K seeds -> ``(Q, M)``.
  4. Prediction for query q and subset j: the sum of the scores of the REMOVED examples,
     ``pred[q, j] = sum_{n not in S_j} S[q, n]``. With the package's sign convention (positive score = removing
     the example is predicted to raise the measurement), the predicted measurement of the subset model rises with
     this sum, so the LDS is the plain Spearman correlation of ``pred[q]`` with ``truth[q]`` across subsets
     (no sign flip; a negated score matrix gives minus the LDS).
  5. LDS = mean over queries of that Spearman correlation, with its standard error over queries.
  Oracle ceiling: Spearman of one seed's measurement against the mean of the other seeds' (per query, averaged
  over the held-out seed): how well retraining itself predicts retraining.

Everything is cached under one folder (atomic writes) and a run resumes where it stopped:
  root/lds.json                          config, number of examples, user key
  root/subsets.safetensors               keep mask (M, N)
  root/models/s{j:04d}_k{k}.safetensors  state dict of retrained model (j, k)
  root/measurements/{name}/s{j:04d}_k{k}.safetensors   measurements {target: (Q,)} of that model
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..storage import atomic_write_json, load_tensors, save_tensors
from .stats import MeanSE, spearman_rows

TrainFn = Callable[[torch.Tensor, int], nn.Module]
MeasureFn = Callable[[nn.Module], Union[torch.Tensor, Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class LDSConfig:
    """num_subsets M, num_seeds K (retrainings per subset), alpha: fraction of the training set KEPT in each
    subset (the paper: 0.5), seed: seeds the subsets, seed_offset: training seed of retraining k is
    ``seed_offset + k``."""
    num_subsets: int = 100
    num_seeds: int = 5
    alpha: float = 0.5
    seed: int = 0
    seed_offset: int = 0

    def __post_init__(self):
        if int(self.num_subsets) < 2:
            raise ValueError(f"LDSConfig.num_subsets must be >= 2 (a rank correlation over subsets), "
                             f"got {self.num_subsets}")
        if int(self.num_seeds) < 1:
            raise ValueError(f"LDSConfig.num_seeds must be >= 1, got {self.num_seeds}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"LDSConfig.alpha (fraction kept) must lie in (0, 1), got {self.alpha}")


def make_subsets(num_examples: int, config: LDSConfig) -> torch.Tensor:
    """Seeded random subsets: ``keep (M, N)`` bool, each row with ``round(alpha * N)`` True entries (>= 1 kept,
    >= 1 removed). Row j depends only on (config.seed, j), so adding subsets keeps the first ones."""
    n = int(num_examples)
    if n < 2:
        raise ValueError(f"LDS needs at least 2 training examples, got {n}")
    k = min(n - 1, max(1, int(round(config.alpha * n))))
    keep = torch.zeros(config.num_subsets, n, dtype=torch.bool)
    for j in range(config.num_subsets):
        state = np.random.SeedSequence([int(config.seed) & 0xFFFFFFFF, j, 17]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        keep[j, torch.randperm(n, generator=gen)[:k]] = True
    return keep


def removed_score_sums(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``pred[q, j] = sum_{n removed from subset j} scores[q, n]``: ``(Q, N), (M, N) -> (Q, M)`` (float64)."""
    scores = torch.as_tensor(scores).double().cpu()
    keep = torch.as_tensor(keep).bool().cpu()
    if scores.dim() != 2 or keep.dim() != 2 or scores.shape[1] != keep.shape[1]:
        raise ValueError(f"scores (Q, N) and keep (M, N) must share N; got {tuple(scores.shape)} and "
                         f"{tuple(keep.shape)}")
    return scores @ (~keep).double().T


def lds(scores: torch.Tensor, keep: torch.Tensor, truth: torch.Tensor) -> MeanSE:
    """LDS of a score matrix ``(Q, N)`` against ground truth ``(Q, M)`` or per-seed ``(K, Q, M)`` (averaged over
    seeds). Returns the per-query Spearman correlations with their mean and standard error."""
    truth = torch.as_tensor(truth).double().cpu()
    if truth.dim() == 3:
        truth = truth.mean(0)
    pred = removed_score_sums(scores, keep)
    if truth.shape != pred.shape:
        raise ValueError(f"ground truth has shape {tuple(truth.shape)}, predictions {tuple(pred.shape)} (Q, M)")
    return MeanSE.of(spearman_rows(pred.numpy(), truth.numpy()))


def oracle_ceiling(measurements: torch.Tensor) -> MeanSE:
    """Retraining-vs-retraining ceiling from per-seed measurements ``(K, Q, M)``, K >= 2: per query, the mean over
    k of Spearman(measurement of seed k, mean of the other seeds' measurements)."""
    m = torch.as_tensor(measurements).double().cpu()
    if m.dim() != 3 or m.shape[0] < 2:
        raise ValueError(f"the oracle ceiling needs per-seed measurements (K >= 2, Q, M), got {tuple(m.shape)}")
    k = m.shape[0]
    rhos = []
    for i in range(k):
        others = torch.cat([m[:i], m[i + 1:]]).mean(0)
        rhos.append(spearman_rows(m[i].numpy(), others.numpy()))
    return MeanSE.of(np.nanmean(np.stack(rhos), axis=0) if k > 1 else rhos[0])


def _job_name(j: int, k: int) -> str:
    return f"s{j:04d}_k{k}.safetensors"


class LDSRun:
    """Cached retraining on random subsets and cached ground-truth measurements.

    Args:
        root: cache folder (created). A folder made with a different config, N or ``key`` is refused.
        num_examples: N.
        config: LDSConfig.
        train_fn: ``(kept_indices (n_keep,) int64 sorted, seed) -> trained nn.Module`` (on CPU or any device).
        build_fn: ``() -> nn.Module`` with the retrained models' architecture, to reload cached models (needed only
            when a new measurement is asked of models trained earlier).
        key: any JSON-able description of what is being retrained (data, trainer settings); checked on reuse.
    """

    def __init__(self, root: os.PathLike, num_examples: int, config: LDSConfig, train_fn: Optional[TrainFn] = None,
                 build_fn: Optional[Callable[[], nn.Module]] = None, key=None):
        self.root = Path(root)
        self.num_examples = int(num_examples)
        self.config = config
        self.train_fn = train_fn
        self.build_fn = build_fn
        self.key = key
        meta = {"kind": "lds", "config": asdict(config), "num_examples": self.num_examples, "key": key}
        meta_path = self.root / "lds.json"
        if meta_path.exists():
            saved = json.loads(meta_path.read_text())
            for field in ("config", "num_examples", "key"):
                if json.dumps(saved.get(field), sort_keys=True) != json.dumps(meta[field], sort_keys=True):
                    raise ValueError(f"{self.root} holds an LDS run with a different {field} "
                                     f"({saved.get(field)!r} vs {meta[field]!r}); use another folder")
        else:
            atomic_write_json(meta_path, meta)
        sub_path = self.root / "subsets.safetensors"
        if sub_path.exists():
            self.keep = load_tensors(sub_path)[0]["keep"].bool()
        else:
            self.keep = make_subsets(self.num_examples, config)
            save_tensors(sub_path, {"keep": self.keep.to(torch.uint8)}, {"kind": "lds_subsets"})

    # ---- retraining ---------------------------------------------------------------------------------------
    @property
    def jobs(self) -> List[Tuple[int, int]]:
        """All (subset j, seed k) pairs, subset-major."""
        return [(j, k) for j in range(self.config.num_subsets) for k in range(self.config.num_seeds)]

    def model_path(self, j: int, k: int) -> Path:
        return self.root / "models" / _job_name(j, k)

    def kept_indices(self, j: int) -> torch.Tensor:
        return torch.nonzero(self.keep[j]).flatten()

    def training_seed(self, k: int) -> int:
        return int(self.config.seed_offset) + int(k)

    def missing_models(self) -> List[Tuple[int, int]]:
        return [(j, k) for j, k in self.jobs if not self.model_path(j, k).exists()]

    def _train_one(self, j: int, k: int) -> None:
        if self.train_fn is None:
            raise RuntimeError("this LDSRun has no train_fn; models are missing: "
                               f"{self.missing_models()[:3]}...")
        model = self.train_fn(self.kept_indices(j), self.training_seed(k))
        if not isinstance(model, nn.Module):
            raise TypeError(f"train_fn must return an nn.Module, got {type(model).__name__}")
        state = {n: t.detach().cpu() for n, t in model.state_dict().items()}
        save_tensors(self.model_path(j, k), state, {"kind": "lds_model", "subset": j, "seed": k})

    def retrain(self, jobs: Optional[Sequence[Tuple[int, int]]] = None, *, num_workers: int = 1,
                progress: bool = True, threads_per_worker: int = 1) -> int:
        """Train every missing model (or the missing ones among ``jobs``); returns how many were trained.

        ``num_workers > 1`` forks that many processes (POSIX only; ``train_fn`` is inherited, not pickled), each
        with ``threads_per_worker`` torch threads, working through a share of the jobs. A crashed worker makes
        this raise after the others finish; everything already saved stays cached.
        """
        todo = [jk for jk in (jobs if jobs is not None else self.jobs) if not self.model_path(*jk).exists()]
        if not todo:
            return 0
        bar = tqdm(total=len(todo), desc="retrain subsets", disable=not progress, unit="model")
        if num_workers <= 1:
            for j, k in todo:
                self._train_one(j, k)
                bar.update(1)
            bar.close()
            return len(todo)
        ctx = mp.get_context("fork")
        procs = []
        for w in range(num_workers):
            share = todo[w::num_workers]
            if share:
                p = ctx.Process(target=_worker, args=(self, share, threads_per_worker), daemon=False)
                p.start()
                procs.append(p)
        done = 0
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            now = sum(self.model_path(*jk).exists() for jk in todo)
            bar.update(now - done)
            done = now
        bar.close()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} retraining worker(s) failed (exit codes {bad}); "
                               f"{len(self.missing_models())} models still missing; rerun to resume")
        return len(todo)

    def load_model(self, j: int, k: int) -> nn.Module:
        if self.build_fn is None:
            raise RuntimeError("load_model needs build_fn (the retrained models' architecture)")
        model = self.build_fn()
        state, _ = load_tensors(self.model_path(j, k))
        model.load_state_dict(state)
        return model.eval()

    # ---- ground truth ------------------------------------------------------------------------------------
    def measurement_path(self, name: str, j: int, k: int) -> Path:
        return self.root / "measurements" / name / _job_name(j, k)

    def measure(self, name: str, measure_fn: MeasureFn, *, progress: bool = True) -> Dict[str, torch.Tensor]:
        """Measurements ``{target: (K, Q, M)}`` of every retrained model, cached under ``name``.

        ``measure_fn(model)`` returns ``(Q,)`` (stored as target ``name``) or ``{target: (Q,)}``; it must use the
        same draws for every model (common random numbers; see ``ground_truth.task_measurements``)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad measurement name {name!r}")
        todo = [jk for jk in self.jobs if not self.measurement_path(name, *jk).exists()]
        for j, k in tqdm(todo, desc=f"measure {name}", disable=not progress or not todo, unit="model"):
            if not self.model_path(j, k).exists():
                self._train_one(j, k)
            model = self.load_model(j, k)
            with torch.no_grad():
                out = measure_fn(model)
            out = {name: out} if torch.is_tensor(out) else dict(out)
            save_tensors(self.measurement_path(name, j, k), {t: v.detach().double().cpu().reshape(-1)
                                                             for t, v in out.items()},
                         {"kind": "lds_measurement", "name": name, "subset": j, "seed": k})
        per: Dict[str, torch.Tensor] = {}
        K, M = self.config.num_seeds, self.config.num_subsets
        for j, k in self.jobs:
            tensors, _ = load_tensors(self.measurement_path(name, j, k))
            for t, v in tensors.items():
                if t not in per:
                    per[t] = torch.full((K, v.numel(), M), float("nan"), dtype=torch.float64)
                per[t][k, :, j] = v
        return per

    # ---- scores ------------------------------------------------------------------------------------------
    def lds(self, scores: torch.Tensor, truth: torch.Tensor) -> MeanSE:
        """LDS of ``scores (Q, N)`` against ``truth (K, Q, M)`` (from ``measure``) on this run's subsets."""
        return lds(scores, self.keep, truth)

    def oracle(self, truth: torch.Tensor) -> MeanSE:
        return oracle_ceiling(truth)


def _worker(run: LDSRun, jobs, threads: int) -> None:  # pragma: no cover - runs in a forked child
    torch.set_num_threads(max(1, int(threads)))
    code = 0
    try:
        for j, k in jobs:
            if not run.model_path(j, k).exists():
                run._train_one(j, k)
    except BaseException as e:  # report and exit non-zero; the parent raises
        traceback.print_exc()
        code = 1
        del e
    os._exit(code)
