"""``kfac-influence``: the attribution pipeline from the command line.

    kfac-influence demo --out runs/demo          # everything on the embedded digits, CPU-sized (README: timing)
    kfac-influence run --out runs/x --data imgs/ --model cifar-ddpm --device cuda
    kfac-influence train|sample|fit|score|report --out runs/x [options]   # one stage
    kfac-influence run --out runs/latent --model latent-tiny     # latent diffusion: vae -> encode -> train ...

Settings are resolved as: the subcommand's defaults (and those a --model preset brings, ``PRESET_SETTINGS``: e.g.
latent-tiny's 32x32 images and CPU-sized training), then those recorded in ``OUT/run.json`` by an earlier
command, then the options given; so a later command on the same folder only names what changes. Stages whose
outputs exist with the same settings are skipped (see ``kfac_influence.app.runner``). Damping is a score setting:
``kfac-influence score --out runs/x --damping 1e-4`` reruns only the score stage, on the existing fit.

Errors a user can cause (invalid settings, missing or corrupt files, incompatible models or factors, a full disk,
a diverging training, a busy run folder) end the command with exit status 2 and one line on stderr saying what
kind of problem it is and what to do; anything else is reported as an internal error in one line; ``--debug``
shows the traceback instead. Settings are validated, the data loaded and the stage folders checked before any file
is written, so an invalid value changes nothing. Ctrl-C (SIGINT) or SIGTERM during fit or score saves a checkpoint
at the end of the current group; the command then exits with status 130 and rerunning it resumes.

Checkpoint flags: ``--checkpoint-every STEPS`` (train: optimiser steps between checkpoints) and
``--checkpoint-seconds SECONDS`` (fit and score: seconds between checkpoints, default 60).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import List, Optional

import torch

from ..evaluation.cli import add_subcommands
from ..storage import short_message
from .lock import RunLock
from .runner import Pipeline
from .settings import PRESET_SETTINGS, RunConfig, upgrade_settings

__all__ = ["main", "build_parser", "demo_settings"]

SUPPRESS = argparse.SUPPRESS


def _opt_int(text: str) -> Optional[int]:
    """An integer, or 'none' / 'all' for unset (0 is a value, refused where it makes no sense)."""
    if text.lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'none', got {text!r}") from None


def _opt_bool(text: str) -> Optional[bool]:
    """true/false, or 'auto' / 'none' for unset."""
    return None if text.lower() in ("auto", "none") else _bool(text)


def _opt_str(text: str) -> Optional[str]:
    return None if text.lower() in ("", "none") else text


def _prompt(text: str) -> str:
    """One prompt (``--prompt``; repeatable)."""
    return text


def _prompts_file(path: str) -> list:
    """The prompts of a text file (``--prompts``): one per line, blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read prompts file {path!r} ({type(exc).__name__})") from None
    if not prompts:
        raise argparse.ArgumentTypeError(f"prompts file {path!r} holds no prompt")
    return prompts


class _Prompts(argparse.Action):
    """``--prompt TEXT`` (repeatable) and ``--prompts FILE`` add to one list of prompts, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(values if isinstance(values, list) else [values])
        setattr(namespace, self.dest, items)


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# (flags, section, field, type, choices, help): flags[0] is shown, the others are hidden aliases; section is the
# dotted path of the settings section ("fit.curvature": RunConfig.fit.curvature), None for a top-level field.
OPTIONS = {
    "data": [
        (("--data",), "data", "source", str, None,
         "training data: 'digits' (embedded), a folder of PNG/JPEG or an .npz"),
        (("--image-size",), "data", "image_size", _opt_int, None, "resize images to this size ('none': keep)"),
        (("--limit",), "data", "limit", _opt_int, None,
         "use a seeded random subset of this many examples ('none': all)"),
        (("--data-seed",), "data", "seed", int, None, "seed of the --limit subset"),
        (("--channels",), "data", "channels", _opt_int, None, "force 1 (grey) or 3 (RGB) channels ('none': infer)"),
        (("--labels",), "data", "labels", _opt_bool, None,
         "class-conditional run: train, sample and attribute with class labels (digits: the digit; a folder: one "
         "sub-folder per class; .npz: its 'labels'); 'auto' (none): on when the --model has class embeddings"),
        (("--captions",), "text", "captions", _opt_bool, None,
         "text-conditional run: each image under its caption (the folder's metadata.jsonl: file_name, text), as "
         "token embeddings from --embeddings or --text-encoder; 'auto' (none): on for a UNet2DConditionModel"),
        (("--embeddings",), "text", "embeddings", _opt_str, None,
         "precomputed token embeddings (safetensors: embeddings (R, L, E)[, mask (R, L)], metadata texts[, "
         "file_names]; docs/conditional.md)"),
        (("--text-encoder",), "text", "encoder", _opt_str, None,
         "local text encoder folder (transformers CLIPTextModel + CLIPTokenizer: text_encoder/ + tokenizer/; "
         "never downloaded); default: the --model folder's, if it has one"),
        (("--max-length",), "text", "max_length", _opt_int, None,
         "tokens per caption with --text-encoder ('none': the tokenizer's model_max_length)"),
    ],
    "model": [
        (("--model",), "model", "spec", str, None,
         "model: preset (digits-tiny, digits-cond: class-conditional, text-tiny: text-conditional, latent-tiny: "
         "latent diffusion with a VAE, cifar-ddpm), a .json UNet2DModel / UNet2DConditionModel config or a local "
         "diffusers folder (with vae/: a latent model)"),
        (("--model-seed",), "model", "seed", int, None, "initialisation seed of a preset/JSON model"),
        (("--timesteps",), "scheduler", "num_train_timesteps", int, None, "diffusion steps T"),
        (("--beta-start",), "scheduler", "beta_start", float, None, "first beta of the linear schedule"),
        (("--beta-end",), "scheduler", "beta_end", float, None, "last beta of the linear schedule"),
    ],
    "train": [
        (("--steps",), "train", "steps", int, None, "optimiser steps (0: use the model as it is)"),
        (("--batch-size",), "train", "batch_size", int, None, "training batch size (images per step)"),
        (("--lr",), "train", "lr", float, None, "AdamW learning rate"),
        (("--weight-decay",), "train", "weight_decay", float, None, "AdamW weight decay"),
        (("--warmup-steps",), "train", "warmup_steps", int, None, "linear learning-rate warmup steps"),
        (("--grad-clip",), "train", "grad_clip", float, None, "gradient-norm clipping (0: off)"),
        (("--ema-decay",), "train", "ema_decay", float, None, "EMA decay of the attributed weights"),
        (("--checkpoint-every", "--checkpoint-steps"), "train", "checkpoint_every", int, None,
         "train: optimiser steps between checkpoints (fit and score: --checkpoint-seconds)"),
        (("--seed",), "train", "seed", int, None, "training seed (batches, timesteps, noise, dropout)"),
        (("--condition-dropout",), "train", "condition_dropout", float, None,
         "conditional runs: probability a training label is replaced by the null class (text: a caption by the "
         "empty prompt), in [0, 1)"),
    ],
    "sample": [
        (("--num-queries",), "sample", "num_queries", int, None, "generated images to attribute"),
        (("--sample-seed",), "sample", "seed", int, None, "query k is sampled with seed + k"),
        (("--sample-steps",), "sample", "num_inference_steps", _opt_int, None, "DDPM sampling steps ('none': all T)"),
        (("--sample-batch-size",), "sample", "batch_size", int, None, "images per sampling batch"),
        (("--record-trajectory",), "sample", "record_trajectory", _bool, None, "keep the sampling trajectories"),
        (("--guidance-scale",), "sample", "guidance_scale", float, None,
         "conditional runs: classifier-free guidance s (1: none; s > 1 guides; text: against the empty prompt); "
         "query k gets class k %% K"),
        (("--prompt",), "text", "prompts", _prompt, None,
         "text-conditional runs: a prompt to generate queries for (repeat it; query k gets prompt k %% P); none: "
         "the distinct training captions"),
        (("--prompts",), "text", "prompts", _prompts_file, None,
         "text-conditional runs: a text file of prompts, one per line (added to --prompt's)"),
    ],
    "fit": [
        (("--method",), "fit.curvature", "method", str, ("ekfac", "kfac"), "curvature approximation"),
        (("--approx",), "fit.curvature", "approx", str, ("expand", "reduce"), "K-FAC flavour for weight sharing"),
        (("--fisher",), "fit.curvature", "fisher", str, ("mc", "empirical", "type2"), "GGN estimator"),
        (("--fit-draws",), "fit.curvature", "num_draws", int, None,
         "(t, eps) draws per training example for the curvature"),
        (("--fit-seed",), "fit.curvature", "seed", int, None, "seed of the curvature draws"),
        (("--fit-draws-per-forward", "--fit-batch-size"), "fit", "draws_per_forward", int, None,
         "(t, eps) draws per forward pass when fitting"),
        (("--checkpoint-seconds",), None, "checkpoint_seconds", float, None,
         "fit and score: seconds between checkpoints of the resumable state (Ctrl-C also saves one)"),
        (("--model-mode",), None, "model_mode", str, ("eval", "train"),
         "dropout off (eval) or on (train) for curvature, train and query gradients alike"),
        (("--max-memory",), None, "max_memory", _opt_str, None,
         "memory budget of the fit and score stages (e.g. 6GiB): the fit's draws per forward pass and, when its "
         "state does not fit, layer partitions; the scores' query block and draws per forward pass (overriding "
         "--fit-draws-per-forward / --score-draws-per-forward; 'none': use those)"),
    ],
    "score": [
        (("--measurement",), "score", "measurement", str,
         ("loss", "elbo", "simplified_elbo", "square_norm", "sampling_trajectory_logprob"),
         "what is attributed for each query"),
        (("--train-draws",), "score", "num_train_draws", int, None, "(t, eps) draws per training example"),
        (("--query-draws",), "score", "num_query_draws", int, None, "(t, eps) draws per query"),
        (("--draws",), "score", "draws", str, ("stratified-antithetic", "plain"),
         "draw scheme for fit, train and query draws: stratified timesteps + antithetic noise, or i.i.d."),
        (("--damping",), "score", "damping", float, None,
         "damping lambda (absolute) or rho (relative); only the score stage reruns when it changes"),
        (("--damping-mode",), "score", "damping_mode", str, ("absolute", "relative"), "damping mode"),
        (("--score-draws-per-forward", "--score-batch-size"), "score", "draws_per_forward", int, None,
         "(t, eps) draws per forward pass when scoring"),
        (("--score-seed",), "score", "seed", int, None, "seed of the train and query draws"),
        (("--curvature",), "score", "curvature", _opt_str, None, "use this curvature file instead of the fit stage"),
    ],
    "vae": [
        (("--vae-steps",), "vae", "steps", int, None,
         "latent runs with a VAE preset (--model latent-tiny): VAE training steps (0: keep its initial weights)"),
        (("--vae-batch-size",), "vae", "batch_size", int, None, "VAE training batch size (images per step)"),
        (("--vae-lr",), "vae", "lr", float, None, "VAE AdamW learning rate"),
        (("--vae-warmup-steps",), "vae", "warmup_steps", int, None, "VAE linear learning-rate warmup steps"),
        (("--vae-kl-weight",), "vae", "kl_weight", float, None, "weight of the VAE's KL term (per pixel)"),
        (("--vae-checkpoint-every",), "vae", "checkpoint_every", int, None, "VAE steps between checkpoints"),
        (("--vae-seed",), "vae", "seed", int, None, "VAE training seed (batches, reparameterisation noise)"),
        (("--encode-batch-size",), "vae", "encode_batch_size", int, None,
         "latent runs: images per VAE encode call when caching the training latents (recorded with them)"),
    ],
    "report": [
        (("--top-k",), "report", "top_k", int, None, "training images shown per query and sign"),
        (("--max-query-figures",), "report", "max_query_figures", int, None, "per-query PNGs written"),
        (("--summary-rows",), "report", "summary_rows", int, None, "queries in the summary grid"),
    ],
}

STAGE_GROUPS = {
    "vae": ("data", "model", "vae"),
    "encode": ("data", "model", "vae"),
    "train": ("data", "model", "vae", "train"),
    "sample": ("data", "model", "vae", "train", "sample"),
    "fit": ("data", "model", "vae", "train", "fit", "score"),
    "score": ("data", "model", "vae", "train", "sample", "fit", "score"),
    "report": ("data", "model", "vae", "train", "sample", "fit", "score", "report"),
    "run": ("data", "model", "vae", "train", "sample", "fit", "score", "report"),
    "demo": ("data", "model", "vae", "train", "sample", "fit", "score", "report"),
}

DESCRIPTIONS = {
    "vae": "Latent runs with a VAE preset (--model latent-tiny): train the fixed AutoencoderKL on the training "
           "images (resumable); writes OUT/vae/.",
    "encode": "Latent runs: encode the training images once with the fixed VAE (latent mean x scaling_factor) into "
              "a cached, resumable OUT/latents/latents.safetensors.",
    "train": "Train the model (AdamW, warmup, clipping, EMA) with resumable checkpoints; writes OUT/train/.",
    "sample": "Generate the query images by DDPM ancestral sampling; writes OUT/samples/.",
    "fit": "Fit the (E)K-FAC curvature of the training loss on the EMA model; writes OUT/fit/.",
    "score": "Score every query against every training example at the given damping (the fit is reused); "
             "writes OUT/scores/scores.safetensors.",
    "report": "Write the visual report (PNGs, report.md, class-match statistic); writes OUT/report/.",
    "run": "All stages in order, skipping those whose outputs exist with the same settings (a latent run, e.g. "
           "--model latent-tiny, starts with vae and encode).",
    "demo": "`run` on the embedded digits with defaults sized for a CPU (minutes on 2 cores).",
}


def demo_settings() -> RunConfig:
    """CPU-sized defaults of ``demo``: the 8x8 digits, digits-tiny, short training, few draws."""
    return RunConfig().merged({
        "data": {"source": "digits", "image_size": None, "limit": None},
        "model": {"spec": "digits-tiny"},
        "train": {"steps": 1200, "batch_size": 128, "lr": 3e-3, "warmup_steps": 100, "ema_decay": 0.995,
                  "checkpoint_every": 500},
        "sample": {"num_queries": 16, "num_inference_steps": None, "batch_size": 64},
        "fit": {"curvature": {"num_draws": 4}, "draws_per_forward": 256},
        "score": {"num_train_draws": 8, "num_query_draws": 64, "draws_per_forward": 256},
        "report": {"top_k": 6},
    })


def _defaults(command: str, spec: Optional[str] = None) -> RunConfig:
    """The subcommand's defaults (``demo``'s CPU-sized ones), then those the --model preset ``spec`` brings
    (``settings.PRESET_SETTINGS``)."""
    config = demo_settings() if command == "demo" else RunConfig()
    return config.merged(PRESET_SETTINGS[spec]) if spec in PRESET_SETTINGS else config


def _value(config: RunConfig, section: Optional[str], name: str):
    obj = config
    for part in (section.split(".") if section else ()):
        obj = getattr(obj, part)
    return getattr(obj, name)


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--out", required=command != "demo", default="runs/demo" if command == "demo" else None,
                   help="output folder of the run")
    p.add_argument("--device", default=SUPPRESS, help="device: auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 is best on a busy machine)")
    p.add_argument("--force", action="store_true",
                   help="rerun the stage(s) even when up to date, discarding their checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="kfac-influence", formatter_class=fmt,
                                     description="K-FAC/EK-FAC influence functions for diffusion models: which "
                                                 "training images made a generated image likely?")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command, groups in STAGE_GROUPS.items():
        p = sub.add_parser(command, help=DESCRIPTIONS[command], description=DESCRIPTIONS[command] +
                           " Options not given are taken from OUT/run.json when it exists, else from the defaults "
                           "shown.", formatter_class=fmt)
        _add_common(p, command)
        defaults = _defaults(command)
        for group in groups:
            g = p.add_argument_group(f"{group} options")
            for flags, section, name, typ, choices, text in OPTIONS[group]:
                default = _value(defaults, section, name)
                shown = "none" if default is None else default
                dest = f"{section or '_'}.{name}"
                metavar = None if choices else name.upper()
                action = _Prompts if typ in (_prompt, _prompts_file) else None
                if action is not None:
                    metavar = "TEXT" if typ is _prompt else "FILE"
                g.add_argument(flags[0], dest=dest, type=typ, choices=choices, default=SUPPRESS,
                               help=f"{text} (default: {shown})", metavar=metavar, action=action)
                for alias in flags[1:]:  # earlier names, still accepted
                    g.add_argument(alias, dest=dest, type=typ, choices=choices, default=SUPPRESS, help=SUPPRESS,
                                   metavar=metavar)
    add_subcommands(sub)  # lds, retrain-top
    return parser


def _recorded(out: str) -> Optional[dict]:
    """The settings recorded in ``OUT/run.json`` (in this version's form), or None when there is none."""
    run_json = os.path.join(out, "run.json")
    if not os.path.isfile(run_json):
        return None
    try:
        with open(run_json) as f:
            recorded = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{run_json}: unreadable ({type(exc).__name__}); delete it or use another --out") \
            from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{run_json}: 'settings' is not a mapping; delete it or use another --out")
    recorded = upgrade_settings(recorded)
    recorded.pop("device", None)
    return recorded


def _overrides(args: argparse.Namespace) -> dict:
    """Nested ``{section: {...: {field: value}}}`` of the options given (dest "fit.curvature.method" etc.)."""
    overrides: dict = {}
    for key, value in vars(args).items():
        if "." not in key:
            continue
        *path, name = key.split(".")
        target = overrides
        for part in path if path != ["_"] else []:
            target = target.setdefault(part, {})
        target[name] = value
    if hasattr(args, "device"):
        overrides["device"] = args.device
    # paths are recorded absolute, so later commands may run from another folder
    for section, name in (("data", "source"), ("model", "spec"), ("score", "curvature"), ("text", "embeddings"),
                          ("text", "encoder")):
        value = overrides.get(section, {}).get(name)
        if value and (section != "data" or value != "digits") and (section != "model" or os.path.exists(value)):
            overrides[section][name] = os.path.abspath(value)
    return overrides


def _resolve(args: argparse.Namespace) -> RunConfig:
    """Defaults (the subcommand's and the --model preset's), then OUT/run.json, then explicit options."""
    recorded = _recorded(args.out)
    spec = getattr(args, "model.spec", None) or ((recorded or {}).get("model") or {}).get("spec")
    config = _defaults(args.command, spec)
    if recorded is not None:
        try:
            config = config.merged(recorded)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{os.path.join(args.out, 'run.json')}: {exc}; delete it or use another --out") \
                from None
    return config.merged(_overrides(args))


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "func", None) is not None:  # evaluation subcommands
        return args.func(args)
    config = _resolve(args)  # invalid settings stop here, before any file is touched
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pipe = Pipeline(args.out, config, progress=not args.no_progress, command=args.command)
    stages = pipe.stages_to_run() if args.command in ("run", "demo") else (args.command,)
    pipe.preflight(stages, args.force)  # device, data, model vs image size, foreign files: nothing written yet
    os.makedirs(args.out, exist_ok=True)
    with RunLock(args.out):
        pipe.preflight(stages, args.force)  # again under the lock: another command may have changed the folder
        pipe.start()
        if args.command in ("run", "demo"):
            pipe.run_all(force=args.force)
        else:
            pipe.run_stage(args.command, force=args.force)
    if args.command in ("run", "demo", "report"):
        report = os.path.join(args.out, "report", "report.md")
        with open(os.path.join(args.out, "report", "report.json")) as f:
            summary = json.load(f)
        cm = summary.get("class_match")
        if cm:
            how = " (exact: each query's class is its condition)" if cm.get("exact") else ""
            print(f"top-{cm['k']} positive influences sharing the query's class: "
                  f"{cm['top_positive_same_class']:.3f} (negative: {cm['top_negative_same_class']:.3f}, "
                  f"chance: {cm['chance']:.3f}){how}")
        print(f"report: {report}")
    return 0


def error_line(exc: BaseException) -> str:
    """One line for an exception a user can cause: what kind of problem, and what to do."""
    msg = short_message(exc, 400)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"disk full ({msg}); free space and rerun the same command: finished outputs are intact and "
                f"fit/score resume from their last checkpoint")
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc)):
        return (f"out of memory ({msg}); pass --max-memory, or lower --fit-draws-per-forward / "
                f"--score-draws-per-forward / --batch-size")
    if isinstance(exc, FloatingPointError):
        return f"numerical failure: {msg}"
    if isinstance(exc, (ValueError, TypeError)):  # settings, data, models, files (StageError, DataError, ...)
        return msg
    if isinstance(exc, OSError):
        return f"file system: {msg}"
    return (f"internal error ({type(exc).__name__}: {msg}); rerun with --debug for the traceback and report it "
            f"with that")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("kfac-influence: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 (every error ends in one line; --debug shows the traceback)
        if args.debug:
            raise
        print(f"kfac-influence: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
