"""Compute precision and low-rank query gradients on the digits LDS benchmark: what they cost in accuracy, and
what they save in time on this CPU.

    .venv/bin/python bench/precision_rank.py [--root runs/lds_digits] [--threads 2]

Uses the models, queries and ground truth of ``bench/lds_digits.py`` (same cache; run its ``--stage retrain``
first). Reference: EK-FAC (expand, MC Fisher), M = 64 draws per example for fit, train and queries, stratified
timesteps + antithetic noise, the loss measurement, absolute damping chosen on the reference's LDS grid and then
held for every variant. Variants:
  precision  the fit and the train pass with operands in bfloat16 / float16 (``CurvatureConfig(precision=)``,
             ``pairwise_scores(precision=)``); float32 accumulation.
  rank       float32 fit; each layer's preconditioned query gradients replaced by their best rank-k
             approximation (``pairwise_scores(query_rank=k)``), k = 8, 32, 128.
Per variant: LDS (mean +- s.e. over queries), Spearman correlation with the reference's scores (mean over
queries), fit and scoring seconds (one thread each, medians of ``--repeats``). Results: ROOT/precision_rank.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

import lds_digits as L  # noqa: E402
from kfac_influence import CurvatureConfig, fit_curvature, pairwise_scores  # noqa: E402
from kfac_influence.evaluation.stats import MeanSE  # noqa: E402
from kfac_influence.tasks import DiffusionTask  # noqa: E402

DAMPINGS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
RANKS = (8, 32, 128)
PER_FORWARD = 256


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows (queries) of the Spearman rank correlation of a[q] and b[q]."""
    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).double()
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(HERE.parent / "runs" / "lds_digits"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-lds", action="store_true",
                    help="without the retrained models' ground truth: Spearman against float32 and times only, at "
                         "--damping")
    ap.add_argument("--damping", type=float, default=1e-4, help="the damping used with --no-lds")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    images = L.load_data()
    model = L.full_model(root, images)
    q = L.queries(root, images)
    if args.no_lds:
        run = truth = None
    else:
        run, gt = L.ground_truth(root, images, q["images"], workers=1)
        truth = gt["loss"]

    def lds(s):
        return run.lds(s, truth) if run is not None else MeanSE.of([float("nan")])
    task = DiffusionTask(L.scheduler(), num_train_draws=L.S.draws, num_query_draws=L.S.draws, measurement="loss",
                         seed=1, stratified=True, antithetic=True)

    def fit(precision):
        cfg = CurvatureConfig(method="ekfac", approx="expand", fisher="mc", num_draws=L.S.draws, seed=2,
                              precision=precision)
        return fit_curvature(model, task, images, cfg, draws_per_forward=PER_FORWARD, progress=False)

    def score(curv, **kw):
        return pairwise_scores(model, task, curv, q["images"], images, draws_per_forward=PER_FORWARD,
                               progress=False, **kw)

    ref_curv, ref_fit_s = timed(lambda: fit("float32"), args.repeats)
    grid = {d: lds(score(ref_curv, damping=d)) for d in DAMPINGS} if run is not None else {}
    damping = max(grid, key=lambda d: grid[d].mean) if grid else args.damping
    ref, ref_score_s = timed(lambda: score(ref_curv, damping=damping), args.repeats)
    rows = [{"variant": "float32 (reference)", "lds": lds(ref), "spearman": 1.0, "fit_s": ref_fit_s,
             "score_s": ref_score_s}]
    for precision in ("bfloat16", "float16"):
        curv, fit_s = timed(lambda: fit(precision), args.repeats)
        s, score_s = timed(lambda: score(curv, damping=damping, precision=precision), args.repeats)
        rows.append({"variant": f"{precision} fit + scores", "lds": lds(s),
                     "spearman": spearman_rows(s, ref), "fit_s": fit_s, "score_s": score_s})
    for rank in RANKS:
        s, score_s = timed(lambda: score(ref_curv, damping=damping, query_rank=rank), args.repeats)
        rows.append({"variant": f"query rank {rank}", "lds": lds(s), "spearman": spearman_rows(s, ref),
                     "fit_s": None, "score_s": score_s})
    widths = sorted({min(sp.d_out, sp.d_in_total) for sp in ref_curv.specs.values()})
    out = {"damping": damping, "damping_grid": {str(d): [v.mean, v.sem] for d, v in grid.items()},
           "layer_max_ranks": widths, "threads": args.threads, "repeats": args.repeats,
           "rows": [{**r, "lds": [r["lds"].mean, r["lds"].sem]} for r in rows]}
    (root / ("precision_rank_nolds.json" if args.no_lds else "precision_rank.json")).write_text(json.dumps(out, indent=2))
    how = f"best absolute damping of the reference on {DAMPINGS}" if grid else "given; no LDS (--no-lds)"
    print(f"damping {damping:g} ({how}); full rank per layer: {widths[0]}-{widths[-1]}")
    print("| variant | LDS (%) | Spearman vs float32 | fit s | score s | score speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lds: MeanSE = r["lds"]
        fit_s = "-" if r["fit_s"] is None else f"{r['fit_s']:.1f}"
        print(f"| {r['variant']} | {lds.percent()} | {r['spearman']:.3f} | {fit_s} | {r['score_s']:.1f} | "
              f"{ref_score_s / r['score_s']:.2f}x |")


if __name__ == "__main__":
    main()
