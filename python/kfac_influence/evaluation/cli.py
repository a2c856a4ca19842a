"""``kfac-influence lds`` and ``kfac-influence retrain-top``: evaluate a score matrix by retraining.

Registered by the main CLI with ``add_subcommands(subparsers)``; each subparser sets ``func`` (args -> exit code).
The help text users see is ``USAGE`` below. Score and query files are read without unpickling anything
(safetensors, ``numpy.load(allow_pickle=False)``, ``torch.load(weights_only=True)``); unreadable ones raise
ValueError with one line.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

from ..diffusion import DataConfig, TrainConfig, build_model, load_dataset, make_scheduler
from ..storage import atomic_write_json, load_tensors, short_message
from ..tasks import DiffusionTask
from .ground_truth import diffusion_train_fn, task_measurements
from .lds import LDSConfig, LDSRun
from .retrain_top import RetrainTopConfig, retrain_top

__all__ = ["add_subcommands", "USAGE"]

USAGE = """Evaluate the scores of a finished run (kfac-influence run --out runs/x ...) by retraining the model.

  kfac-influence lds --out runs/x-lds --scores runs/x/scores/scores.safetensors \\
      --queries runs/x/samples/samples.safetensors --data digits --limit 128 --model digits-tiny \\
      --steps 2000 --subsets 100 --seeds 5
  kfac-influence retrain-top --out runs/x-top --scores runs/x/scores/scores.safetensors \\
      --queries runs/x/samples/samples.safetensors --data digits --limit 128 --percents 2 10

Pass the same --data / --limit / --data-seed / --image-size as the run, so the training examples are in the order
of the scores' columns. Scores: a (Q, N) tensor (.safetensors with one tensor or a "scores" entry, .npy, .npz,
or a .pt tensor file); queries: a (Q, C, H, W) image tensor in [-1, 1] (same formats, an "images" entry).
Retrained models and measurements are cached under --out, and rerunning resumes. Results: OUT/lds.json or
OUT/retrain_top.json."""


def _load_tensor(path: str, key: Optional[str] = None):
    """The tensor in ``path`` (see USAGE), read without unpickling; ValueError (one line) otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        return _read_tensor(path, key)
    except ValueError:
        raise
    except Exception as exc:  # SafetensorError, UnpicklingError, zipfile and numpy errors ...
        raise ValueError(f"{path}: not a readable tensor file ({type(exc).__name__}: {short_message(exc, 120)}); "
                         f"pass a .safetensors, .npy, .npz or tensor-only .pt file") from None


def _read_tensor(path: str, key: Optional[str]):
    if path.endswith(".safetensors"):
        d = load_file(path)
        if key and key in d:
            return d[key]
        if len(d) == 1:
            return next(iter(d.values()))
        raise ValueError(f"{path}: holds {sorted(d)}; expected one tensor or a {key!r} entry")
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            k = key if key in z.files else (z.files[0] if len(z.files) == 1 else None)
            if k is None:
                raise ValueError(f"{path}: holds {z.files}; expected one array or {key!r}")
            return torch.from_numpy(z[k])
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = obj.get(key) if key in obj else (next(iter(obj.values())) if len(obj) == 1 else None)
    if not torch.is_tensor(obj):
        raise ValueError(f"{path}: not a tensor file")
    return obj


def _recorded_train_names(path: str):
    """The training file names a pipeline scores file records (``train_names`` in its header), else None."""
    if not path.endswith(".safetensors"):
        return None
    try:
        _, header = load_tensors(path)
    except ValueError:  # not written by kfac_influence: nothing recorded
        return None
    return header.get("train_names")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="cache and result folder")
    p.add_argument("--scores", required=True, help="(Q, N) score matrix file")
    p.add_argument("--queries", required=True, help="(Q, C, H, W) query images file")
    p.add_argument("--data", default="digits", help="training data: digits, an image folder or an .npz")
    p.add_argument("--limit", type=int, default=None,
                   help="use a seeded subset of this many training examples (as in the run)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--model", default="digits-tiny", help="model preset or UNet2DModel JSON config (fresh init)")
    p.add_argument("--steps", type=int, default=2000, help="training steps per retraining")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seeds", type=int, default=1, help="retrainings (training seeds) per subset / case")
    p.add_argument("--measurement", default="loss", choices=["loss", "elbo", "simplified_elbo", "square_norm"])
    p.add_argument("--gt-draws", type=int, default=1000, help="common (t, eps) draws per query for measuring")
    p.add_argument("--gt-seed", type=int, default=12345)
    p.add_argument("--workers", type=int, default=1, help="parallel retraining processes (POSIX fork)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """USAGE kept as written; defaults shown."""


def add_subcommands(subparsers) -> None:
    """Add ``lds`` and ``retrain-top`` to an ``argparse`` subparsers object."""
    fmt = _HelpFormatter
    p = subparsers.add_parser("lds", help="linear datamodelling score of a score matrix (retrains on subsets)",
                              description=USAGE, formatter_class=fmt)
    _common(p)
    p.add_argument("--subsets", type=int, default=100, help="number of random subsets M")
    p.add_argument("--alpha", type=float, default=0.5, help="fraction of the training data kept per subset")
    p.add_argument("--subset-seed", type=int, default=0)
    p.set_defaults(func=run_lds, seeds=5)
    p = subparsers.add_parser("retrain-top", help="retrain without the top-p%% examples per query vs random",
                              description=USAGE, formatter_class=fmt)
    _common(p)
    p.add_argument("--percents", type=float, nargs="+", default=[2.0, 10.0])
    p.add_argument("--query-index", type=int, nargs="*", default=None, help="only these queries")
    p.set_defaults(func=run_retrain_top)


def _setup(args):
    data = load_dataset(DataConfig(source=args.data, limit=args.limit, seed=args.data_seed,
                                   image_size=args.image_size))
    images = data.images
    scores = _load_tensor(args.scores, "scores").double()
    queries = _load_tensor(args.queries, "images").float()
    if scores.dim() != 2 or scores.shape[1] != len(images):
        raise ValueError(f"scores have shape {tuple(scores.shape)}; expected (Q, N = {len(images)}) for this data")
    names = _recorded_train_names(args.scores)
    if names is not None and list(names) != list(data.names()):
        raise ValueError(f"{args.scores}: its columns are other training images than --data {args.data} gives "
                         f"(file names differ); pass the run's --data / --limit / --data-seed / --image-size")
    if queries.dim() != 4 or queries.shape[0] != scores.shape[0] or queries.shape[1:] != images.shape[1:]:
        raise ValueError(f"queries have shape {tuple(queries.shape)}; expected ({scores.shape[0]}, "
                         f"{', '.join(map(str, images.shape[1:]))})")
    sch = make_scheduler()
    c, s = images.shape[1], images.shape[-1]
    build = lambda seed=0: build_model(args.model, seed=seed, in_channels=c, sample_size=s)  # noqa: E731
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                      checkpoint_every=0)
    train_fn = diffusion_train_fn(images, build, sch, cfg)
    task = DiffusionTask(sch, num_train_draws=1, num_query_draws=args.gt_draws, measurement=args.measurement,
                         seed=args.gt_seed)
    measure = lambda m: task_measurements(m, task, queries)  # noqa: E731
    key = {"data": args.data, "limit": args.limit, "data_seed": args.data_seed, "image_size": args.image_size,
           "model": args.model, "train": cfg.to_dict()}
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    return images, scores, train_fn, build, measure, key


def run_lds(args) -> int:
    images, scores, train_fn, build, measure, key = _setup(args)
    cfg = LDSConfig(num_subsets=args.subsets, num_seeds=args.seeds, alpha=args.alpha, seed=args.subset_seed)
    run = LDSRun(os.path.join(args.out, "lds"), len(images), cfg, train_fn, build_fn=build, key=key)
    run.retrain(num_workers=args.workers, progress=not args.no_progress)
    name = f"{args.measurement}_d{args.gt_draws}_s{args.gt_seed}"
    truth = run.measure(name, measure, progress=not args.no_progress)[name]
    res = run.lds(scores, truth)
    out = {"lds": res.mean, "lds_sem": res.sem, "num_queries": res.num_valid, "per_query": res.per_query.tolist(),
           "measurement": args.measurement, "config": vars(args).copy()}
    out["config"].pop("func", None)
    if cfg.num_seeds >= 2:
        o = run.oracle(truth)
        out.update(oracle=o.mean, oracle_sem=o.sem)
    atomic_write_json(os.path.join(args.out, "lds.json"), out)
    line = f"LDS ({args.measurement}) = {res.percent()} % over {res.num_valid} queries"
    if "oracle" in out:
        line += f"; oracle ceiling {100 * out['oracle']:.1f} ± {100 * out['oracle_sem']:.1f} %"
    print(line)
    return 0


def run_retrain_top(args) -> int:
    images, scores, train_fn, build, measure, key = _setup(args)
    cfg = RetrainTopConfig(percents=tuple(args.percents), num_seeds=args.seeds,
                           queries=tuple(args.query_index) if args.query_index else None)
    res = retrain_top(args.out, scores, train_fn, measure, cfg, key=key, build_fn=build,
                      progress=not args.no_progress)
    atomic_write_json(os.path.join(args.out, "retrain_top.json"), {
        str(p): {"top": [res.top[p].mean, res.top[p].sem], "random": [res.random[p].mean, res.random[p].sem],
                 "difference": [res.difference[p].mean, res.difference[p].sem]} for p in res.percents})
    print(res.table())
    return 0
