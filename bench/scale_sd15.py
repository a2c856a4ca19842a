"""EK-FAC attribution of a Stable-Diffusion-1.5-sized UNet on this CPU within a memory budget.

    .venv/bin/python bench/scale_sd15.py [--root runs/scale_sd15] [--max-memory 8GiB] [--threads 2]

A ``UNet2DConditionModel`` built from the SD-1.5 UNet config (random weights from a seed, no download; 859.5M
parameters) at 32x32x4 latents, N = 8 training examples and 2 queries, each with 77 random text-token embeddings
of width 768 (cross-attention), M = 2 (t, eps) draws per example, EK-FAC (expand, MC Fisher).

Tracked layers (``MODULES``): every self- and cross-attention projection (attn1 / attn2 to_q, to_k, to_v, to_out),
the transformer blocks' proj_in / proj_out and ff.net.2, every resnet's time_emb_proj, the 1280-channel 3x3 conv
``mid_block.resnets.0.conv1`` (an 11521-wide input factor) and three 640-channel 3x3 convs: 25.5% of the
parameters. Not tracked: the GEGLU ff.net.0.proj layers (10240-wide output factors at 1280 channels) and the
other convs, whose float64 eigendecompositions would take hours on 2 cores.

The child processes run with MALLOC_MMAP_THRESHOLD_=65536 (see ``main``). Stages (each in its own process, so that its peak RSS is its own; each resumes from its checkpoints and is skipped
once its output exists): ``fit`` (``fit_curvature(max_memory=budget - baseline)``: the plan picks the draws per
forward and the partitions; the curvature is then saved to one file a layer at a time) and ``score``
(``load_curvature(stream=True)``, ``pairwise_scores`` with the query block and draws per forward of
``memory.plan_scores``). The
baseline is the process's RSS once the model and data exist, less the parameters (the interpreter, torch,
diffusers, module objects, data): the memory model predicts what comes on top of it. Results: ``ROOT/results.json`` and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

MODULES = ("*attn1.*", "*attn2.*", "*proj_in", "*proj_out", "*time_emb_proj", "*ff.net.2",
           "mid_block.resnets.0.conv1", "down_blocks.1.resnets.0.conv2", "down_blocks.1.resnets.1.conv1",
           "down_blocks.1.resnets.1.conv2")
N, Q, M, TOKENS, LATENT = 8, 2, 2, 77, 32


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def setup():
    import torch
    from diffusers import UNet2DConditionModel

    from kfac_influence.tasks import DiffusionTask
    from memory_table import SD15

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD15).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, LATENT, LATENT, generator=gen)
    emb = torch.randn(N, TOKENS, 768, generator=gen)
    q = torch.randn(Q, 4, LATENT, LATENT, generator=gen)
    q_emb = torch.randn(Q, TOKENS, 768, generator=gen)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    task = DiffusionTask(betas, num_train_draws=M, num_query_draws=M, condition="text", seed=0)
    return model, task, (x, emb), (q, q_emb)


class RssTrace:
    """The peak RSS of each phase of a stage (a thread samples /proc/self/statm every 50 ms; the phase is set by
    wrappers around the pass loop's progress bar, the eigendecomposition, checkpoint saves and file reads)."""

    def __init__(self):
        import threading

        self.phase, self.peaks, self._stop = "setup", {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss_bytes())

    def wrap(self, module, name: str, label, keep: bool = False):
        """Run ``module.name`` under the phase ``label(*args)``: for its duration, or from then on (``keep``).
        Reads and saves name the phase they happen in (``self.base``: the last pass or eigendecomposition)."""
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            phase = label(*args, **kwargs)
            if keep:
                self.base = phase
            self.phase = phase
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss_bytes())
            try:
                return real(*args, **kwargs)
            finally:
                if not keep:
                    self.phase = self.base
        setattr(module, name, wrapped)

    def install(self):
        import kfac_influence.curvature.fit as fit_module
        import kfac_influence.engine as engine
        import kfac_influence.tensorfile as tensorfile

        self.base = self.phase
        self.wrap(engine, "progress_bar", lambda total, desc, *a, **k: desc, keep=True)
        self.wrap(fit_module, "_eig", lambda mat, overwrite=False: f"eigh (n up to {len(mat)})"
                  if len(mat) >= 2048 else self.base)
        self.wrap(engine, "save_tensors", lambda *a, **k: f"{self.base}: checkpoint save")
        self.wrap(tensorfile.TensorFile, "get_many", lambda *a, **k: f"{self.base}: file read")
        return self

    def result(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss_bytes())
        top = max(self.peaks, key=self.peaks.get)
        return {"peak_phase": top, "phase_peaks": dict(sorted(self.peaks.items(), key=lambda kv: -kv[1])[:8])}


def stage_fit(root: Path, budget: int) -> dict:
    import torch

    import kfac_influence.curvature.fit as fit_module
    from kfac_influence import CurvatureConfig, fit_curvature
    from kfac_influence.memory import plan_fit

    trace = RssTrace().install()
    model, task, data, _ = setup()
    baseline = rss_bytes() - sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = CurvatureConfig(method="ekfac", approx="expand", fisher="mc", modules=MODULES, num_draws=M)
    eig_seconds = [0.0]
    eig = fit_module._eig

    def timed_eig(mat, overwrite=False):  # the share of eigendecomposition in the fit's time
        t = time.perf_counter()
        out = eig(mat, overwrite=overwrite)
        eig_seconds[0] += time.perf_counter() - t
        return out

    fit_module._eig = timed_eig
    # the budget less the baseline; plan_fit keeps its default 10% headroom
    room = budget - baseline
    # a resumed run keeps the partitions it started with (the baseline, and so the plan, can move between
    # processes; the checkpoints refuse another one); the predicted peak is the memory model's for them
    plan_file = root / "plan.json"
    kept = json.loads(plan_file.read_text()) if plan_file.exists() else None
    plan = plan_fit(model, task, data, room, config=cfg, partitions=kept and kept["partitions"])
    if kept is not None:
        plan = dataclasses.replace(plan, draws_per_forward=kept["draws_per_forward"])
    else:
        plan_file.write_text(json.dumps({"draws_per_forward": plan.draws_per_forward,
                                         "partitions": [list(p) for p in plan.partitions], "peak": plan.peak}))
    t0 = time.perf_counter()
    curv = fit_curvature(model, task, data, cfg, draws_per_forward=plan.draws_per_forward,
                         partitions=[list(p) for p in plan.partitions], checkpoint_dir=root / "fit", progress=True,
                         checkpoint_seconds=120)
    t_fit = time.perf_counter() - t0
    curv.save(root / "curvature.safetensors.tmp")
    os.replace(root / "curvature.safetensors.tmp", root / "curvature.safetensors")
    tracked = sum(s.d_out * s.d_in_total for s in curv.specs.values())
    return {"baseline_rss": baseline, "predicted_peak": baseline + plan.peak, "draws_per_forward":
            plan.draws_per_forward, "partitions": len(plan.partitions), "tracked_layers": len(curv.specs),
            "tracked_params": tracked, "params": sum(p.numel() for p in model.parameters()),
            "fit_seconds": t_fit, "eigh_seconds": eig_seconds[0], "save_seconds": time.perf_counter() - t0 - t_fit,
            "peak_rss": peak_rss_bytes(), "torch_threads": torch.get_num_threads(), **trace.result()}


def stage_score(root: Path, budget: int) -> dict:
    import torch

    from kfac_influence import load_curvature, pairwise_scores
    from kfac_influence.memory import plan_scores

    trace = RssTrace().install()
    model, task, data, queries = setup()
    baseline = rss_bytes() - sum(p.numel() * p.element_size() for p in model.parameters())
    curv = load_curvature(root / "curvature.safetensors", model, stream=True)
    # the library's default 10% headroom: the plan holds as many queries' gradients as fit (one training pass
    # per block of queries), then as many draws per forward
    plan = plan_scores(model, task, data, budget - baseline, num_queries=Q, num_examples=N, config=curv.config,
                       streamed=True)
    t0 = time.perf_counter()
    scores = pairwise_scores(model, task, curv, queries, data, draws_per_forward=plan.draws_per_forward,
                             query_batch=plan.query_batch, progress=True, checkpoint_dir=root / "score",
                             damping=0.1, damping_mode="relative")
    seconds = time.perf_counter() - t0
    return {"baseline_rss": baseline, "predicted_peak": baseline + plan.peak, "draws_per_forward":
            plan.draws_per_forward, "query_batch": plan.query_batch, "training_passes": plan.passes,
            "score_seconds": seconds, "peak_rss": peak_rss_bytes(), "scores": scores.tolist(),
            "finite": bool(torch.isfinite(scores).all()), **trace.result()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT / "runs" / "scale_sd15"))
    ap.add_argument("--max-memory", default="8GiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["all", "fit", "score"], default="all")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.child:  # one stage, in this process
        import torch

        from kfac_influence.memory import parse_bytes

        torch.set_num_threads(args.threads)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        t0 = time.perf_counter()
        out = (stage_fit if args.stage == "fit" else stage_score)(root, parse_bytes(args.max_memory))
        out["wall_seconds"] = time.perf_counter() - t0
        out["budget"] = parse_bytes(args.max_memory)
        results[args.stage] = out
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, results_path)
        return
    for stage in (("fit", "score") if args.stage == "all" else (args.stage,)):
        if stage in results:
            print(f"[{stage}] done earlier, skipped", flush=True)
            continue
        # glibc keeps freed blocks below its (dynamic, up to 32 MB) mmap threshold in its heap, so the RSS of a
        # process that frees 100 MB activations after every forward creeps up; a fixed 64 KB threshold returns
        # every big block to the system on free (measured here: fit peak 8.28 -> 7.61 GB on the same work)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run([sys.executable, __file__, "--child", "--stage", stage, "--root", str(root),
                        "--max-memory", args.max_memory, "--threads", str(args.threads)], check=True, env=env)
        results = json.loads(results_path.read_text())
    gib = 2 ** 30
    print("| stage | budget | baseline RSS | predicted peak | measured peak RSS | prediction error | draws/forward | "
          "wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in ("fit", "score"):
        r = results.get(stage)
        if r:
            err = (r["predicted_peak"] - r["peak_rss"]) / r["peak_rss"]
            print(f"| {stage} | {r['budget'] / gib:.2f} GiB | {r['baseline_rss'] / gib:.2f} GiB | "
                  f"{r['predicted_peak'] / gib:.2f} GiB | {r['peak_rss'] / gib:.2f} GiB | {100 * err:+.1f}% | "
                  f"{r['draws_per_forward']} | {r['wall_seconds']:.0f} |")
    if "fit" in results:
        f = results["fit"]
        print(f"\ntracked {f['tracked_layers']} layers, {f['tracked_params'] / 1e6:.1f}M of {f['params'] / 1e6:.1f}M "
              f"parameters ({100 * f['tracked_params'] / f['params']:.1f}%); {f['partitions']} partitions; fit "
              f"{f['fit_seconds']:.0f} s of which eigendecomposition {f['eigh_seconds']:.0f} s "
              f"({100 * f['eigh_seconds'] / f['fit_seconds']:.0f}%); streamed save {f['save_seconds']:.0f} s")


if __name__ == "__main__":
    main()
