"""The attribution pipeline as resumable stages (train -> sample -> fit -> score -> report) in one output folder.

A stage is done when its ``stage.json`` records the current settings fingerprint (``fingerprints``), its outputs
are on disk as it wrote them (sizes and modification times), and the identities of its inputs (the training data's
content fingerprint, the ``--model`` files, the trained model's weights, the queries, the curvature values, the
scores: ``Pipeline.inputs``) equal the current ones. Otherwise it reruns, and the log says why. A stage
interrupted with the same fingerprint and inputs resumes from its checkpoints; with others (or ``--force``) its
checkpoints are cleared first.

Safety (``layout.py``): a stage only deletes files its manifest lists; it refuses to start in a folder holding
files it did not write. A stage writes its outputs beside the previous ones (``.new/``) and swaps them in only
when it succeeded, so a failed or interrupted stage leaves the previous good outputs (and their ``stage.json``) in
place. ``run.json`` is created when the folder is first used and rewritten after each stage, so it describes the
settings of the stages that finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from ..diffusion.models import check_image_size, model_config
from ..diffusion.vae import vae_source
from ..engine import CheckpointMismatch
from ..identity import path_fingerprint
from ..storage import atomic_write_json, short_message
from . import stages
from .context import RunContext
from .fingerprints import environment, fingerprints
from .layout import (CHECKPOINTS, DEPENDENCIES, OUTPUTS, STAGE_JSON, STAGES, STAGING, StageError,
                     check_stage_folder, is_own_temporary, legacy_entries, manifest_of, read_json, stage_dir)
from .settings import RunConfig
from .textrun import text_inputs

__all__ = ["Pipeline", "RUN_JSON_FORMAT", "INPUT_NAMES"]

#: 2: settings with a nested fit.curvature, damping in score, draws_per_forward (format 1: see upgrade_settings).
RUN_JSON_FORMAT = 2

#: How the log names each input of ``Pipeline.inputs`` when it changed.
INPUT_NAMES = {"vae": "the VAE (its weights)", "latents": "the cached latents", "data": "the training data",
               "initial model": "the --model files", "model": "the trained model",
               "queries": "the generated queries", "curvature": "the curvature", "scores": "the scores",
               "text": "the token embeddings (--embeddings rows or --text-encoder files)"}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _signature(d: str, manifest: List[str]) -> Dict[str, List[int]]:
    """``{relative path: [size, mtime_ns]}`` of every file under the manifest's entries."""
    sig = {}
    for entry in manifest:
        top = os.path.join(d, entry)
        files = [top] if os.path.isfile(top) else [os.path.join(dp, f) for dp, _, fs in os.walk(top) for f in fs]
        for p in sorted(files):
            st = os.stat(p)
            sig[os.path.relpath(p, d)] = [st.st_size, st.st_mtime_ns]
    return sig


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


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
        self._identities: Dict[str, str] = {}

    def _path_identity(self, path: str) -> str:
        """``_path_identity``, once per command (a --model folder is read once)."""
        if path not in self._identities:
            self._identities[path] = path_fingerprint(path)
        return self._identities[path]

    def dependencies(self, stage: str) -> Tuple[str, ...]:
        if stage == "score" and self.config.score.curvature:
            return ("sample",)
        src = vae_source(self.config.model.spec)
        if stage == "encode" and src != "preset":  # the --model folder's VAE: no vae stage
            return ()
        if stage == "train" and src is not None:  # a latent run trains on the latents
            return ("encode",)
        return DEPENDENCIES[stage]

    def stages_to_run(self) -> Tuple[str, ...]:
        """Every stage in order; no fit when the score stage is given a curvature file; vae and encode only in a
        latent run (vae only when its VAE is a preset, trained here)."""
        src = vae_source(self.config.model.spec)
        skip = {"fit"} if self.config.score.curvature else set()
        skip |= {"vae", "encode"} if src is None else (set() if src == "preset" else {"vae"})
        return tuple(st for st in STAGES if st not in skip)

    # -- checks before anything is written -----------------------------------------------------------------------
    def preflight(self, stages_: Tuple[str, ...], force: bool = False) -> None:
        """Everything that can be checked before a file is touched: the device, the data, the data's labels
        against the model's class embeddings (``RunContext.check_condition``), the model against the data's image
        size, and that the folders of the stages of ``stages_`` that will run (not up to date, or
        ``force``) hold no foreign files (``run_stage`` checks again, for stages rerun because an earlier one
        changed its outputs). A latent run checks the VAE against the images and the UNet against their latents.
        Raises one-line errors."""
        self.ctx.device  # noqa: B018  (resolved and validated in RunContext)
        for st in stages_:
            if st in ("vae", "encode") and st not in self.stages_to_run():
                spec = self.config.model.spec
                raise StageError(f"the {st} stage is for latent runs with a VAE preset (e.g. --model latent-tiny)"
                                 if vae_source(spec) else f"the {st} stage is for latent runs (--model latent-tiny "
                                 f"or a diffusers pipeline folder with vae/); --model {spec} has no VAE")
        source = self.config.data.source
        if os.path.isdir(source):
            data_dir, out = os.path.realpath(source), os.path.realpath(self.out)
            if out == data_dir or out.startswith(data_dir + os.sep):
                raise StageError(f"--out {self.out} is inside the training data folder {source}: the run's own "
                                 f"images would become training data; use an --out outside it")
        c, h, w = self.ctx.input_shape()  # a latent run's: the latents' (the VAE checked against the images)
        self.ctx.check_condition()  # labels, class embeddings and guidance agree
        will_run = [st for st in stages_ if force or self.why_not_done(st) is not None]
        if "train" in will_run:
            spec = self.config.model.spec
            check_image_size(model_config(spec), h, w, f"--model {os.path.basename(spec.rstrip('/')) or spec}")
        for st in will_run:
            check_stage_folder(self.out, st)

    # -- identities ----------------------------------------------------------------------------------------------
    def record(self, stage: str) -> Optional[dict]:
        st = read_json(os.path.join(stage_dir(self.out, stage), STAGE_JSON))
        return st if isinstance(st, dict) else None

    def produced(self, stage: str) -> Optional[str]:
        """The identity of what a done stage produced (model weights, queries, curvature values, scores)."""
        rec = self.record(stage)
        return rec.get("produced") if rec and rec.get("done") else None

    def inputs(self, stage: str) -> Dict[str, Optional[str]]:
        """The identities of what ``stage`` is computed from, beyond its settings (which its fingerprint covers,
        seeds and task settings included): the training data's content, the ``--model`` files, and what the
        stages it reads produced (or the ``--curvature`` file's content); in a text-conditional run also the
        token embeddings it reads (``textrun.text_inputs``)."""
        return {**self._inputs(stage), **text_inputs(self.ctx, stage)}

    def _inputs(self, stage: str) -> Dict[str, Optional[str]]:
        data = self.ctx.data().fingerprint()
        if stage in ("vae", "encode"):
            return {"data": data, **self._latent_inputs(stage)}
        if stage == "train":
            spec = self.config.model.spec
            return {"data": data, "initial model": self._path_identity(spec) if os.path.exists(spec) else spec,
                    **self._latent_inputs(stage)}
        if stage == "sample":
            return {"model": self.produced("train"), **self._latent_inputs(stage)}
        if stage == "fit":
            return {"data": data, "model": self.produced("train"), **self._latent_inputs(stage)}
        if stage == "score":
            path = self.config.score.curvature
            curvature = self.produced("fit") if not path else (self._path_identity(path) if os.path.isfile(path)
                                                                else path)
            return {"data": data, "model": self.produced("train"), "queries": self.produced("sample"),
                    "curvature": curvature, **self._latent_inputs(stage)}
        return {"data": data, "queries": self.produced("sample"), "scores": self.produced("score")}

    def _latent_inputs(self, stage: str) -> Dict[str, Optional[str]]:
        """A latent run's further inputs: the VAE (the vae stage: which preset; encode, and sample, which decodes
        the queries: its weights, as the vae stage produced them or the --model folder's vae/ files) and the
        cached latents (train, fit, score). ``{}`` in a pixel-space run."""
        src = vae_source(self.config.model.spec)
        if src is None:
            return {}
        if stage == "vae":
            return {"initial model": self.config.model.spec}
        if stage in ("encode", "sample"):
            return {"vae": self.produced("vae") if src == "preset" else self._path_identity(src)}
        if stage in ("train", "fit", "score"):
            return {"latents": self.produced("encode")}
        return {}

    def why_not_done(self, stage: str) -> Optional[str]:
        """None when ``stage`` is done for the current settings and inputs; else why not (for the log)."""
        d = stage_dir(self.out, stage)
        rec = self.record(stage)
        if not rec or "fingerprint" not in rec:
            return "not run yet"
        if rec.get("fingerprint") != self.fp[stage]:
            return "its settings changed" if rec.get("done") else "not run yet with these settings"
        if not rec.get("done"):
            return "interrupted earlier"
        if not all(os.path.exists(os.path.join(d, o)) for o in OUTPUTS[stage]):
            return "outputs are missing"
        recorded = rec.get("outputs")
        if isinstance(recorded, dict):
            try:
                now = _signature(d, manifest_of(stage, rec))
            except OSError:
                now = None
            if now != recorded:
                return "its outputs were modified or removed after it finished"
        recorded_inputs = rec.get("inputs")
        if not isinstance(recorded_inputs, dict):
            return "run by an earlier version that did not record the identity of its inputs"
        for key, value in self.inputs(stage).items():
            if recorded_inputs.get(key) != value:
                return f"{INPUT_NAMES[key]} changed since it ran ({key} {recorded_inputs.get(key)} -> {value})"
        return None

    def is_done(self, stage: str) -> bool:
        return self.why_not_done(stage) is None

    # -- run.json ------------------------------------------------------------------------------------------------
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
            "seeds": {"data_subset": c.data.seed, "model_init": c.model.seed, "vae": c.vae.seed,
                      "train": c.train.seed,
                      "sample": c.sample.seed, "fit": c.fit.curvature.seed, "score": c.score.seed},
            "device": str(self.ctx.device),
            "versions": environment(),
            "fingerprints": self.fp,
            "stages": status,
        })

    def start(self) -> None:
        """Mark the folder as a run folder (``run.json``) if it is not one yet; an existing ``run.json`` is
        rewritten only when a stage finishes."""
        os.makedirs(self.out, exist_ok=True)
        if not os.path.isfile(os.path.join(self.out, "run.json")):
            self.write_run_json()

    # -- running -------------------------------------------------------------------------------------------------
    def _clear_checkpoints(self, d: str, why: str, stage: str) -> None:
        ck = os.path.join(d, CHECKPOINTS)
        if os.path.exists(ck):
            _remove(ck)
            self.log(f"[{stage}] cleared its checkpoints ({why})")

    def run_stage(self, stage: str, force: bool = False) -> str:
        """Run one stage (its dependencies must be done). Returns "skipped" or "done"."""
        fp = self.fp[stage]
        reason = "--force" if force else self.why_not_done(stage)
        if reason is None:
            self.log(f"[{stage}] up to date (fingerprint {fp}), skipped")
            self.write_run_json({stage: {"fingerprint": fp, "status": "skipped"}})
            return "skipped"
        for dep in self.dependencies(stage):
            why = self.why_not_done(dep)
            if why is not None:
                raise StageError(f"stage '{dep}' is not done for these settings in {self.out} ({why}); run "
                                 f"`kfac-influence {dep} --out {self.out}` (or `run`) first")
        check_stage_folder(self.out, stage)
        d = stage_dir(self.out, stage)
        os.makedirs(d, exist_ok=True)
        rec = self.record(stage) or {}
        inputs = self.inputs(stage)
        pending = hashlib.sha256(json.dumps([fp, inputs], sort_keys=True).encode()).hexdigest()[:16]
        checkpoints = os.path.join(d, CHECKPOINTS)
        if force:
            self._clear_checkpoints(d, "--force", stage)
        elif rec.get("pending") != pending:
            self._clear_checkpoints(d, "made for other settings or inputs", stage)
        elif os.path.isdir(checkpoints) and os.listdir(checkpoints):
            reason += "; resuming from the checkpoint of the interrupted run"
        for name in os.listdir(d):
            if is_own_temporary(name):
                _remove(os.path.join(d, name))
        staging = os.path.join(d, STAGING)
        _remove(staging)
        os.makedirs(staging)
        atomic_write_json(os.path.join(d, STAGE_JSON), {**rec, "pending": pending})
        self.log(f"[{stage}] running (fingerprint {fp}): {reason}")
        t0 = time.time()
        try:
            try:
                produced = stages.BODIES[stage](self.ctx, staging, checkpoints)
            except CheckpointMismatch as exc:  # inputs changed in a way the fingerprints missed: start over once
                self.log(f"[{stage}] its checkpoint was made from other inputs ({short_message(exc, 200)}); "
                         f"starting over")
                _remove(checkpoints)
                _remove(staging)
                os.makedirs(staging)
                produced = stages.BODIES[stage](self.ctx, staging, checkpoints)
        except BaseException as exc:
            _remove(staging)  # half-written new outputs; the previous ones and their stage.json stay in place
            if isinstance(exc, ValueError) and checkpoints in str(exc):  # e.g. an unreadable checkpoint
                raise StageError(f"{short_message(exc, 300)}; rerun with --force to discard the stage's "
                                 f"checkpoints") from None
            raise
        secs = round(time.time() - t0, 2)
        self._swap(stage, d, staging, rec, pending, {"fingerprint": fp, "inputs": inputs, "produced": produced,
                                            "seconds": secs})
        _remove(checkpoints)  # resumable state, no longer needed
        if stage == "train":
            self.ctx.forget_trained()
        if stage in ("vae", "encode"):
            self.ctx.forget_vae()
        self.write_run_json({stage: {"fingerprint": fp, "status": "done", "seconds": secs}})
        self.log(f"[{stage}] done in {secs:.1f} s")
        return "done"

    def _swap(self, stage: str, d: str, staging: str, old: dict, pending: str, fields: dict) -> None:
        """Move the new outputs from ``staging`` into ``d`` and remove the old ones that are not replaced; only
        entries of the old manifest are ever removed. ``stage.json`` says "not done" while files move."""
        new = sorted(os.listdir(staging))
        previous = manifest_of(stage, old) if "manifest" in old else legacy_entries(d, stage)
        atomic_write_json(os.path.join(d, STAGE_JSON), {"done": False, "manifest": sorted(set(previous) | set(new)),
                                                        "pending": pending})
        for name in new:
            target = os.path.join(d, name)
            _remove(target)  # listed in the old manifest, or absent (check_stage_folder refused foreign files)
            os.replace(os.path.join(staging, name), target)
        for name in previous:
            if name not in new:
                _remove(os.path.join(d, name))
        _remove(staging)
        atomic_write_json(os.path.join(d, STAGE_JSON), {"done": True, "manifest": new,
                                                        "outputs": _signature(d, new), **fields})

    def run_all(self, force: bool = False) -> Dict[str, str]:
        """Every stage of ``stages_to_run`` in order: ``{stage: "skipped" | "done"}``."""
        return {st: self.run_stage(st, force=force) for st in self.stages_to_run()}
