"""``kfac-influence lds`` and ``kfac-influence retrain-top``: evaluate a score matrix by retraining.

Registered by the main CLI with ``add_subcommands(subparsers)``; each subparser sets ``func`` (args -> exit code).
The help text users see is ``USAGE`` below. Score and query files are read without unpickling anything
(safetensors, ``numpy.load(allow_pickle=False)``, ``torch.load(weights_only=True)``); unreadable ones raise
ValueError with one line.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

from ..diffusion import DataConfig, TrainConfig, build_model, load_dataset, make_scheduler
from ..diffusion.vae import vae_source
from ..identity import tensors_fingerprint
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
OUT/retrain_top.json.

Class-conditional runs (kfac-influence run --model digits-cond ...): pass the run's --model and
--condition-dropout (--labels auto detects the model's class embeddings). Every retraining trains the kept
examples with their own labels, dropped to the null class (the model's last class embedding) with that
probability, as the run did; each query is measured under the class it was generated for: the "labels" entry of
the samples file (or --query-labels FILE, a (Q,) integer tensor).
  kfac-influence lds --out runs/c-lds --scores runs/c/scores/scores.safetensors \
      --queries runs/c/samples/samples.safetensors --data digits --limit 128 --model digits-cond \
      --condition-dropout 0.1 --steps 2000 --subsets 100 --seeds 5"""


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


def _load_optional(path: str, key: str):
    """The ``key`` entry of a tensor file (safetensors / .npz / tensor-dict .pt), or None when it has none; never
    a file's only tensor under another name (a samples file's images are not its labels)."""
    try:
        if path.endswith(".safetensors"):
            d = load_file(path)
            return d.get(key)
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return torch.from_numpy(z[key]) if key in z.files else None
        if path.endswith(".npy"):
            return None
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable tensor file ({type(exc).__name__}: {short_message(exc, 120)})") \
            from None
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if torch.is_tensor(value) else None


def _header(path: str) -> dict:
    """A pipeline file's JSON header ({} for other files)."""
    if not path.endswith(".safetensors"):
        return {}
    try:
        return load_tensors(path)[1]
    except ValueError:
        return {}


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
    p.add_argument("--labels", default="auto", choices=["auto", "true", "false"],
                   help="class-conditional retraining and measurement (auto: when the model has class embeddings)")
    p.add_argument("--condition-dropout", type=float, default=None,
                   help="class-conditional runs: probability of training a label as the null class (default: the "
                        "run's, from the run.json beside --scores' folder, else 0.1; a value other than the run's "
                        "is refused)")
    p.add_argument("--query-labels", default=None,
                   help="class-conditional runs: (Q,) file of each query's class (default: the queries file's "
                        "\"labels\" entry)")
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


def _class_embeds(model):
    cfg = getattr(model, "config", None)
    return cfg.get("num_class_embeds") if cfg is not None and hasattr(cfg, "get") else None


def _conditional(args, probe) -> bool:
    """Whether to retrain and measure class-conditionally (``--labels``, auto: the model has class embeddings)."""
    cfg = getattr(probe, "config", None)
    if cfg is not None and hasattr(cfg, "get") and cfg.get("cross_attention_dim") is not None:
        raise ValueError(f"--model {args.model} is text-conditional; lds and retrain-top retrain unconditional and "
                         f"class-conditional models only")
    embeds = _class_embeds(probe)
    if args.labels == "auto":
        return embeds is not None
    if args.labels == "true" and embeds is None:
        raise ValueError(f"--labels true needs a class-conditional model (num_class_embeds = classes + 1, the last "
                         f"the null class); --model {args.model} has none")
    if args.labels == "false" and embeds is not None:
        raise ValueError(f"--model {args.model} is class-conditional (num_class_embeds={embeds}) but --labels is "
                         f"false; use --labels true (or auto)")
    return args.labels == "true"


def _query_labels(args, num_queries: int, null_label: int) -> torch.Tensor:
    """``(Q,)`` int64: the class each query was generated for (``--query-labels``, else the queries file's
    "labels"), each in ``[0, null_label]`` (the null class is a condition too)."""
    src = args.query_labels or args.queries
    y = _load_tensor(src, "labels") if args.query_labels else _load_optional(src, "labels")
    if y is None:
        raise ValueError(f"{src}: no \"labels\" entry (the class of each query); a class-conditional run's "
                         f"samples.safetensors has one, or pass --query-labels FILE")
    if y.shape != (num_queries,) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{src}: query labels must be ({num_queries},) integers, got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    if num_queries and (int(y.min()) < 0 or int(y.max()) > null_label):
        raise ValueError(f"{src}: query labels must lie in [0, {null_label}] ({null_label}: the null class), got "
                         f"{int(y.min())}..{int(y.max())}")
    recorded = _header(args.queries).get("null_label")
    if recorded is not None and int(recorded) != null_label:
        raise ValueError(f"{args.queries}: its queries were generated with null label {recorded}, --model "
                         f"{args.model} has null label {null_label} (num_class_embeds - 1); pass the run's --model")
    return y


def _condition_dropout(args) -> float:
    """The retraining's condition dropout: the run's (``settings.train.condition_dropout`` of the ``run.json`` of
    the run folder holding ``--scores``, ``OUT/scores/scores.safetensors``) unless none is recorded (then
    ``--condition-dropout`` or 0.1). A ``--condition-dropout`` other than the run's is refused: the retrained models
    would be trained differently from the model the scores attribute."""
    run_json = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.scores))), "run.json")
    recorded = None
    if os.path.isfile(run_json):
        try:
            with open(run_json) as f:
                recorded = json.load(f)["settings"]["train"]["condition_dropout"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
    if recorded is not None and args.condition_dropout is not None \
            and float(args.condition_dropout) != float(recorded):
        raise ValueError(f"--condition-dropout {args.condition_dropout}: the run ({run_json}) was trained with "
                         f"{recorded}; retraining must match it (leave the option out to take the run's)")
    if recorded is not None:
        return float(recorded)
    return 0.1 if args.condition_dropout is None else float(args.condition_dropout)


def _setup(args):
    """Data, scores, and the retraining / measurement functions (class-conditional when the run was).

    Returns ``(images (N, C, H, W), scores (Q, N) float64, train_fn, build, measure, key, measurement_tag)``:
    ``train_fn(kept (n,), seed) -> model``; ``measure(model) -> (Q,)``; ``key``: what the retrained models depend
    on; ``measurement_tag``: "" or, class-conditional, a digest of the queries and their labels (measurements
    are cached under it)."""
    if vae_source(args.model) is not None:  # retraining would need the run's VAE and its latents
        raise ValueError(f"--model {args.model} is a latent model (it has a VAE); lds and retrain-top retrain "
                         f"pixel-space models only")
    scores = _load_tensor(args.scores, "scores").double()
    queries = _load_tensor(args.queries, "images").float()
    data_cfg = DataConfig(source=args.data, limit=args.limit, seed=args.data_seed, image_size=args.image_size)
    data = load_dataset(data_cfg)
    images = data.images
    c, s = images.shape[1], images.shape[-1]
    build = lambda seed=0: build_model(args.model, seed=seed, in_channels=c, sample_size=s)  # noqa: E731
    cond = _conditional(args, build(0))
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
    key = {"data": args.data, "limit": args.limit, "data_seed": args.data_seed, "image_size": args.image_size,
           "model": args.model}
    extra, tag, query_data = {}, "", queries
    cfg_kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                  checkpoint_every=0)
    if cond:
        data = load_dataset(replace(data_cfg, labels=True))  # the same images, with their labels
        null_label = int(_class_embeds(build(0))) - 1
        k = int(data.labels.max()) + 1 if data.labels.numel() else 0
        if k > null_label:
            raise ValueError(f"--model {args.model} has num_class_embeds={null_label + 1}: room for {null_label} "
                             f"classes and the null class, but the data has labels up to {k - 1}")
        qlabels = _query_labels(args, len(queries), null_label)
        cfg_kw["condition_dropout"] = _condition_dropout(args)
        extra = {"labels": data.labels, "null_label": null_label}
        key["condition"] = {"kind": "class", "null_label": null_label,
                            "labels": tensors_fingerprint([data.labels])}
        query_data = (queries, qlabels)  # each query measured under its own class
        tag = "_q" + tensors_fingerprint([queries, qlabels])[:12]
    cfg = TrainConfig(**cfg_kw)
    key["train"] = cfg.to_dict()
    train_fn = diffusion_train_fn(images, build, sch, cfg, **extra)
    task = DiffusionTask(sch, num_train_draws=1, num_query_draws=args.gt_draws, measurement=args.measurement,
                         seed=args.gt_seed, condition="class" if cond else None)
    measure = lambda m: task_measurements(m, task, query_data)  # noqa: E731
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    return images, scores, train_fn, build, measure, key, tag


def run_lds(args) -> int:
    images, scores, train_fn, build, measure, key, tag = _setup(args)
    cfg = LDSConfig(num_subsets=args.subsets, num_seeds=args.seeds, alpha=args.alpha, seed=args.subset_seed)
    run = LDSRun(os.path.join(args.out, "lds"), len(images), cfg, train_fn, build_fn=build, key=key)
    run.retrain(num_workers=args.workers, progress=not args.no_progress)
    name = f"{args.measurement}_d{args.gt_draws}_s{args.gt_seed}{tag}"
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
    images, scores, train_fn, build, measure, key, tag = _setup(args)
    if tag:  # class-conditional: the measurements depend on the queries and their labels
        key = {**key, "queries": tag[2:]}
    cfg = RetrainTopConfig(percents=tuple(args.percents), num_seeds=args.seeds,
                           queries=tuple(args.query_index) if args.query_index else None)
    res = retrain_top(args.out, scores, train_fn, measure, cfg, key=key, build_fn=build,
                      progress=not args.no_progress)
    atomic_write_json(os.path.join(args.out, "retrain_top.json"), {
        str(p): {"top": [res.top[p].mean, res.top[p].sem], "random": [res.random[p].mean, res.random[p].sem],
                 "difference": [res.difference[p].mean, res.difference[p].sem]} for p in res.percents})
    print(res.table())
    return 0
