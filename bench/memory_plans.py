"""What the budget logic plans for three UNets on 24, 48 and 80 GB devices (the table in docs/memory.md), from the
memory model on the meta device (no weights, seconds).

    .venv/bin/python bench/memory_plans.py

Per model and budget: the fit's plan (``memory.plan_fit``: draws per forward, partitions, predicted peak) with
every Linear / Conv2d tracked, EK-FAC, float32; and for scoring, the most queries one run can hold with N training
examples (``memory.estimate(stage="scores", streamed=True)`` at one draw per forward: the query pass holds every
raw query gradient, Q W floats, so Q is what the budget limits), float32 and int8. Precision is float32 and
queries full rank in every plan: neither bfloat16 operands nor low-rank queries shrink the peak the plan is bound
by (the float64 fit state, the query pass's raw gradients).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kfac_influence import CurvatureConfig  # noqa: E402
from kfac_influence.memory import estimate, measure_footprint, plan_fit  # noqa: E402
from memory_table import models  # noqa: E402

BUDGETS_GB = (24, 48, 80)
TRAIN_SIZES = {"digits-tiny": 1797, "cifar-ddpm": 50_000}
SD_TRAIN = 10_000  # a fine-tuning set


def max_queries(fp, budget: int, n: int, int8: bool) -> int:
    """The most queries whose scoring fits ``budget`` at one draw per forward (0: none)."""
    lo, hi = 0, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = estimate(fp, "scores", 1, num_queries=mid, num_examples=n, int8_queries=int8, streamed=True).total \
            <= budget
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return lo


def main():
    torch.set_num_threads(1)
    cfg = CurvatureConfig(method="ekfac", approx="expand", fisher="mc")
    print("| model | device | fit: draws/forward, partitions, predicted peak | scores: max queries per run "
          "(float32 / int8), N |")
    print("|---|---|---|---|")
    for name, model, task, sample in models():
        fp = measure_footprint(model, task, sample, config=cfg)
        n = TRAIN_SIZES.get(name, SD_TRAIN)
        for gb in BUDGETS_GB:
            budget = int(gb * 1e9)
            try:
                plan = plan_fit(model, task, sample, budget, config=cfg, footprint=fp)
                fit = f"{plan.draws_per_forward}, {len(plan.partitions)}, {plan.peak / 1e9:.1f} GB"
            except MemoryError as exc:
                fit = f"does not fit: {str(exc).split(': ', 1)[1]}"
            head = int(budget * 0.9)
            q32, q8 = max_queries(fp, head, n, False), max_queries(fp, head, n, True)
            print(f"| {name} | {gb} GB | {fit} | {q32} / {q8}, N = {n} |", flush=True)


if __name__ == "__main__":
    main()
