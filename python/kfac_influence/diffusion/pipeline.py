"""The attribution pipeline as resumable stages: train -> sample -> fit -> score -> report.

One output folder per run::

    OUT/run.json                  every setting, versions, seeds, stage status and timings
    OUT/train/pipeline/           the EMA model (DDPMPipeline folder: model_index.json, unet/, scheduler/)
    OUT/train/checkpoints/        the resumable training checkpoint (removed once the stage is done)
    OUT/samples/samples.safetensors   generated queries (images, seeds, timesteps[, trajectory]); samples.png
    OUT/fit/curvature.safetensors     (E)K-FAC factors
    OUT/scores/scores.safetensors     scores (Q, N), train_ids (N,), query_ids (Q,)
    OUT/report/report.md, summary.png, query_XXX.png, report.json

Each stage has a fingerprint: a hash of its own settings and of its inputs' fingerprints. A stage whose
``stage.json`` records the same fingerprint and whose outputs exist is skipped; a stage with a different fingerprint
is cleared and rerun; a stage interrupted with the same fingerprint resumes from its checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Dict, Optional

import torch

from ..report.files import atomic_save_tensors, atomic_write_json, load_tensors
from .data import DataConfig, ImageDataset, load_dataset
from .models import ModelError, SchedulerConfig, build_model, load_model, make_scheduler, save_pipeline
from .training import TrainConfig

__all__ = ["ModelSettings", "SampleSettings", "FitSettings", "ScoreSettings", "ReportSettings", "RunSettings",
           "STAGES", "Pipeline", "StageError"]

STAGES = ("train", "sample", "fit", "score", "report")
MODEL_MODES = ("eval", "train")


class StageError(ValueError):
    """A stage cannot run (missing inputs, incompatible model and data); the message says what to do."""


@dataclass(frozen=True)
class ModelSettings:
    """spec: preset name, ``.json`` UNet2DModel config, or a local diffusers folder; seed: initialisation seed."""

    spec: str = "digits-tiny"
    seed: int = 0


@dataclass(frozen=True)
class SampleSettings:
    """num_queries: generated images to attribute; seed: sample k uses seed + k; num_inference_steps: DDPM steps
    (None: all T); batch_size: images per sampling batch; record_trajectory: keep the ancestral trajectories (needed
    by the ``sampling_trajectory_logprob`` measurement, which turns it on)."""

    num_queries: int = 16
    seed: int = 10_000
    num_inference_steps: Optional[int] = None
    batch_size: int = 64
    record_trajectory: bool = False

    def __post_init__(self):
        if self.num_queries < 1 or self.batch_size < 1:
            raise ValueError("num_queries and the sampling batch size must be >= 1")


@dataclass(frozen=True)
class FitSettings:
    """Curvature fit (see ``kfac_influence.CurvatureConfig``); num_draws: (t, eps) draws per training example."""

    method: str = "ekfac"
    approx: str = "expand"
    fisher: str = "mc"
    num_draws: int = 250
    damping: float = 1e-8
    damping_mode: str = "absolute"
    batch_size: int = 32
    seed: int = 0

    def curvature_config(self):
        from .. import CurvatureConfig

        return CurvatureConfig(method=self.method, approx=self.approx, fisher=self.fisher, num_draws=self.num_draws,
                               damping=self.damping, damping_mode=self.damping_mode, seed=self.seed)


@dataclass(frozen=True)
class ScoreSettings:
    """measurement: what is attributed for each query (``loss`` recommended); num_train_draws / num_query_draws:
    M draws per training example / query; draws: "stratified-antithetic" (stratified timesteps + antithetic noise,
    the default: +14.5 LDS points over i.i.d. draws on the digits benchmark) or "plain" (i.i.d., the paper's);
    curvature: use this saved curvature file instead of the fit stage."""

    measurement: str = "loss"
    num_train_draws: int = 250
    num_query_draws: int = 250
    draws: str = "stratified-antithetic"
    batch_size: int = 32
    seed: int = 0
    curvature: Optional[str] = None

    def __post_init__(self):
        from ..tasks.diffusion import MEASUREMENTS

        if self.measurement not in MEASUREMENTS:
            raise ValueError(f"measurement must be one of {', '.join(MEASUREMENTS)}, got {self.measurement!r}")
        if self.draws not in ("stratified-antithetic", "plain"):
            raise ValueError(f"draws must be 'stratified-antithetic' or 'plain', got {self.draws!r}")
        if self.num_train_draws < 1 or self.num_query_draws < 1 or self.batch_size < 1:
            raise ValueError("numbers of draws and the scoring batch size must be >= 1")


@dataclass(frozen=True)
class ReportSettings:
    """top_k: training images shown per query and sign; max_query_figures: per-query PNGs written (the first ones);
    summary_rows: queries in the summary grid."""

    top_k: int = 6
    max_query_figures: int = 64
    summary_rows: int = 16

    def __post_init__(self):
        if self.top_k < 1 or self.max_query_figures < 0 or self.summary_rows < 1:
            raise ValueError("top_k and summary_rows must be >= 1, max_query_figures >= 0")


@dataclass(frozen=True)
class RunSettings:
    """Everything a run depends on. ``model_mode`` ("eval": dropout off, or "train": dropout on, seeded) is shared
    by the curvature fit, train gradients and query gradients, so all three see the same network."""

    data: DataConfig = DataConfig()
    model: ModelSettings = ModelSettings()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleSettings = SampleSettings()
    fit: FitSettings = FitSettings()
    score: ScoreSettings = ScoreSettings()
    report: ReportSettings = ReportSettings()
    model_mode: str = "eval"
    device: str = "auto"
    max_memory: Optional[str] = None

    def __post_init__(self):
        if self.max_memory is not None:
            from ..memory import parse_bytes

            parse_bytes(self.max_memory)  # raises ValueError on a malformed size
        if self.model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {self.model_mode!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"unknown device {self.device!r}") from None

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if hasattr(v, "to_dict") else (asdict(v) if hasattr(v, "__dataclass_fields__")
                                                                    else v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        kw = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            sub = f.default if not callable(getattr(f, "default_factory", None)) else f.default_factory()
            if hasattr(sub, "__dataclass_fields__"):
                known = {x.name for x in fields(type(sub))}
                unknown = set(v) - known
                if unknown:
                    raise ValueError(f"unknown {f.name} setting(s): {', '.join(sorted(unknown))}")
                kw[f.name] = replace(sub, **v)
            else:
                kw[f.name] = v
        return cls(**kw)

    def merged(self, overrides: dict) -> "RunSettings":
        """A copy with ``{section: {field: value}}`` (or ``{field: value}`` for top-level fields) applied."""
        d = self.to_dict()
        for k, v in overrides.items():
            if isinstance(v, dict):
                d.setdefault(k, {}).update(v)
            else:
                d[k] = v
        return RunSettings.from_dict(d)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_signature(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprints(s: RunSettings) -> Dict[str, str]:
    """Fingerprint per stage: its settings plus the fingerprints of the stages it reads."""
    d = s.to_dict()
    fp = {"train": _hash({"data": d["data"], "model": d["model"], "scheduler": d["scheduler"], "train": d["train"]})}
    fp["sample"] = _hash({"train": fp["train"], "sample": d["sample"], "traj": needs_trajectory(s)})
    fp["fit"] = _hash({"train": fp["train"], "fit": d["fit"], "model_mode": s.model_mode,
                       "draws": d["score"]["draws"]})
    curv = fp["fit"]
    if s.score.curvature:
        curv = _file_signature(s.score.curvature) if os.path.isfile(s.score.curvature) else s.score.curvature
    fp["score"] = _hash({"curvature": curv, "sample": fp["sample"], "score": d["score"], "model_mode": s.model_mode})
    fp["report"] = _hash({"score": fp["score"], "report": d["report"]})
    return fp


def needs_trajectory(s: RunSettings) -> bool:
    return s.sample.record_trajectory or s.score.measurement == "sampling_trajectory_logprob"


def environment() -> dict:
    """Versions of everything that can change a result."""
    from importlib import metadata

    def ver(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "kfac-kernels": ver("kfac-kernels"), "torch": torch.__version__, "diffusers": ver("diffusers"),
        "numpy": ver("numpy"), "scikit-learn": ver("scikit-learn"), "safetensors": ver("safetensors"),
        "matplotlib": ver("matplotlib"), "pillow": ver("pillow"), "triton": ver("triton"),
        "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class Pipeline:
    """Runs the stages of one output folder. ``log`` receives one-line progress messages (stderr by default)."""

    OUTPUTS = {
        "train": ("pipeline/model_index.json", "pipeline/unet/config.json"),
        "sample": ("samples.safetensors", "samples.png"),
        "fit": ("curvature.safetensors",),
        "score": ("scores.safetensors",),
        "report": ("report.md", "summary.png", "report.json"),
    }

    def __init__(self, out: str, settings: RunSettings, progress: bool = True,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True), command: str = "run"):
        self.out = out
        self.s = settings
        self.progress = progress
        self.log = log
        self.command = command
        self.fp = fingerprints(settings)
        self.device = settings.resolved_device()
        self._data: Optional[ImageDataset] = None
        self._model = None
        self._scheduler = None

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def _stage_file(self, stage: str) -> str:
        return self.path(stage if stage != "sample" else "samples", "stage.json")

    def stage_dir(self, stage: str) -> str:
        return self.path({"sample": "samples", "score": "scores"}.get(stage, stage))

    def _read_json(self, path: str) -> Optional[dict]:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def is_done(self, stage: str) -> bool:
        d = self.stage_dir(stage)
        st = self._read_json(os.path.join(d, "stage.json"))
        return bool(st and st.get("done") and st.get("fingerprint") == self.fp[stage]
                    and all(os.path.exists(os.path.join(d, o)) for o in self.OUTPUTS[stage]))

    def write_run_json(self, stage_status: Optional[Dict[str, dict]] = None) -> None:
        path = self.path("run.json")
        old = self._read_json(path) or {}
        stages = old.get("stages", {})
        stages.update(stage_status or {})
        s = self.s
        atomic_write_json(path, {
            "format": 1,
            "command": self.command,
            "argv": sys.argv,
            "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": s.to_dict(),
            "seeds": {"data_subset": s.data.seed, "model_init": s.model.seed, "train": s.train.seed,
                      "sample": s.sample.seed, "fit": s.fit.seed, "score": s.score.seed},
            "device": str(self.device),
            "versions": environment(),
            "fingerprints": self.fp,
            "stages": stages,
        })

    def run_stage(self, stage: str, force: bool = False) -> str:
        """Run one stage (its inputs must be done). Returns "skipped" or "done"."""
        if not force and self.is_done(stage):
            self.log(f"[{stage}] up to date (fingerprint {self.fp[stage]}), skipped")
            self.write_run_json({stage: {"fingerprint": self.fp[stage], "status": "skipped"}})
            return "skipped"
        for dep in self.dependencies(stage):
            if not self.is_done(dep):
                raise StageError(f"stage '{dep}' is not done for these settings in {self.out}; run "
                                 f"`kfac-influence {dep} --out {self.out}` (or `run`) first")
        d = self.stage_dir(stage)
        st = self._read_json(os.path.join(d, "stage.json"))
        if os.path.isdir(d) and (st is None or st.get("fingerprint") != self.fp[stage]):
            shutil.rmtree(d)  # outputs of other settings (or of unknown origin): start over
        os.makedirs(d, exist_ok=True)
        atomic_write_json(os.path.join(d, "stage.json"), {"fingerprint": self.fp[stage], "done": False})
        self.log(f"[{stage}] running (fingerprint {self.fp[stage]})")
        t0 = time.time()
        getattr(self, f"_run_{stage}")(d)
        secs = round(time.time() - t0, 2)
        atomic_write_json(os.path.join(d, "stage.json"), {"fingerprint": self.fp[stage], "done": True,
                                                          "seconds": secs})
        self.write_run_json({stage: {"fingerprint": self.fp[stage], "status": "done", "seconds": secs}})
        self.log(f"[{stage}] done in {secs:.1f} s")
        return "done"

    def dependencies(self, stage: str):
        deps = {"train": (), "sample": ("train",), "fit": ("train",), "score": ("sample", "fit"),
                "report": ("score",)}[stage]
        if stage == "score" and self.s.score.curvature:
            deps = ("sample",)
        return deps

    def stages_to_run(self):
        return tuple(st for st in STAGES if not (st == "fit" and self.s.score.curvature))

    def run_all(self) -> Dict[str, str]:
        self.write_run_json()
        return {st: self.run_stage(st) for st in self.stages_to_run()}

    # -- shared inputs -------------------------------------------------------------------------------------------
    def data(self) -> ImageDataset:
        if self._data is None:
            self._data = load_dataset(self.s.data)
        return self._data

    def _initial_model(self):
        data = self.data()
        c, h, w = data.shape
        spec = self.s.model.spec
        if os.path.isdir(spec):
            model, sched = load_model(spec)
            if model.config.in_channels != c:
                raise ModelError(f"{spec}: the model takes {model.config.in_channels} channel(s) but the data "
                                 f"has {c}")
            return model, sched or make_scheduler(self.s.scheduler)
        model = build_model(spec, seed=self.s.model.seed, in_channels=c, sample_size=h)
        return model, make_scheduler(self.s.scheduler)

    def trained(self):
        """The EMA model (eval mode, on the run's device) and the scheduler written by the train stage."""
        if self._model is None:
            model, sched = load_model(self.path("train", "pipeline"))
            self._model = model.to(self.device).eval()
            self._scheduler = sched
        return self._model, self._scheduler

    # -- stages --------------------------------------------------------------------------------------------------
    def _run_train(self, d: str) -> None:
        from .training import train

        data = self.data()
        model, sched = self._initial_model()
        model.to(self.device)
        result = train(model, sched, data.images, self.s.train, checkpoint_dir=os.path.join(d, "checkpoints"),
                       progress=self.progress, device=self.device)
        save_pipeline(result.model.cpu(), sched, os.path.join(d, "pipeline"))
        shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)  # optimiser state, no longer needed
        atomic_write_json(os.path.join(d, "losses.json"), {"resumed_from": result.resumed_from,
                                                           "losses": result.losses})
        if result.losses:
            tail = result.losses[-min(100, len(result.losses)):]
            self.log(f"[train] mean loss of the last {len(tail)} steps: {sum(tail) / len(tail):.4f}")
        self._model = None

    def _run_sample(self, d: str) -> None:
        from ..report.figures import samples_figure
        from .sampling import ddpm_sample

        model, sched = self.trained()
        s = self.s.sample
        res = ddpm_sample(model, sched, s.num_queries, self.data().shape, seed=s.seed, batch_size=s.batch_size,
                          num_inference_steps=s.num_inference_steps, record_trajectory=needs_trajectory(self.s),
                          progress=self.progress, device=self.device)
        tensors = {"images": res.images, "seeds": res.seeds, "timesteps": res.timesteps}
        if res.trajectory is not None:
            tensors["trajectory"] = res.trajectory
        atomic_save_tensors(os.path.join(d, "samples.safetensors"), tensors, {"settings": asdict(s)})
        samples_figure(os.path.join(d, "samples.png"), res.images, [f"q{i} s{int(x)}" for i, x in
                                                                     enumerate(res.seeds)])

    def samples(self) -> dict:
        tensors, _ = load_tensors(self.path("samples", "samples.safetensors"))
        return tensors

    def _task(self):
        from ..tasks import DiffusionTask

        model, sched = self.trained()
        sc = self.s.score
        extra = {}
        if sc.measurement == "sampling_trajectory_logprob" and self.is_done("sample"):
            extra["trajectory_timesteps"] = self.samples()["timesteps"].tolist()
        vr = sc.draws == "stratified-antithetic"
        return DiffusionTask(sched, num_train_draws=sc.num_train_draws, num_query_draws=sc.num_query_draws,
                             measurement=sc.measurement, seed=sc.seed, stratified=vr, antithetic=vr, **extra)

    def _run_fit(self, d: str) -> None:
        from .. import fit_curvature

        model, _ = self.trained()
        f = self.s.fit
        task = self._task()
        batch_size = self._batch_size(model, task, "fit", f.batch_size)
        curv = fit_curvature(model, task, self.data().images, f.curvature_config(), batch_size=batch_size,
                             checkpoint_dir=os.path.join(d, "checkpoints"), progress=self.progress,
                             model_mode=self.s.model_mode)
        curv.save(os.path.join(d, "curvature.safetensors"))
        shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)  # resumable state, no longer needed

    def _batch_size(self, model, task, stage: str, default: int, **sizes) -> int:
        """Draws per forward: ``default``, or the largest that fits ``--max-memory`` (kfac_influence.memory)."""
        if self.s.max_memory is None:
            return default
        from ..memory import choose_batch_size

        try:
            return choose_batch_size(model, task, self.data().images[:2], self.s.max_memory, stage=stage,
                                     config=self.s.fit.curvature_config(), **sizes)
        except MemoryError as exc:
            raise StageError(f"--max-memory {self.s.max_memory}: {exc}") from None

    def curvature_path(self) -> str:
        return self.s.score.curvature or self.path("fit", "curvature.safetensors")

    def _run_score(self, d: str) -> None:
        from .. import load_curvature, pairwise_scores

        model, _ = self.trained()
        path = self.curvature_path()
        if not os.path.isfile(path):
            raise StageError(f"{path}: no such curvature file")
        try:
            curv = load_curvature(path, model)
        except ValueError as exc:
            raise StageError(f"{path}: cannot be used with this model: {str(exc).splitlines()[0]}") from None
        except Exception as exc:
            raise StageError(f"{path}: not a readable curvature file ({type(exc).__name__})") from None
        samples = self.samples()
        queries = samples["trajectory"] if self.s.score.measurement == "sampling_trajectory_logprob" \
            else samples["images"]
        data = self.data()
        sc = self.s.score
        task = self._task()
        batch_size = self._batch_size(model, task, "scores", sc.batch_size, num_queries=len(queries),
                                      num_examples=len(data.images))
        scores = pairwise_scores(model, task, curv, queries.to(self.device), data.images,
                                 batch_size=batch_size, progress=self.progress, model_mode=self.s.model_mode,
                                 checkpoint_dir=os.path.join(d, "checkpoints"))
        scores = scores.float().cpu()
        if not torch.isfinite(scores).all():
            raise StageError("scores contain NaN or infinite values (try a larger --damping)")
        atomic_save_tensors(os.path.join(d, "scores.safetensors"),
                            {"scores": scores, "train_ids": data.ids, "query_ids": samples["seeds"]},
                            {"measurement": sc.measurement, "settings": asdict(sc), "curvature": path,
                             "convention": "S[q, n] > 0: removing training example n is predicted to raise the "
                                           "query's measurement (for loss: make the query less likely)"})
        shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)

    def scores(self) -> dict:
        tensors, meta = load_tensors(self.path("scores", "scores.safetensors"))
        tensors["meta"] = meta
        return tensors

    def _run_report(self, d: str) -> None:
        from ..report.writer import write_report

        summary = write_report(d, self.scores(), self.samples(), self.data(), self.s, self.out)
        self.report_summary = summary
