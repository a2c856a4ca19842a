"""What a run folder holds: the stages, their folders, the outputs that mark them done, their dependencies.

    OUT/run.json                       every setting, versions, seeds, stage status and timings
    OUT/vae/vae/                       latent runs with a VAE preset: the trained, fixed AutoencoderKL (diffusers
                                       folder; config.json records its scaling_factor); losses.json
    OUT/latents/latents.safetensors    latent runs: the training images' latents (N, c, h, w), header: the
                                       identities of the VAE's weights and of the images (kfac_influence.latents)
    OUT/train/pipeline/                the EMA model (DDPMPipeline folder: model_index.json, unet/, scheduler/;
                                       a latent run's adds vae/, so --model loads it back)
    OUT/train/checkpoints/             the resumable training checkpoint (removed once the stage is done)
    OUT/samples/samples.safetensors    generated queries (images, seeds, timesteps[, trajectory]); samples.png
                                       (a latent run: latents, the queries, and images, decoded for people)
    OUT/fit/curvature.safetensors      (E)K-FAC factors
    OUT/scores/scores.safetensors      scores (Q, N), train_ids (N,), query_ids (Q,)
    OUT/report/report.md, summary.png, query_XXX.png, report.json
    OUT/<stage folder>/stage.json      fingerprint, done, manifest (the files it wrote), their sizes and mtimes,
                                       the identities of its inputs and of what it produced, seconds
    OUT/<stage folder>/checkpoints/    resumable state of an interrupted stage (removed once the stage is done)
    OUT/<stage folder>/.new/           the outputs of a running stage, moved into place when it succeeds
    OUT/.lock                          the pid and host of the command running on the folder (``lock.py``)

Ownership: the pipeline deletes only what a stage's manifest lists (and the stage's ``checkpoints/``, ``.new/``
and its own temporary files), never a folder it did not create. A stage folder without ``stage.json`` that holds
anything, or a file in a stage folder that no manifest lists, stops the stage with one line naming it
(``check_stage_folder``). Tensor files are written by ``kfac_influence.storage`` (safetensors with a JSON header).
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Iterable, List, Optional

__all__ = ["STAGES", "STAGE_DIRS", "OUTPUTS", "DEPENDENCIES", "StageError", "read_json", "stage_dir",
           "STAGE_JSON", "CHECKPOINTS", "STAGING", "LEGACY_WRITES", "check_stage_folder", "manifest_of",
           "is_own_temporary", "legacy_entries"]

STAGES = ("vae", "encode", "train", "sample", "fit", "score", "report")
STAGE_DIRS = {"vae": "vae", "encode": "latents", "train": "train", "sample": "samples", "fit": "fit",
              "score": "scores", "report": "report"}
OUTPUTS = {
    "vae": ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"),
    "encode": ("latents.safetensors",),
    "train": ("pipeline/model_index.json", "pipeline/unet/config.json"),
    "sample": ("samples.safetensors", "samples.png"),
    "fit": ("curvature.safetensors",),
    "score": ("scores.safetensors",),
    "report": ("report.md", "summary.png", "report.json"),
}
#: Stages each stage reads (the score stage reads no fit when it is given a curvature file; in a latent run the
#: train stage reads encode's latents, and encode reads no vae stage when the VAE comes from the --model folder).
#: vae and encode run only in latent runs (``runner.Pipeline.stages_to_run``).
DEPENDENCIES = {"vae": (), "encode": ("vae",), "train": (), "sample": ("train",), "fit": ("train",),
                "score": ("sample", "fit"), "report": ("score",)}


STAGE_JSON = "stage.json"
CHECKPOINTS = "checkpoints"
STAGING = ".new"
#: What each stage wrote before stage.json had a manifest (a stage.json without one is from such a version).
LEGACY_WRITES = {
    "vae": (),  # stages born with manifests
    "encode": (),
    "train": ("pipeline", "pipeline.tmp", "pipeline.old", "losses.json"),
    "sample": ("samples.safetensors", "samples.png"),
    "fit": ("curvature.safetensors",),
    "score": ("scores.safetensors",),
    "report": ("report.md", "summary.png", "queries.png", "report.json", "query_*.png"),
}


class StageError(ValueError):
    """A stage cannot run (missing inputs, incompatible model and data); the message says what to do."""


def read_json(path: str) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stage_dir(out: str, stage: str) -> str:
    return os.path.join(out, STAGE_DIRS[stage])


def is_own_temporary(name: str) -> bool:
    """A temporary file of ``storage``'s atomic writes (``.<name>.<random>.tmp``), left by a killed process."""
    return name.startswith(".") and name.endswith(".tmp")


def manifest_of(stage: str, record: Optional[dict]) -> List[str]:
    """The top-level entries of a stage folder that the stage wrote, from its ``stage.json`` record."""
    if not record:
        return []
    manifest = record.get("manifest")
    if isinstance(manifest, list) and all(isinstance(m, str) for m in manifest):
        return [m for m in manifest if m and "/" not in m and m not in (".", "..")]
    return []


def _matches_legacy(stage: str, name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in LEGACY_WRITES[stage])


def legacy_entries(d: str, stage: str) -> List[str]:
    """The entries of ``d`` that a version without manifests wrote (by name)."""
    return sorted(e for e in os.listdir(d) if _matches_legacy(stage, e)) if os.path.isdir(d) else []


def check_stage_folder(out: str, stage: str) -> None:
    """Raise StageError (one line) unless the stage's folder is missing, empty or holds only what the pipeline
    wrote there: ``stage.json``, the manifest's entries, ``checkpoints/``, ``.new/`` and atomic-write temporary
    files (for a ``stage.json`` of a version without manifests: the names that version wrote)."""
    d = stage_dir(out, stage)
    if not os.path.exists(d):
        return
    if not os.path.isdir(d):
        raise StageError(f"{d} is a file, not a stage folder of kfac-influence; move it away or use another --out")
    entries = sorted(os.listdir(d))
    if not entries:
        return
    record = read_json(os.path.join(d, STAGE_JSON))
    if not isinstance(record, dict):
        raise StageError(f"{d} holds files kfac-influence did not write ({_names(entries)}) and no {STAGE_JSON}; "
                         f"it never deletes or overwrites such folders: move it away or use another --out")
    own = set(manifest_of(stage, record))
    legacy = "manifest" not in record
    foreign = [e for e in entries if e not in own and e not in (STAGE_JSON, CHECKPOINTS, STAGING)
               and not is_own_temporary(e) and not (legacy and _matches_legacy(stage, e))]
    if foreign:
        raise StageError(f"{d} holds {_names(foreign)}, not written by kfac-influence; it never deletes files it "
                         f"did not write: move {'it' if len(foreign) == 1 else 'them'} out of {d} and rerun")


def _names(entries: Iterable[str], limit: int = 3) -> str:
    entries = list(entries)
    text = ", ".join(entries[:limit])
    return text + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
