"""The attribution pipeline as resumable stages (train -> sample -> fit -> score -> report) in one output folder.

A stage whose ``stage.json`` records the current fingerprint (``fingerprints``) and whose outputs exist is
skipped; a stage with another fingerprint is cleared and rerun; a stage interrupted with the same fingerprint
resumes from its checkpoints. ``run.json`` records every setting, the versions, the seeds and each stage's status.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable, Dict, Optional, Tuple

from ..storage import atomic_write_json
from . import stages
from .context import RunContext
from .fingerprints import environment, fingerprints
from .layout import DEPENDENCIES, OUTPUTS, STAGES, StageError, read_json, stage_dir
from .settings import RunConfig

__all__ = ["Pipeline", "RUN_JSON_FORMAT"]

#: 2: settings with a nested fit.curvature, damping in score, draws_per_forward (format 1: see upgrade_settings).
RUN_JSON_FORMAT = 2


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Pipeline:
    """Runs the stages of the folder ``out`` with settings ``config``. ``log`` receives one-line progress messages
    (stderr by default); ``command`` is recorded in ``run.json``."""

    def __init__(self, out: str, config: RunConfig, progress: bool = True, log: Callable[[str], None] = _stderr,
                 command: str = "run"):
        self.out = out
        self.config = config
        self.command = command
        self.log = log
        self.fp = fingerprints(config)
        self.ctx = RunContext(out, config, progress, log)

    def dependencies(self, stage: str) -> Tuple[str, ...]:
        if stage == "score" and self.config.score.curvature:
            return ("sample",)
        return DEPENDENCIES[stage]

    def stages_to_run(self) -> Tuple[str, ...]:
        """Every stage in order; no fit when the score stage is given a curvature file."""
        return tuple(st for st in STAGES if not (st == "fit" and self.config.score.curvature))

    def is_done(self, stage: str) -> bool:
        d = stage_dir(self.out, stage)
        st = read_json(os.path.join(d, "stage.json"))
        return bool(st and st.get("done") and st.get("fingerprint") == self.fp[stage]
                    and all(os.path.exists(os.path.join(d, o)) for o in OUTPUTS[stage]))

    def write_run_json(self, stage_status: Optional[Dict[str, dict]] = None) -> None:
        """Rewrite ``run.json`` with the current settings and ``stage_status`` merged into the recorded one."""
        path = os.path.join(self.out, "run.json")
        old = read_json(path) or {}
        status = old.get("stages", {}) if old.get("format") == RUN_JSON_FORMAT else {}
        status.update(stage_status or {})
        c = self.config
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(path, {
            "format": RUN_JSON_FORMAT,
            "command": self.command,
            "argv": sys.argv,
            "created": old.get("created", now),
            "updated": now,
            "settings": c.to_dict(),
            "seeds": {"data_subset": c.data.seed, "model_init": c.model.seed, "train": c.train.seed,
                      "sample": c.sample.seed, "fit": c.fit.curvature.seed, "score": c.score.seed},
            "device": str(self.ctx.device),
            "versions": environment(),
            "fingerprints": self.fp,
            "stages": status,
        })

    def run_stage(self, stage: str, force: bool = False) -> str:
        """Run one stage (its dependencies must be done). Returns "skipped" or "done"."""
        fp = self.fp[stage]
        if not force and self.is_done(stage):
            self.log(f"[{stage}] up to date (fingerprint {fp}), skipped")
            self.write_run_json({stage: {"fingerprint": fp, "status": "skipped"}})
            return "skipped"
        for dep in self.dependencies(stage):
            if not self.is_done(dep):
                raise StageError(f"stage '{dep}' is not done for these settings in {self.out}; run "
                                 f"`kfac-influence {dep} --out {self.out}` (or `run`) first")
        d = stage_dir(self.out, stage)
        st = read_json(os.path.join(d, "stage.json"))
        if os.path.isdir(d) and (st is None or st.get("fingerprint") != fp):
            shutil.rmtree(d)  # outputs of other settings (or of unknown origin): start over
        os.makedirs(d, exist_ok=True)
        atomic_write_json(os.path.join(d, "stage.json"), {"fingerprint": fp, "done": False})
        self.log(f"[{stage}] running (fingerprint {fp})")
        t0 = time.time()
        stages.BODIES[stage](self.ctx, d)
        secs = round(time.time() - t0, 2)
        atomic_write_json(os.path.join(d, "stage.json"), {"fingerprint": fp, "done": True, "seconds": secs})
        self.write_run_json({stage: {"fingerprint": fp, "status": "done", "seconds": secs}})
        self.log(f"[{stage}] done in {secs:.1f} s")
        return "done"

    def run_all(self, force: bool = False) -> Dict[str, str]:
        """Every stage of ``stages_to_run`` in order: ``{stage: "skipped" | "done"}``."""
        return {st: self.run_stage(st, force=force) for st in self.stages_to_run()}
