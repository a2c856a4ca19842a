"""Peer benchmark: our pipeline vs kronfluence 1.0.1 and curvlinops 3.0.1 EK-FAC on the same UNet2DModel.

    .venv/bin/python bench/peers.py                       # 16x16 and 32x32, N=256, 16 queries, one draw
    .venv/bin/python bench/peers.py --sizes 16 --repeats 3 --json bench/peers_16.json

Each (library, stage) runs in a fresh process (``bench/peers_stage.py``), so peak RSS is per stage. For every size
and repeat the libraries run interleaved (floor, then each library's factors and scores), so slow phases of a
shared machine hit them alike. The table gives medians over repeats of wall time and peak RSS, the ratios
ours / peer, the per-pass ratio to the floor (a plain forward + backward over the same N draws: our factors make
2 passes, our scores 1 pass plus the query pass), and the Spearman agreement of the (Q, N) score matrices
(mean over queries of the rank correlation of a query's N scores).

``kronfluence_kk`` is kronfluence with ``kfac_kernels.integrations.kronfluence.use_kfac_kernels()`` (its
covariance, lambda and pairwise stages on our ops); it is included when that adapter imports.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PEERS = ("kronfluence", "curvlinops")

from peers_flops import pass_ratios  # noqa: E402


def run_stage(lib: str, stage: str, work: Path, a) -> dict:
    cmd = [sys.executable, str(HERE / "peers_stage.py"), "--lib", lib, "--stage", stage, "--work", str(work),
           "--size", str(a.size_now), "--n", str(a.n), "--queries", str(a.queries), "--draws", str(a.draws),
           "--batch", str(a.batch), "--fisher", a.fisher, "--threads", str(a.threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{lib}/{stage} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows (queries) of Spearman's rho between a[q] and b[q]."""
    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).double()
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    rho = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    return float(rho.mean())


def adapter_available() -> bool:
    try:
        import kfac_kernels.integrations.kronfluence  # noqa: F401
        return True
    except Exception:
        return False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--draws", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fisher", choices=("mc", "empirical"), default="mc")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--libs", nargs="+", default=None, help="default: ours kronfluence curvlinops [kronfluence_kk]")
    p.add_argument("--json", type=Path, default=None, help="write all runs and the summary here")
    a = p.parse_args(argv)
    libs = a.libs or (["ours", *PEERS] + (["kronfluence_kk"] if adapter_available() else []))
    runs, summary = [], {}
    t_start = time.time()
    for size in a.sizes:
        a.size_now = size
        work = Path(tempfile.mkdtemp(prefix=f"peers{size}_"))
        scores = {}
        for rep in range(a.repeats):
            runs.append({**run_stage("plain", "floor", work, a), "rep": rep, "lib": "floor"})
            print(f"[{time.time() - t_start:6.0f}s] {size}x{size} rep {rep} floor {runs[-1]['wall_s']:.2f}s",
                  flush=True)
            for lib in libs:
                for stage in ("factors", "scores"):
                    r = run_stage(lib, stage, work, a)
                    runs.append({**r, "rep": rep})
                    print(f"[{time.time() - t_start:6.0f}s] {size}x{size} rep {rep} {lib}/{stage} "
                          f"{r['wall_s']:.2f}s {r['peak_rss_mb']:.0f} MB", flush=True)
                if rep == 0:
                    scores[lib] = torch.load(work / f"{lib}_scores.pt")
        summary[size] = summarise(runs, size, libs, scores)
        summary[size]["least"] = pass_ratios(size, a.queries)
    with os.popen("uptime") as f:
        load = f.read().strip()
    table = render(summary, a, libs, load)
    print(table)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs,
                                      "summary": summary, "table": table}, indent=1))


def summarise(runs, size, libs, scores) -> dict:
    def med(lib, stage, key):
        vals = [r[key] for r in runs if r["size"] == size and r["lib"] == lib and r["stage"] == stage]
        return statistics.median(vals) if vals else float("nan")

    out = {"floor_s": med("floor", "floor", "wall_s"), "floor_rss_mb": med("floor", "floor", "peak_rss_mb"),
           "libs": {}, "spearman": {}}
    for lib in libs:
        out["libs"][lib] = {st: {"wall_s": med(lib, st, "wall_s"), "peak_rss_mb": med(lib, st, "peak_rss_mb"),
                                 "base_rss_mb": med(lib, st, "base_rss_mb")} for st in ("factors", "scores")}
    names = list(scores)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            out["spearman"][f"{x} vs {y}"] = spearman_rows(scores[x], scores[y])
    return out


def render(summary, a, libs, load) -> str:
    lines = [f"N={a.n}, {a.queries} queries, {a.draws} draw(s), fisher={a.fisher}, batch {a.batch} draws/forward, "
             f"{a.threads} thread(s), medians of {a.repeats} run(s); machine load at the end: {load}", ""]
    for size, s in summary.items():
        f = s["floor_s"]
        lines += [f"### {size}x{size}x3 UNet2DModel (channels 32/64): floor (one plain fwd+bwd pass) {f:.2f} s", "",
                  "| library | factors s | scores s | total s | factors / floor, per pass | scores / floor "
                  "| peak RSS MB | stage RSS increase MB | ours/lib time | ours/lib peak RSS | ours/lib increase |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def tot(lib):
            r = s["libs"][lib]
            return (r["factors"]["wall_s"] + r["scores"]["wall_s"],
                    max(r[st]["peak_rss_mb"] for st in ("factors", "scores")),
                    max(r[st]["peak_rss_mb"] - r[st]["base_rss_mb"] for st in ("factors", "scores")))
        o = tot("ours")
        for lib in libs:
            r = s["libs"][lib]
            t, mem, inc = tot(lib)
            lines.append(f"| {lib} | {r['factors']['wall_s']:.2f} | {r['scores']['wall_s']:.2f} | {t:.2f} | "
                         f"{r['factors']['wall_s'] / 2 / f:.2f} | {r['scores']['wall_s'] / f:.2f} | {mem:.0f} | "
                         f"{inc:.0f} | {o[0] / t:.2f} | {o[1] / mem:.2f} | {o[2] / inc:.2f} |")
        lines += ["", "Spearman agreement of the score matrices (mean over queries): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in s["spearman"].items()), ""]
        if "least" in s:
            least, ours = s["least"], s["libs"]["ours"] if "ours" in s["libs"] else None
            line = (f"Cost by multiply-adds at the floor's speed (bench/peers_flops.py): factors "
                    f"{least['factors']:.2f} floors per pass, scoring train pass {least['scores']:.2f} floors")
            if ours is not None:
                line += (f"; ours measured at {ours['factors']['wall_s'] / 2 / f / least['factors']:.2f}x and "
                         f"{ours['scores']['wall_s'] / f / least['scores']:.2f}x of it")
            lines += [line, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
