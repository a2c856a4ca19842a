"""What a run folder holds: the stages, their folders, the outputs that mark them done, their dependencies.

    OUT/run.json                       every setting, versions, seeds, stage status and timings
    OUT/train/pipeline/                the EMA model (DDPMPipeline folder: model_index.json, unet/, scheduler/)
    OUT/train/checkpoints/             the resumable training checkpoint (removed once the stage is done)
    OUT/samples/samples.safetensors    generated queries (images, seeds, timesteps[, trajectory]); samples.png
    OUT/fit/curvature.safetensors      (E)K-FAC factors
    OUT/scores/scores.safetensors      scores (Q, N), train_ids (N,), query_ids (Q,)
    OUT/report/report.md, summary.png, query_XXX.png, report.json
    OUT/<stage folder>/stage.json      {"fingerprint": ..., "done": bool, "seconds": ...}

Tensor files are written by ``kfac_influence.storage`` (safetensors with a JSON header).
"""
from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["STAGES", "STAGE_DIRS", "OUTPUTS", "DEPENDENCIES", "StageError", "read_json", "stage_dir"]

STAGES = ("train", "sample", "fit", "score", "report")
STAGE_DIRS = {"train": "train", "sample": "samples", "fit": "fit", "score": "scores", "report": "report"}
OUTPUTS = {
    "train": ("pipeline/model_index.json", "pipeline/unet/config.json"),
    "sample": ("samples.safetensors", "samples.png"),
    "fit": ("curvature.safetensors",),
    "score": ("scores.safetensors",),
    "report": ("report.md", "summary.png", "report.json"),
}
#: Stages each stage reads (the score stage reads no fit when it is given a curvature file).
DEPENDENCIES = {"train": (), "sample": ("train",), "fit": ("train",), "score": ("sample", "fit"),
                "report": ("score",)}


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
