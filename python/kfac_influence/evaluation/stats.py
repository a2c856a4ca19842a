"""Rank statistics for attribution evaluation: Spearman correlation per row, mean +- standard error.

Numpy only (scipy is optional in this package). Ties get average ranks, as ``scipy.stats.spearmanr`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) along the last axis of a float array ``(..., M)``."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="mergesort")
        sorted_row = row[order]
        # boundaries of runs of equal values
        new = np.concatenate([[True], sorted_row[1:] != sorted_row[:-1]])
        run_id = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        ends = np.concatenate([starts[1:], [len(row)]])
        avg = (starts + ends - 1) / 2.0 + 1.0  # average 1-based rank of each run
        ranks = np.empty(len(row))
        ranks[order] = avg[run_id]
        out[i] = ranks
    return out.reshape(x.shape)


def spearman_rows(x, y) -> np.ndarray:
    """Spearman correlation of ``x[i]`` with ``y[i]`` for every row: ``x, y: (Q, M)`` -> ``(Q,)``.

    A row where either side is constant gives NaN (the correlation is undefined)."""
    x, y = _np(x), _np(y)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"spearman_rows needs two (Q, M) arrays of the same shape, got {x.shape} and {y.shape}")
    if x.shape[1] < 2:
        raise ValueError("a Spearman correlation needs at least 2 values per row")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(1) / den
    rho[den == 0] = np.nan
    return rho


@dataclass(frozen=True)
class MeanSE:
    """A per-query statistic summarised over queries: ``mean`` and standard error ``sem`` of the valid (non-NaN)
    values, ``per_query (Q,)`` (NaN where undefined), ``num_valid``."""
    per_query: np.ndarray
    mean: float
    sem: float
    num_valid: int

    @classmethod
    def of(cls, values) -> "MeanSE":
        v = _np(values).reshape(-1)
        ok = v[np.isfinite(v)]
        n = int(ok.size)
        mean = float(ok.mean()) if n else float("nan")
        sem = float(ok.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        return cls(v, mean, sem, n)

    def percent(self, digits: int = 1) -> str:
        """``"21.5 +- 1.2"`` (x100, as the paper reports LDS)."""
        return f"{100 * self.mean:.{digits}f} ± {100 * self.sem:.{digits}f}"

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.sem:.4f} (n={self.num_valid})"


def paired_difference(a: MeanSE, b: MeanSE) -> MeanSE:
    """Per-query difference ``a - b`` (queries valid in both), with its paired standard error."""
    if a.per_query.shape != b.per_query.shape:
        raise ValueError("paired_difference needs results over the same queries")
    return MeanSE.of(a.per_query - b.per_query)
