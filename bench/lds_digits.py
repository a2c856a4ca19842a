"""LDS benchmark on the embedded digits (CPU scale): the paper's Figure 2 and Figure 4 tables, and what goes past them.

    .venv/bin/python bench/lds_digits.py --root runs/lds_digits [--workers 2] [--stage all|retrain|scores|table]
    .venv/bin/python bench/lds_digits.py --conditional [--root runs/lds_digits_cond] ...   (class-conditional run)

Settings (``Settings`` below; every one is in the cache key, so changing one starts a new cache):
  data      the first N = 128 of scikit-learn's 8x8 digits (seeded subset), in [-1, 1]
  model     ``MiniEps``: a 41k-parameter conv/attention epsilon-predictor (time-embedding MLP, 6 convs incl. a
            strided down-conv, one self-attention block on the 4x4 map as q/k/v/out Linear layers, skip connection).
            The diffusers ``digits-tiny`` UNet costs ~0.13 s per step on this machine, too slow for ~100 retrainings.
  training  DDPM (T = 1000, linear betas), AdamW lr 2e-3, 500 steps of batch 32, EMA 0.99 (attributed model), seeded
  LDS       M = 30 random subsets keeping alpha = 50%, K = 3 training seeds each, Q = 32 generated queries
            (DDPM ancestral sampling, 1000 steps, from the full-data model), ground truth on 1000 common (t, eps)
            draws per query, targets ``loss`` and ``elbo``
  methods   (E)K-FAC influence with M_fit = M_train = M_query draws (default 64), TRAK, D-TRAK, Journey-TRAK, TracIn,
            gradient dot / cosine, pixel cosine; the oracle ceiling (seed vs the mean of the other seeds)

Class-conditional run (``--conditional``, ``CondSettings``; default root runs/lds_digits_cond, its own cache key):
  model     ``MiniEps(num_class_embeds=K + 1)``: a class embedding added to the time embedding (as diffusers'
            ``UNet2DModel(num_class_embeds=...)`` does), label K = 10 the null class
  training  the same, with each example's digit as its label and condition dropout 0.1 to the null class (as the
            library's ``digits-cond`` preset is trained); every retraining uses the kept examples' own labels
  queries   query k generated for class ``k mod 10`` (Q = 32: classes 0-1 four queries, 2-9 three), plain
            conditional sampling (guidance scale 1), and measured under its own class: ground truth, query
            gradients and every baseline's query side take ``(images, labels)``; training examples under theirs
  methods   the Figure 2 table (EK-FAC / K-FAC expand MC, also EK-FAC with stratified + antithetic draws, the
            baselines, the oracle), all with ``DiffusionTask(condition="class")``, the exact same-class fraction
            of each method's top-6 positive / negative influences (from the labels), paired differences against
            the best baseline, and the expand / reduce x MC / empirical ablation (``lds_methods.run_conditional``)

Everything (models, queries, measurements, scores) is cached under --root; rerunning resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT))

from kfac_influence.storage import load_tensors, save_tensors  # noqa: E402

if __name__ == "__main__":  # lds_methods imports this module by name: let it see this run's settings (S)
    sys.modules.setdefault("lds_digits", sys.modules[__name__])


class MiniEps(nn.Module):
    """A small epsilon-predictor for 8x8 grey images: ``model(x_t (B,1,8,8), t (B,)) -> (B,1,8,8)``.

    Tracked layers: time MLP (2 Linear), per-block time projections (2 Linear), 6 Conv2d, attention qkv + out
    (2 Linear, on the 16 tokens of the 4x4 map): weight sharing over positions (convs, attention) as in a UNet."""

    def __init__(self, ch: int = 16, temb: int = 32, num_class_embeds: int = None):
        super().__init__()
        self.temb_dim = temb
        self.t1, self.t2 = nn.Linear(temb, temb), nn.Linear(temb, temb)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.tb1 = nn.Linear(temb, ch)
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.tb2 = nn.Linear(temb, 2 * ch)
        self.c2 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.qkv, self.proj = nn.Linear(2 * ch, 6 * ch), nn.Linear(2 * ch, 2 * ch)
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.c3 = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)
        # class-conditional: an embedding (num_class_embeds, temb) added to the time embedding; built last so that
        # an unconditional model's initialisation (and so the unconditional cache) is unchanged
        self.class_emb = None
        if num_class_embeds is not None:
            self.class_emb = nn.Embedding(int(num_class_embeds), temb)
            self.config = {"num_class_embeds": int(num_class_embeds)}  # read by the library's condition checks

    def forward(self, x, t, class_labels=None):
        """``x (B,1,8,8), t (B,)[, class_labels (B,) int in [0, num_class_embeds)] -> (B,1,8,8)``."""
        half = self.temb_dim // 2
        fr = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=x.dtype) / half)
        e = t.to(x.dtype)[:, None] * fr[None]
        e = self.t2(F.silu(self.t1(torch.cat([e.sin(), e.cos()], 1))))
        if self.class_emb is not None:
            if class_labels is None:
                raise ValueError("this MiniEps is class-conditional: pass class_labels")
            e = e + self.class_emb(class_labels.to(x.device))
        elif class_labels is not None:
            raise TypeError("unexpected keyword class_labels: this MiniEps is unconditional")
        h0 = F.silu(self.inp(x) + self.tb1(e)[:, :, None, None])
        h1 = h0 + F.silu(self.c1(h0))
        h = F.silu(self.down(h1) + self.tb2(e)[:, :, None, None])
        h = h + F.silu(self.c2(h))
        b, c, hh, ww = h.shape
        tok = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tok).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), -1)
        tok = tok + self.proj(att @ v)
        h = tok.transpose(1, 2).reshape(b, c, hh, ww)
        h = F.silu(self.up(F.interpolate(h, scale_factor=2, mode="nearest")))
        h = F.silu(self.c3(torch.cat([h, h1], 1)))
        return self.out(h)


@dataclass(frozen=True)
class Settings:
    n_train: int = 128
    data_seed: int = 0
    channels: int = 16
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    ema_decay: float = 0.99
    num_subsets: int = 30
    num_seeds: int = 3
    alpha: float = 0.5
    num_queries: int = 32
    query_seed: int = 1000
    gt_draws: int = 1000
    gt_seed: int = 999
    draws: int = 64            # M_fit = M_train = M_query for the influence methods
    checkpoints: tuple = (125, 250, 375, 500)   # TracIn / checkpoint ensembling


@dataclass(frozen=True)
class CondSettings(Settings):
    """The class-conditional run: K classes (the model has K + 1 class embeddings, label K is the null class),
    condition dropout of training, guidance scale of query sampling (query k is generated for class k mod K)."""
    num_classes: int = 10
    condition_dropout: float = 0.1
    guidance_scale: float = 1.0


S = Settings()


def conditional() -> bool:
    return isinstance(S, CondSettings)


def build_model(seed: int = 0) -> nn.Module:
    g = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    m = MiniEps(S.channels, num_class_embeds=S.num_classes + 1 if conditional() else None)
    torch.random.set_rng_state(g)
    return m


def train_config(steps: int = None):
    from kfac_influence.diffusion import TrainConfig
    extra = {"condition_dropout": S.condition_dropout} if conditional() else {}
    return TrainConfig(steps=steps or S.steps, batch_size=S.batch_size, lr=S.lr, warmup_steps=20, grad_clip=1.0,
                       ema_decay=S.ema_decay, checkpoint_every=0, seed=0, **extra)


def load_data():
    from kfac_influence.diffusion import DataConfig, load_dataset
    return load_dataset(DataConfig(source="digits", limit=S.n_train, seed=S.data_seed)).images


def load_labels():
    """The digits' labels ``(N,)`` int64 in [0, 10), aligned with ``load_data()`` (class-conditional run only)."""
    from kfac_influence.diffusion import DataConfig, load_dataset
    labels = load_dataset(DataConfig(source="digits", limit=S.n_train, seed=S.data_seed, labels=True)).labels
    if int(labels.max()) >= S.num_classes:
        raise ValueError(f"labels reach {int(labels.max())}, more than num_classes = {S.num_classes}")
    return labels


def train_conditions() -> dict:
    """The ``train(...)`` keywords of a class-conditional run (``{}`` for the unconditional one)."""
    return {"labels": load_labels(), "null_label": S.num_classes} if conditional() else {}


def scheduler():
    from kfac_influence.diffusion import make_scheduler
    return make_scheduler()


def cache_key():
    return {"bench": "lds_digits_cond" if conditional() else "lds_digits", "settings": dataclasses.asdict(S)}


def lds_run(root: Path, images):
    from kfac_influence.evaluation import LDSConfig, LDSRun, diffusion_train_fn
    cfg = LDSConfig(num_subsets=S.num_subsets, num_seeds=S.num_seeds, alpha=S.alpha, seed=0)
    fn = diffusion_train_fn(images, build_model, scheduler(), train_config(), **train_conditions())
    return LDSRun(root / "lds", len(images), cfg, fn, build_fn=build_model, key=cache_key())


def full_model(root: Path, images, steps: int = None, raw: bool = False, seed: int = 0) -> nn.Module:
    """The model trained on all N examples (EMA, or raw optimiser weights), cached."""
    from kfac_influence.diffusion import train
    steps = steps or S.steps
    path = root / "full" / f"seed{seed}_steps{steps}.safetensors"
    m = build_model(seed)
    if not path.exists():
        res = train(build_model(seed), scheduler(), images, dataclasses.replace(train_config(steps), seed=seed),
                    progress=False, **train_conditions())
        state = {f"ema.{k}": v for k, v in res.model.state_dict().items()}
        state.update({f"raw.{k}": v for k, v in res.raw_model.state_dict().items()})
        save_tensors(path, state, {"kind": "bench_model", "steps": steps, "key": cache_key()})
    state, _ = load_tensors(path)
    prefix = "raw." if raw else "ema."
    m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return m.eval()


def queries(root: Path, images):
    """Q generated samples and their trajectories, cached: ``{"images": (Q,1,8,8), "trajectory": (Q,S+1,1,8,8),
    "timesteps": (S,)}``, plus ``"labels": (Q,)`` in the class-conditional run (query k generated for class
    ``k mod K``)."""
    from kfac_influence.diffusion import ddpm_sample
    path = root / "queries.safetensors"
    if not path.exists():
        model = full_model(root, images)
        cond = {}
        if conditional():
            cond = {"class_labels": torch.arange(S.num_queries) % S.num_classes, "guidance_scale": S.guidance_scale,
                    "null_label": S.num_classes}
        res = ddpm_sample(model, scheduler(), S.num_queries, (1, 8, 8), seed=S.query_seed, batch_size=S.num_queries,
                          record_trajectory=True, progress=False, **cond)
        out = {"images": res.images, "trajectory": res.trajectory, "timesteps": res.timesteps}
        if conditional():
            out["labels"] = res.labels
        save_tensors(path, out, {"kind": "bench_queries", "key": cache_key()})
    t, _ = load_tensors(path)
    return t


def gt_tasks():
    from kfac_influence.tasks import DiffusionTask
    sch = scheduler()
    cond = {"condition": "class"} if conditional() else {}
    return {m: DiffusionTask(sch, num_train_draws=1, num_query_draws=S.gt_draws, measurement=m, seed=S.gt_seed,
                             **cond) for m in ("loss", "elbo")}


def query_data(q):
    """What the tasks take as queries: the images, or ``(images, labels)`` (each query under its own class)."""
    return (q["images"], q["labels"]) if conditional() else q["images"]


def ground_truth(root: Path, images, q, workers: int):
    from kfac_influence.evaluation import measure_all
    run = lds_run(root, images)
    run.retrain(num_workers=workers)
    fn = measure_all(gt_tasks(), query_data(q), num_draws=S.gt_draws, seed=S.gt_seed, share_rows=True)
    return run, run.measure("gt", fn)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="cache folder (default runs/lds_digits, or runs/lds_digits_cond "
                                                "with --conditional)")
    p.add_argument("--conditional", action="store_true",
                   help="the class-conditional run (CondSettings: labels, condition dropout, queries per class)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stage", default="all", choices=["all", "retrain", "precompute", "scores", "table",
                                                          "drawseed"])
    p.add_argument("--draw-seed", type=int, nargs="+", default=[1],
                   help="--stage drawseed: draw seeds (train/query task seed s, fit seed s + 1; 1 = the original "
                        "run) for EK-FAC expand MC with uniform / antithetic / stratified+antithetic draws")
    p.add_argument("--smoke", action="store_true", help="tiny settings (minutes): checks the script end to end")
    args = p.parse_args(argv)
    global S
    kind = CondSettings if args.conditional else Settings
    S = kind()
    if args.smoke:
        S = kind(n_train=16, steps=20, num_subsets=4, num_seeds=2, num_queries=4, gt_draws=16, draws=4,
                 checkpoints=(5, 10, 15, 20))
    torch.set_num_threads(args.threads)
    root = Path(args.root or ROOT / "runs" / ("lds_digits_cond" if args.conditional else "lds_digits"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images = load_data()
    full_model(root, images)
    q = queries(root, images)
    if args.stage == "precompute":
        from lds_methods import precompute  # noqa: E402
        precompute(root, S, images, q)
        return
    run, gt = ground_truth(root, images, q, args.workers)
    print(f"retraining + ground truth ready in {time.time() - t0:.0f} s", flush=True)
    print("oracle loss", run.oracle(gt["loss"]).percent(), "elbo", run.oracle(gt["elbo"]).percent(), flush=True)
    if args.stage == "retrain":
        return
    if args.stage == "drawseed":
        if conditional():
            p.error("--stage drawseed is for the unconditional run")
        from lds_methods import draw_seed_check  # noqa: E402
        draw_seed_check(root, S, images, q, run, gt, seeds=args.draw_seed)
        return
    if conditional():
        from lds_methods import run_conditional  # noqa: E402
        run_conditional(root, S, images, q, run, gt)
        return
    from lds_methods import run_methods  # noqa: E402  (bench/lds_methods.py)
    run_methods(root, S, images, q, run, gt, stage=args.stage)


if __name__ == "__main__":
    main()
