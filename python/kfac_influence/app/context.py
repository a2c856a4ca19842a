"""What the stages of one command share: the run folder, its settings and device, progress and log output, and
the inputs loaded once: the training data, the models, the samples, the scores, the curvature, the diffusion task
and the draws per forward pass (from the settings, or from ``--max-memory``)."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Optional, Tuple

from ..curvature import Curvature, load_curvature
from ..diffusion.data import ImageDataset, load_dataset
from ..diffusion.models import ModelError, build_model, check_image_size, load_model, make_scheduler
from ..diffusion.vae import latent_shape, load_vae, vae_config, vae_source
from ..latents import load_latents
from ..diffusion.text import TextConditions, with_captions
from ..memory import plan_scores
from ..storage import load_tensors
from ..tasks import DiffusionTask
from .layout import StageError
from .settings import RunConfig, class_conditional, model_class_embeds, text_conditional
from .textrun import check_text, load_text

__all__ = ["RunContext"]


class RunContext:
    """The run in folder ``out`` with settings ``config`` on ``config``'s device; ``progress``: show progress bars;
    ``log``: receives one-line messages. Inputs are loaded on first use and kept."""

    def __init__(self, out: str, config: RunConfig, progress: bool, log: Callable[[str], None]):
        self.out = out
        self.config = config
        self.progress = progress
        self.log = log
        self.device = config.resolved_device()
        self._data: Optional[ImageDataset] = None
        self._trained = None
        self._vae = None
        self._latents = None
        self._text: Optional[TextConditions] = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    @property
    def conditional(self) -> bool:
        """Whether the run is class-conditional (``settings.class_conditional``)."""
        return class_conditional(self.config)

    @property
    def text_conditional(self) -> bool:
        """Whether the run is text-conditional (``settings.text_conditional``)."""
        return text_conditional(self.config)

    def data(self) -> ImageDataset:
        """The training data; with labels (required) in a class-conditional run, with captions (required: the
        folder's ``metadata.jsonl``) in a text-conditional one."""
        if self._data is None:
            data = load_dataset(replace(self.config.data, labels=self.conditional or None))
            self._data = with_captions(data) if self.text_conditional else data
        return self._data

    def text(self) -> TextConditions:
        """The token embeddings of a text-conditional run (``textrun.load_text``), loaded once."""
        if self._text is None:
            self._text = load_text(self)
        return self._text

    def num_classes(self) -> int:
        """K, the classes of the training data (its class names, else the largest label + 1)."""
        data = self.data()
        return len(data.class_names) if data.class_names else int(data.labels.max()) + 1

    def null_label(self) -> int:
        """The null condition's label: the model's last class embedding (``num_class_embeds - 1``)."""
        return model_class_embeds(self.config) - 1

    def check_condition(self) -> None:
        """Raise a one-line StageError unless data, model and settings agree: a class-conditional run needs a
        model with ``num_class_embeds`` >= K + 1 (K data classes, the last embedding the null class) and labelled
        data; an unconditional one a model without class embeddings and guidance scale 1."""
        if check_text(self):  # text: captions, embeddings and a UNet2DConditionModel
            return
        embeds = model_class_embeds(self.config)
        spec = self.config.model.spec
        if not self.conditional:
            if embeds is not None:
                raise StageError(f"--model {spec} is class-conditional (num_class_embeds={embeds}) but --labels is "
                                 f"off; use --labels true (or auto)")
            if self.config.sample.guidance_scale != 1.0:
                raise StageError("--guidance-scale needs a class-conditional run (--labels and a model with class "
                                 "embeddings, e.g. --model digits-cond) or a text-conditional one (--captions)")
            return
        if embeds is None:
            raise StageError(f"--labels needs a class-conditional model (num_class_embeds = classes + 1, the last "
                             f"one the null class), e.g. --model digits-cond; --model {spec} has no class embedding")
        k = self.num_classes()
        if k + 1 > embeds:
            raise StageError(f"the data has {k} classes but --model {spec} has num_class_embeds={embeds}; it needs "
                             f"at least {k + 1} (one more for the null class {embeds - 1})")

    @property
    def latent(self) -> bool:
        """Whether the run is a latent diffusion run (``settings.latent_run``: the --model has a fixed VAE)."""
        return vae_source(self.config.model.spec) is not None

    def input_shape(self) -> tuple:
        """``(C, H, W)`` of what the UNet takes: one training image, or in a latent run its latent (from the VAE's
        config, without loading it; a preset VAE takes the data's channels). ModelError (one line) when the VAE
        cannot take the images."""
        shape = self.data().shape
        if not self.latent:
            return shape
        spec = self.config.model.spec
        cfg = vae_config(spec)
        if vae_source(spec) == "preset":
            cfg["in_channels"] = shape[0]
        return latent_shape(cfg, shape, f"the VAE of --model {os.path.basename(spec.rstrip('/')) or spec}")

    def vae(self):
        """The fixed VAE of a latent run (eval mode, no gradients, on the run's device): the one the ``vae`` stage
        trained (``OUT/vae/vae``) for a preset, else the --model folder's ``vae/``."""
        if self._vae is None:
            src = vae_source(self.config.model.spec)
            if src is None:
                raise StageError(f"--model {self.config.model.spec} has no VAE (not a latent run)")
            vae = load_vae(self.path("vae", "vae") if src == "preset" else src)
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    def forget_vae(self) -> None:
        """Drop the cached VAE and latents (after the vae or encode stage rewrote them)."""
        self._vae = self._latents = None

    def latents(self):
        """The training images' latents ``(N, c, h, w)`` written by the ``encode`` stage (``latents.load_latents``;
        a StageError when the file is incomplete or of other data)."""
        if self._latents is None:
            path = self.path("latents", "latents.safetensors")
            try:
                z, header = load_latents(path)
            except (OSError, ValueError) as exc:
                raise StageError(f"{path}: {str(exc).splitlines()[0]}; rerun the encode stage with --force") \
                    from None
            n = len(self.data())
            if header.get("done") != n or z.shape[0] != n or tuple(z.shape[1:]) != self.input_shape():
                raise StageError(f"{path}: holds {z.shape[0]} latents {tuple(z.shape[1:])} of {header.get('done')} "
                                 f"encoded, not the {n} x {self.input_shape()} of this run's data; rerun the encode "
                                 f"stage with --force")
            self._latents = z
        return self._latents

    def examples(self):
        """The training examples the UNet sees, ``(N, C, H, W)``: the images, or in a latent run their latents."""
        return self.latents() if self.latent else self.data().images

    def train_data(self):
        """What the tasks take as training data: the images, ``(images, labels)`` in a class-conditional run, or
        ``(images, embeddings (N, L, E)[, mask (N, L)])`` in a text-conditional one."""
        data = self.data()
        images = self.examples()  # a latent run's: the latents
        if self.text_conditional:
            return self.text().train().as_data(images)
        return (images, data.labels) if self.conditional else images

    def initial_model(self):
        """The model to train (a preset, a JSON config or a diffusers folder) and its scheduler, on the CPU."""
        c, h, w = self.input_shape()  # a latent run's: its latents'
        spec = self.config.model.spec
        if os.path.isdir(spec):
            model, scheduler = load_model(spec)  # refuses non-finite weights, naming the tensor
            if model.config.in_channels != c:
                raise ModelError(f"{spec}: the model takes {model.config.in_channels} channel(s) but the "
                                 f"{'latents have' if self.latent else 'data has'} {c}")
            check_image_size(dict(model.config), h, w, spec)
            return model, scheduler or make_scheduler(self.config.scheduler)
        width = self.text().width if self.text_conditional else None  # a text preset follows the embeddings
        model = build_model(spec, seed=self.config.model.seed, in_channels=c, sample_size=h,
                            cross_attention_dim=width)
        return model, make_scheduler(self.config.scheduler)

    def trained(self):
        """The EMA model (eval mode, on the run's device) and the scheduler written by the train stage (weights
        checked finite on load)."""
        if self._trained is None:
            model, scheduler = load_model(self.path("train", "pipeline"))
            self._trained = (model.to(self.device).eval(), scheduler)
        return self._trained

    def forget_trained(self) -> None:
        """Drop the cached trained model (after the train stage rewrote it)."""
        self._trained = None

    def _tensors(self, *parts: str):
        path = self.path(*parts)
        try:
            return load_tensors(path)
        except ValueError as exc:  # e.g. a file of an earlier version (metadata key "json")
            raise StageError(f"{str(exc).splitlines()[0]}; rerun its stage with --force") from None

    def samples(self) -> dict:
        """``{"images": (Q, C, H, W), "seeds": (Q,), "timesteps": (S,)[, "trajectory": (Q, S + 1, C, H, W)]
        [, "labels": (Q,) the class each query was generated for (class-conditional runs)]
        [, "prompts": Q strings, the prompt each query was generated for (text-conditional runs)]}``."""
        tensors, header = self._tensors("samples", "samples.safetensors")
        if isinstance(header.get("prompts"), list):
            tensors["prompts"] = [str(p) for p in header["prompts"]]
        return tensors

    def scores(self) -> dict:
        """``{"scores": (Q, N), "train_ids": (N,), "query_ids": (Q,), "meta": header}``."""
        tensors, header = self._tensors("scores", "scores.safetensors")
        tensors["meta"] = header
        return tensors

    def task(self, trajectory_timesteps=None) -> DiffusionTask:
        """The diffusion task of the fit and score stages (measurement, draws, seed from the score settings)."""
        _, scheduler = self.trained()
        sc = self.config.score
        extra = {} if trajectory_timesteps is None else {"trajectory_timesteps": trajectory_timesteps}
        variance_reduced = sc.draws == "stratified-antithetic"
        if self.conditional:
            extra["condition"] = "class"
        elif self.text_conditional:
            extra["condition"] = "text"
        return DiffusionTask(scheduler, num_train_draws=sc.num_train_draws, num_query_draws=sc.num_query_draws,
                             measurement=sc.measurement, seed=sc.seed, stratified=variance_reduced,
                             antithetic=variance_reduced, **extra)

    def curvature_path(self) -> str:
        return self.config.score.curvature or self.path("fit", "curvature.safetensors")

    def curvature(self, model) -> Curvature:
        """The fitted (or given) curvature, checked against ``model``; a StageError says why it cannot be used."""
        path = self.curvature_path()
        if not os.path.isfile(path):
            raise StageError(f"{path}: no such curvature file")
        try:
            return load_curvature(path, model)
        except ValueError as exc:
            raise StageError(f"{path}: cannot be used with this model: {str(exc).splitlines()[0]}") from None
        except Exception as exc:
            raise StageError(f"{path}: not a readable curvature file ({type(exc).__name__})") from None

    def score_plan(self, model, task: DiffusionTask, default: int, *, num_queries: int,
                   num_examples: int) -> Tuple[int, Optional[int]]:
        """``(draws_per_forward, query_batch)``: ``(default, None)`` (all queries at once), or under ``max_memory``
        the memory model's plan (``memory.plan_scores``: the most queries held per training pass, then the most
        draws per forward)."""
        budget = self.config.max_memory
        if budget is None:
            return default, None
        try:
            sample = self.train_data()
            sample = tuple(v[:2] for v in sample) if isinstance(sample, tuple) else sample[:2]
            plan = plan_scores(model, task, sample, budget, num_queries=num_queries, num_examples=num_examples,
                               config=self.config.fit.curvature)
        except MemoryError as exc:
            raise StageError(f"--max-memory {budget}: {exc}") from None
        return plan.draws_per_forward, (None if plan.query_batch >= num_queries else plan.query_batch)
