"""Retraining without the top-scored examples: a counterfactual check of an attribution.

For every query q and percentage p: remove the ``ceil(p/100 * N)`` training examples with the LARGEST scores for q
(the package's sign convention: those predicted to raise q's measurement most when removed), retrain with seeds
``seed_offset + k``, and measure q; do the same after removing as many examples chosen at random (seeded by
(seed, q, p)); and measure q under the models trained on all the data with the same seeds. Reported per p:
``delta_top[q] = m_q(without top) - m_q(full)`` and ``delta_random[q]`` (averaged over seeds), their means over
queries with standard errors, and the paired difference ``top - random``. With ``measurement = loss`` a good
attribution gives a clearly positive ``top - random`` (the query becomes less likely).

Cache (atomic writes; a rerun resumes): ``root/models/{full|top|random}..safetensors`` (state dicts) and
``root/measurements/...safetensors`` (the measurement of all queries under each model).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..storage import atomic_write_json, load_tensors, save_tensors
from .stats import MeanSE


@dataclass(frozen=True)
class RetrainTopConfig:
    """percents: p values (% of N removed); num_seeds: retrainings per case; seed: random-removal seed;
    queries: indices of the queries to test (None: all); seed_offset: training seed of retraining k."""
    percents: Tuple[float, ...] = (2.0, 10.0)
    num_seeds: int = 1
    seed: int = 0
    queries: Optional[Tuple[int, ...]] = None
    seed_offset: int = 0

    def __post_init__(self):
        object.__setattr__(self, "percents", tuple(float(p) for p in self.percents))
        if not self.percents or any(not 0 < p < 100 for p in self.percents):
            raise ValueError(f"percents must lie in (0, 100), got {self.percents}")
        if int(self.num_seeds) < 1:
            raise ValueError("num_seeds must be >= 1")
        if self.queries is not None:
            object.__setattr__(self, "queries", tuple(int(q) for q in self.queries))


def num_removed(num_examples: int, percent: float) -> int:
    return max(1, min(num_examples - 1, int(math.ceil(percent / 100.0 * num_examples))))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(Q, k)`` indices of the k largest scores per query (ties broken by index)."""
    s = torch.as_tensor(scores).double()
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]


def random_indices(num_examples: int, k: int, seed: int, q: int, percent: float) -> torch.Tensor:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(q), int(round(percent * 1000)), 31]).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(num_examples, generator=gen)[:k]


@dataclass
class RetrainTopResult:
    """Per percent p: ``top``, ``random`` (MeanSE of the measurement change over queries) and ``difference``
    (paired top - random)."""
    percents: Tuple[float, ...]
    top: Dict[float, MeanSE]
    random: Dict[float, MeanSE]
    difference: Dict[float, MeanSE]

    def table(self) -> str:
        lines = ["| removed | Δ measurement, top by score | Δ, random | top - random |", "|---|---|---|---|"]
        for p in self.percents:
            lines.append(f"| {p:g}% | {self.top[p].mean:.4g} ± {self.top[p].sem:.2g} | "
                         f"{self.random[p].mean:.4g} ± {self.random[p].sem:.2g} | "
                         f"{self.difference[p].mean:.4g} ± {self.difference[p].sem:.2g} |")
        return "\n".join(lines)


def retrain_top(root, scores: torch.Tensor, train_fn: Callable[[torch.Tensor, int], nn.Module],
                measure_fn: Callable[[nn.Module], torch.Tensor], config: RetrainTopConfig = RetrainTopConfig(), *,
                key=None, build_fn: Optional[Callable[[], nn.Module]] = None,
                progress: bool = True) -> RetrainTopResult:
    """Run (or resume) the experiment. ``scores (Q, N)``; ``train_fn(kept_indices, seed) -> model``;
    ``measure_fn(model) -> (Q,)`` the measurement of every query (common random numbers, e.g.
    ``ground_truth.task_measurements``); ``build_fn() -> model`` lets a cached model be measured without
    retraining it."""
    root = Path(root)
    scores = torch.as_tensor(scores).double().cpu()
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Q, N), got {tuple(scores.shape)}")
    nq, n = scores.shape
    queries = config.queries if config.queries is not None else tuple(range(nq))
    if any(not 0 <= q < nq for q in queries):
        raise ValueError(f"query indices must lie in [0, {nq})")
    meta = {"kind": "retrain_top", "config": asdict(config), "num_examples": n, "num_queries": nq, "key": key,
            "scores_sha": _digest(scores)}
    mpath = root / "retrain_top.json"
    if mpath.exists():
        saved = json.loads(mpath.read_text())
        if json.dumps(saved, sort_keys=True) != json.dumps(meta, sort_keys=True):
            raise ValueError(f"{root} holds a retrain-top run with other settings or scores; use another folder")
    else:
        atomic_write_json(mpath, meta)

    jobs = [("full", None, None, k) for k in range(config.num_seeds)]
    for p in config.percents:
        for q in queries:
            for kind in ("top", "random"):
                jobs += [(kind, p, q, k) for k in range(config.num_seeds)]

    def removed(kind, p, q):
        r = num_removed(n, p)
        return top_indices(scores[q:q + 1], r)[0] if kind == "top" else random_indices(n, r, config.seed, q, p)

    def name(kind, p, q, k):
        return f"full_k{k}" if kind == "full" else f"{kind}_p{p:g}_q{q}_k{k}"

    values: Dict[str, torch.Tensor] = {}
    for kind, p, q, k in tqdm(jobs, desc="retrain top", disable=not progress, unit="model"):
        nm = name(kind, p, q, k)
        meas_path = root / "measurements" / f"{nm}.safetensors"
        if not meas_path.exists():
            model_path = root / "models" / f"{nm}.safetensors"
            if model_path.exists() and build_fn is not None:
                model = build_fn()
                model.load_state_dict(load_tensors(model_path)[0])
            else:
                keep = torch.ones(n, dtype=torch.bool)
                if kind != "full":
                    keep[removed(kind, p, q)] = False
                model = train_fn(torch.nonzero(keep).flatten(), int(config.seed_offset) + k)
                save_tensors(model_path, {a: t.detach().cpu() for a, t in model.state_dict().items()},
                             {"kind": "retrain_top_model", "name": nm})
            with torch.no_grad():
                v = torch.as_tensor(measure_fn(model)).double().cpu().reshape(-1)
            if v.numel() != nq:
                raise ValueError(f"measure_fn returned {v.numel()} values for {nq} queries")
            save_tensors(meas_path, {"m": v}, {"kind": "retrain_top_measurement", "name": nm})
        values[nm] = load_tensors(meas_path)[0]["m"]

    full = torch.stack([values[name("full", None, None, k)] for k in range(config.num_seeds)])  # (K, Q)
    top, rnd, diff = {}, {}, {}
    for p in config.percents:
        d = {kind: np.array([float(np.mean([values[name(kind, p, q, k)][q] - full[k, q]
                                            for k in range(config.num_seeds)])) for q in queries])
             for kind in ("top", "random")}
        top[p], rnd[p] = MeanSE.of(d["top"]), MeanSE.of(d["random"])
        diff[p] = MeanSE.of(d["top"] - d["random"])
    return RetrainTopResult(config.percents, top, rnd, diff)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.double().contiguous().numpy().tobytes()).hexdigest()[:16]


__all__ = ["RetrainTopConfig", "RetrainTopResult", "retrain_top", "top_indices", "random_indices", "num_removed"]
