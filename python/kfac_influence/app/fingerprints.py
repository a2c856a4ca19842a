"""Stage fingerprints (what a stage's outputs depend on) and the software environment recorded in ``run.json``.

A stage's fingerprint is a hash of its own settings and of the fingerprints of the stages it reads:

    vae     (latent runs whose VAE is a preset, trained here) data (but its source path and labels), model,
            the VAE's training settings (``vae`` but encode_batch_size)
    encode  (latent runs) vae (for a --model folder's VAE: the model settings; its weights are an input
            identity) + data (but source and labels) + vae.encode_batch_size + the latents file layout; a latent
            run's train fingerprint adds encode's
    train   data (but its source path; labels as the resolved class-conditional flag), model, scheduler, train
            (condition_dropout and the sample's guidance_scale only for class- or text-conditional runs, so
            unconditional runs keep the fingerprints of versions without them; text-conditional runs add
            captions: true, the embeddings' content being an input identity)
    sample  train + sample (+ whether trajectories are recorded) + the samples file layout (+ the prompts of a
            text-conditional run)
    fit     train + fit (curvature config, draws per forward) + the draw scheme + model_mode
            (+ the score's num_train_draws when the curvature config leaves num_draws to the task)
    score   fit (or the --curvature file's path, size and mtime) + sample + score (damping included) + model_mode
    report  score + report

Damping is a score setting: a damping sweep reruns the score stage only.

What the settings cannot say is checked by identity, not by these fingerprints (``runner.Pipeline.inputs``): the
training data's content (``ImageDataset.fingerprint``, captions included: so a data folder that moved or was
copied reruns nothing, and one whose images changed reruns every stage that reads it), the ``--model`` files, what
each stage produced, and the token embeddings of a text-conditional run (``TextConditions.identity``: a file's
rows, or the encoder's files). Seeds and task settings are settings, so they are in these fingerprints.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from typing import Dict, Optional

import torch

from ..diffusion.vae import vae_source
from .settings import RunConfig, class_conditional, text_conditional

__all__ = ["fingerprints", "needs_trajectory", "environment"]

#: Version of the files the sample and score stages write (2: storage.py's header convention).
FILE_LAYOUT = 2


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_signature(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def needs_trajectory(config: RunConfig) -> bool:
    """Whether the sample stage records trajectories (asked for, or needed by the measurement)."""
    return config.sample.record_trajectory or config.score.measurement == "sampling_trajectory_logprob"


def _latent_fingerprints(config: RunConfig, d: dict) -> Dict[str, str]:
    """``{"vae": ..., "encode": ...}`` of a latent run (no "vae" when the VAE comes from the --model folder),
    ``{}`` for a pixel-space run."""
    src = vae_source(config.model.spec)
    if src is None:
        return {}
    data = {k: v for k, v in d["data"].items() if k not in ("source", "labels")}
    fp = {}
    if src == "preset":
        fp["vae"] = _hash({"data": data, "model": d["model"], "vae": config.vae.training()})
    fp["encode"] = _hash({"vae": fp.get("vae", d["model"]), "data": data,
                          "batch_size": config.vae.encode_batch_size, "layout": FILE_LAYOUT})
    return fp


def fingerprints(config: RunConfig) -> Dict[str, str]:
    """Fingerprint per stage (16 hex digits)."""
    d = config.to_dict()
    # the source's content is an input identity instead; labels enter as the resolved class-conditional flag
    data = {k: v for k, v in d["data"].items() if k not in ("source", "labels")}
    train, sample = dict(d["train"]), dict(d["sample"])
    text = text_conditional(config)
    if class_conditional(config):
        data["labels"] = True
    elif not text:  # settings an unconditional run ignores: its fingerprints are those of earlier versions
        train.pop("condition_dropout", None)
        sample.pop("guidance_scale", None)
    if text:  # which embeddings: an input identity (Pipeline.inputs), not a setting
        data["captions"] = True
        sample["prompts"] = list(config.text.prompts)
    fp = _latent_fingerprints(config, d)  # {} for a pixel-space run: its fingerprints are those of earlier versions
    latents = {"latents": fp["encode"]} if fp else {}
    fp["train"] = _hash({"data": data, "model": d["model"], "scheduler": d["scheduler"], "train": train, **latents})
    fp["sample"] = _hash({"train": fp["train"], "sample": sample, "traj": needs_trajectory(config),
                          "layout": FILE_LAYOUT})
    fit = {"train": fp["train"], "fit": d["fit"], "model_mode": config.model_mode, "draws": config.score.draws}
    if config.fit.curvature.num_draws is None:
        fit["task_draws"] = config.score.num_train_draws
    fp["fit"] = _hash(fit)
    curvature = fp["fit"]
    if config.score.curvature:
        path = config.score.curvature
        curvature = _file_signature(path) if os.path.isfile(path) else path
    fp["score"] = _hash({"curvature": curvature, "sample": fp["sample"], "score": d["score"],
                         "model_mode": config.model_mode, "layout": FILE_LAYOUT})
    fp["report"] = _hash({"score": fp["score"], "report": d["report"]})
    return fp


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions of everything that can change a result."""
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "kfac-kernels": _version("kfac-kernels"), "torch": torch.__version__, "diffusers": _version("diffusers"),
        "numpy": _version("numpy"), "scikit-learn": _version("scikit-learn"), "safetensors": _version("safetensors"),
        "matplotlib": _version("matplotlib"), "pillow": _version("pillow"), "triton": _version("triton"),
        "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
