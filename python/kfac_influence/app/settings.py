"""The settings of one run: frozen, validated dataclasses, one per stage, and their JSON form.

``RunConfig`` holds everything a run depends on. Its JSON form (``to_dict`` / ``RunConfig.from_dict``) is what
``run.json`` records under ``"settings"`` and what the stage fingerprints hash: nested mappings, one per section,
with the fit's ``curvature`` section nested inside ``fit`` (``{"fit": {"curvature": {"method": ...},
"draws_per_forward": ...}}``). ``upgrade_settings`` maps the settings recorded by earlier versions (a flat ``fit``
section, damping in ``fit``, ``batch_size`` for draws per forward pass) to this form.

Vocabulary: ``draws_per_forward`` counts (t, eps) draws in one forward pass of the fit and score stages (not
examples); ``batch_size`` in ``train`` and ``sample`` counts images.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Optional

import torch

from ..curvature import CurvatureConfig
from ..curvature.damping import Damping
from ..diffusion.data import DataConfig
from ..diffusion.models import ModelError, SchedulerConfig, is_text_conditional, model_config, num_class_embeds
from ..diffusion.text import TextConfig
from ..diffusion.training import TrainConfig
from ..diffusion.vae import VAEConfig, vae_source
from ..engine import MODEL_MODES
from ..memory import parse_bytes
from ..tasks.diffusion import MEASUREMENTS

__all__ = ["ModelConfig", "SampleConfig", "FitConfig", "ScoreConfig", "ReportConfig", "RunConfig", "DRAW_SCHEMES",
           "to_dict", "upgrade_settings", "class_conditional", "model_class_embeds", "text_conditional",
           "TextConfig"]

__all__ += ["VAEConfig", "latent_run", "PRESET_SETTINGS"]

DRAW_SCHEMES = ("stratified-antithetic", "plain")


@dataclass(frozen=True)
class ModelConfig:
    """spec: preset name, ``.json`` UNet2DModel config, or a local diffusers folder; seed: initialisation seed."""

    spec: str = "digits-tiny"
    seed: int = 0


@dataclass(frozen=True)
class SampleConfig:
    """num_queries: generated images to attribute; seed: sample k uses seed + k; num_inference_steps: DDPM steps
    (None: all T); batch_size: images per sampling batch; record_trajectory: keep the ancestral trajectories (needed
    by the ``sampling_trajectory_logprob`` measurement, which turns it on). Class-conditional runs: query k is
    generated for class ``k % K`` (K classes in the data); guidance_scale: classifier-free guidance in diffusers'
    convention, ``s eps(x, t, c) + (1 - s) eps(x, t, null)``: 1 is plain conditional sampling, s > 1 guides
    (unconditional runs refuse s != 1). A query is measured under its own class whatever s was
    (docs/conditional.md)."""

    num_queries: int = 16
    seed: int = 10_000
    num_inference_steps: Optional[int] = None
    batch_size: int = 64
    record_trajectory: bool = False
    guidance_scale: float = 1.0

    def __post_init__(self):
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g < float("inf"):
            raise ValueError(f"guidance scale must be a finite number >= 0 (1: no guidance), got {g!r}")
        if self.num_queries < 1 or self.batch_size < 1:
            raise ValueError("num_queries and the sampling batch size must be >= 1")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"sampling steps must be >= 1 (or none: all T), got {self.num_inference_steps}")


@dataclass(frozen=True)
class FitConfig:
    """The curvature fit: ``curvature`` (``kfac_influence.CurvatureConfig``: method, approx, fisher, num_draws,
    dtype, layer patterns, seed) and the stage's own ``draws_per_forward`` ((t, eps) draws per forward pass).
    Damping is not here: it is chosen when scoring (``ScoreConfig``), so one fit serves a damping sweep."""

    curvature: CurvatureConfig = CurvatureConfig(num_draws=250)
    draws_per_forward: int = 32

    def __post_init__(self):
        if not isinstance(self.curvature, CurvatureConfig):
            raise TypeError(f"FitConfig.curvature must be a CurvatureConfig, got {type(self.curvature).__name__}")
        if self.draws_per_forward < 1:
            raise ValueError(f"the fit's draws per forward pass must be >= 1, got {self.draws_per_forward}")


@dataclass(frozen=True)
class ScoreConfig:
    """measurement: what is attributed for each query (``loss`` recommended); num_train_draws / num_query_draws:
    M draws per training example / query; draws: "stratified-antithetic" (stratified timesteps + antithetic noise,
    the default; its effect on the digits benchmark is in bench/RESULTS.md) or "plain" (i.i.d., the paper's);
    damping / damping_mode: lambda (absolute) or rho with lambda = rho * mean(Lambda) per layer (relative);
    draws_per_forward: (t, eps) draws per forward pass; curvature: use this saved curvature file instead of the
    fit stage."""

    measurement: str = "loss"
    num_train_draws: int = 250
    num_query_draws: int = 250
    draws: str = "stratified-antithetic"
    damping: float = 1e-8
    damping_mode: str = "absolute"
    draws_per_forward: int = 32
    seed: int = 0
    curvature: Optional[str] = None

    def __post_init__(self):
        if self.measurement not in MEASUREMENTS:
            raise ValueError(f"measurement must be one of {', '.join(MEASUREMENTS)}, got {self.measurement!r}")
        if self.draws not in DRAW_SCHEMES:
            raise ValueError(f"draws must be one of {', '.join(DRAW_SCHEMES)}, got {self.draws!r}")
        if self.num_train_draws < 1 or self.num_query_draws < 1 or self.draws_per_forward < 1:
            raise ValueError("numbers of draws and the scoring draws per forward pass must be >= 1")
        object.__setattr__(self, "damping", self.as_damping().value)  # validated, a float

    def as_damping(self) -> Damping:
        return Damping(self.damping, self.damping_mode)


@dataclass(frozen=True)
class ReportConfig:
    """top_k: training images shown per query and sign; max_query_figures: per-query PNGs written (the first ones);
    summary_rows: queries in the summary grid."""

    top_k: int = 6
    max_query_figures: int = 64
    summary_rows: int = 16

    def __post_init__(self):
        if self.top_k < 1 or self.max_query_figures < 0 or self.summary_rows < 1:
            raise ValueError("top_k and summary_rows must be >= 1, max_query_figures >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. ``model_mode`` ("eval": dropout off, or "train": dropout on, seeded) is shared
    by the curvature fit, train gradients and query gradients, so all three see the same network; ``max_memory``
    (e.g. "6GiB") plans the fit (draws per forward pass, layer partitions: ``memory.plan_fit``) and the scores
    (query block, draws per forward pass: ``memory.plan_scores``) instead of their settings;
    ``checkpoint_seconds``: the fit and score stages save their resumable state this often (and on Ctrl-C); it
    changes no result, so no fingerprint has it. ``vae``: the fixed VAE of a latent run (training a VAE preset,
    encoding; ``latent_run``), ignored by other runs."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    fit: FitConfig = FitConfig()
    score: ScoreConfig = ScoreConfig()
    report: ReportConfig = ReportConfig()
    vae: VAEConfig = VAEConfig()
    text: TextConfig = TextConfig()
    model_mode: str = "eval"
    device: str = "auto"
    max_memory: Optional[str] = None
    checkpoint_seconds: float = 60.0

    def __post_init__(self):
        if not (isinstance(self.checkpoint_seconds, (int, float)) and self.checkpoint_seconds > 0):
            raise ValueError(f"checkpoint seconds must be > 0, got {self.checkpoint_seconds!r}")
        if self.max_memory is not None:
            parse_bytes(self.max_memory)  # raises ValueError on a malformed size
        if self.model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {self.model_mode!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"unknown device {self.device!r}") from None

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The inverse of ``to_dict``; missing keys keep their defaults, unknown keys are an error."""
        return _from_dict(cls(), d, "run")

    def merged(self, overrides: dict) -> "RunConfig":
        """A copy with nested ``{section: {field: value}}`` overrides (``{field: value}`` for top-level fields)."""
        d = self.to_dict()
        _deep_update(d, overrides)
        return RunConfig.from_dict(d)

    def resolved_device(self) -> torch.device:
        """The device to run on; ValueError (one line) for a CUDA device this torch cannot use."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: this torch has no usable CUDA device "
                                 f"(torch.cuda.is_available() is False); use --device cpu or auto")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {self.device}: only {torch.cuda.device_count()} CUDA device(s) here")
        elif device.type != "cpu":
            raise ValueError(f"--device {self.device}: only cpu and cuda devices are supported")
        return device


def model_class_embeds(config: RunConfig) -> Optional[int]:
    """``num_class_embeds`` of the run's ``--model`` (preset, JSON config or folder; read without building it),
    None for a model without class embeddings or a spec that cannot be read (its stage reports that)."""
    try:
        return num_class_embeds(model_config(config.model.spec))
    except ModelError:
        return None


def class_conditional(config: RunConfig) -> bool:
    """Whether the run is class-conditional: ``data.labels`` when set, else ("auto") whether the model has class
    embeddings. A class-conditional run trains with labels and condition dropout, generates its queries per class
    and attributes them under their class (``Pipeline.preflight`` checks that data and model agree)."""
    if config.data.labels is not None:
        return bool(config.data.labels)
    return model_class_embeds(config) is not None


def text_conditional(config: RunConfig) -> bool:
    """Whether the run is text-conditional: ``text.captions`` when set, else ("auto") whether the ``--model`` is a
    ``UNet2DConditionModel`` (it takes token embeddings). A text-conditional run trains on each image's caption
    (``metadata.jsonl``), generates its queries for prompts and attributes them under their prompt
    (``kfac_influence.diffusion.text``; ``Pipeline.preflight`` checks that data, embeddings and model agree)."""
    if config.text.captions is not None:
        return bool(config.text.captions)
    try:
        return is_text_conditional(model_config(config.model.spec))
    except ModelError:
        return False


def latent_run(config: RunConfig) -> bool:
    """Whether the run is a latent diffusion run: its ``--model`` has a fixed VAE (``diffusion.vae.vae_source``:
    a VAE preset such as ``latent-tiny``, trained by the ``vae`` stage, or a diffusers pipeline folder with
    ``vae/``). Its training images are encoded once (the ``encode`` stage) and the UNet is trained, fitted and
    scored on their latents; its queries are generated latents, decoded for the report (docs/latent.md)."""
    return vae_source(config.model.spec) is not None


#: Defaults a model preset brings for the settings a command does not give (nor ``run.json`` records): CPU-sized
#: runs, like ``demo``'s. ``latent-tiny``: the digits upscaled to 32x32 for its VAE, no clipping of the predicted
#: latents (their range is not [-1, 1]), and training, fit and score sizes that keep the whole run to minutes on a
#: CPU (half the demo's fit and training-example draws; docs/latent.md).
PRESET_SETTINGS = {
    "latent-tiny": {
        "data": {"image_size": 32},
        "scheduler": {"clip_sample": False},
        "train": {"steps": 800, "batch_size": 128, "lr": 3e-3, "warmup_steps": 100, "ema_decay": 0.995,
                  "checkpoint_every": 500},
        "fit": {"curvature": {"num_draws": 2}, "draws_per_forward": 256},
        "score": {"num_train_draws": 4, "num_query_draws": 64, "draws_per_forward": 256},
    },
}


def to_dict(config) -> dict:
    """JSON form of a settings dataclass: nested dataclasses become mappings (through their own ``to_dict`` where
    they have one, e.g. ``CurvatureConfig``'s dtype as a string)."""
    out = {}
    for f in fields(config):
        v = getattr(config, f.name)
        if hasattr(v, "to_dict"):
            out[f.name] = v.to_dict()
        elif is_dataclass(v):
            out[f.name] = to_dict(v)
        else:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _from_dict(default, d: Any, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where} settings must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(default)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {where} setting(s): {', '.join(sorted(unknown))}")
    kw = {}
    for name, v in d.items():
        current = getattr(default, name)
        kw[name] = _from_dict(current, v, f"{where}.{name}" if where != "run" else name) \
            if is_dataclass(current) else v
    return replace(default, **kw)


def _deep_update(d: dict, overrides: dict) -> None:
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v


_FLAT_FIT_KEYS = ("method", "approx", "fisher", "num_draws", "dtype", "modules", "exclude", "seed")


def upgrade_settings(recorded: dict) -> dict:
    """Settings recorded by an earlier version, in this version's form (a copy; current settings pass unchanged).

    Before damping moved to scoring, ``fit`` held CurvatureConfig's fields flat next to ``damping``,
    ``damping_mode`` and ``batch_size``, and ``score`` had ``batch_size``: the curvature fields move into
    ``fit.curvature``, damping into ``score`` (unless ``score`` names its own), ``batch_size`` becomes
    ``draws_per_forward``, and 0 for "unset" (limit, image size, channels, sampling steps) becomes None."""
    d = copy.deepcopy(recorded)
    fit, score = d.get("fit"), d.get("score")
    if isinstance(fit, dict):
        curvature = fit.setdefault("curvature", {})
        for key in _FLAT_FIT_KEYS:
            if key in fit and isinstance(curvature, dict):
                curvature.setdefault(key, fit.pop(key))
        if "damping" in fit or "damping_mode" in fit:
            if score is None:
                score = d["score"] = {}
            for key in ("damping", "damping_mode"):
                if key in fit and isinstance(score, dict):
                    score.setdefault(key, fit.pop(key))
        if "batch_size" in fit:
            fit.setdefault("draws_per_forward", fit.pop("batch_size"))
    if isinstance(score, dict) and "batch_size" in score:
        score.setdefault("draws_per_forward", score.pop("batch_size"))
    # 0 meant "unset" for these before it was refused
    for section, key in (("data", "limit"), ("data", "image_size"), ("data", "channels"),
                         ("sample", "num_inference_steps")):
        if isinstance(d.get(section), dict) and d[section].get(key) == 0:
            d[section][key] = None
    return d
