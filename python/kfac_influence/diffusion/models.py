"""Epsilon-prediction models and the DDPM noise schedule.

A model spec is one of
  * a preset name: ``digits-tiny`` (a ~0.7M-parameter UNet2DModel for 8x8 grey digits, a few minutes of training
    on 2 CPU cores), ``digits-cond`` (the same UNet with ``num_class_embeds=11``: the 10 digit classes and the
    null class 10 of classifier-free guidance) or ``cifar-ddpm`` (the DDPM CIFAR-10 UNet of Ho et al. used by Mlodozeniec et al.: 32x32,
    channels 128/256/256/256, 2 ResNet layers per block, attention at 16x16, dropout 0.1, ~36M parameters);
    ``latent-tiny`` (a latent model: ``digits-cond``'s UNet on the 8x8x2 latents of the VAE preset of the same
    name, ``vae.VAE_PRESETS``, which the pipeline trains first on the digits upscaled to 32x32);
    ``text-tiny`` (a text-conditional ``UNet2DConditionModel`` at digits-tiny's size, cross-attention to token
    embeddings in its second block and middle; its ``cross_attention_dim`` follows the embeddings' width);
  * a ``.json`` file holding ``UNet2DModel`` keyword arguments (a diffusers ``config.json`` works), or those of a
    ``UNet2DConditionModel`` (text-conditional) when ``_class_name`` says so;
  * a local folder saved by diffusers: ``UNet2DModel.save_pretrained`` (``config.json`` + weights) or
    ``DDPMPipeline.save_pretrained`` (``model_index.json``, ``unet/``, ``scheduler/``), or a latent pipeline
    folder, which adds ``vae/`` (an ``AutoencoderKL``; ``vae.vae_source``). Nothing is downloaded.

Presets and JSON configs give freshly initialised (seeded) weights; folders give trained weights.
The noise schedule is diffusers' ``DDPMScheduler`` with linear betas 1e-4..0.02 over T = 1000 steps unless a
pipeline folder brings its own scheduler config.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = [
    "PRESETS",
    "ModelError",
    "SchedulerConfig",
    "build_model",
    "make_scheduler",
    "load_model",
    "save_pipeline",
    "model_config",
    "downsampling_factor",
    "check_image_size",
    "check_finite_weights",
    "num_class_embeds",
    "is_text_conditional",
    "text_width",
]


class ModelError(ValueError):
    """An unusable model spec (unknown preset, unreadable config, incompatible folder)."""


PRESETS = {
    # 8x8 grey digits: 8 -> 4 spatial, attention at 4x4. ~0.7M parameters; ~0.1 s per batch of 128 on 2 cores.
    "digits-tiny": dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
        dropout=0.0,
    ),
    "digits-cond": None,  # filled below: digits-tiny + num_class_embeds
    # The DDPM CIFAR-10 architecture (Ho et al. 2020), as used by Mlodozeniec et al. (2025).
    "cifar-ddpm": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        dropout=0.1,
        norm_num_groups=32,
        resnet_time_scale_shift="default",
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
}
# digits-tiny with a class embedding: 10 digit classes plus the null class 10 (classifier-free guidance; trained
# with condition dropout, the pipeline's TrainConfig.condition_dropout). Same cost as digits-tiny.
PRESETS["digits-cond"] = dict(PRESETS["digits-tiny"], num_class_embeds=11)
# latent diffusion: digits-cond's UNet on the 8x8x2 latents of the VAE preset "latent-tiny" (vae.VAE_PRESETS)
PRESETS["latent-tiny"] = dict(PRESETS["digits-cond"], in_channels=2, out_channels=2)
# text-conditional: digits-tiny's size with cross-attention (second block and the middle) to token embeddings; its
# cross_attention_dim (32 here) follows the width of the run's embeddings (build_model(cross_attention_dim=E)).
PRESETS["text-tiny"] = dict(
    {k: v for k, v in PRESETS["digits-tiny"].items() if k != "dropout"}, _class_name="UNet2DConditionModel",
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32)
TEXT_UNET = "UNet2DConditionModel"


@dataclass(frozen=True)
class SchedulerConfig:
    """The DDPM forward process: linear betas from ``beta_start`` to ``beta_end`` over ``num_train_timesteps``."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = True

    def __post_init__(self):
        if self.num_train_timesteps < 2:
            raise ModelError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ModelError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


def stable_config(scheduler):
    """``scheduler`` with its diffusers config in a process-independent form, returned for chaining.

    diffusers records ``_use_default_values`` as a list made from a set, so its order changes from one Python
    process to the next (string hashing is randomised); ``identity.task_fingerprint`` hashes the scheduler's
    config, so without this a checkpoint written by one process would be refused by the process resuming it."""
    from diffusers.configuration_utils import FrozenDict

    cfg = getattr(scheduler, "_internal_dict", None)
    if cfg is not None and isinstance(cfg.get("_use_default_values"), list):
        scheduler._internal_dict = FrozenDict({**cfg, "_use_default_values": sorted(cfg["_use_default_values"])})
    return scheduler


def make_scheduler(config: SchedulerConfig = SchedulerConfig()):
    """A diffusers ``DDPMScheduler`` (epsilon prediction, fixed_small variance, linear betas; ``stable_config``)."""
    from diffusers import DDPMScheduler

    return stable_config(DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=config.clip_sample,
        prediction_type="epsilon",
    ))


def _unet_from_kwargs(kwargs: dict, source: str, seed: int):
    import diffusers

    name = "UNet2DConditionModel" if is_text_conditional(kwargs) else "UNet2DModel"
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if not k.startswith("_")}
    torch.manual_seed(seed)  # diffusers initialises with the global generator; we restore it below
    try:
        return getattr(diffusers, name)(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        raise ModelError(f"{source}: not a valid {name} config ({type(exc).__name__}: {exc})".splitlines()[0])


def is_text_conditional(config: dict) -> bool:
    """Whether a model config is a ``UNet2DConditionModel`` (its ``_class_name``; without one, a config with a
    ``cross_attention_dim``): a model that takes token embeddings (``encoder_hidden_states``) with every forward
    pass."""
    name = config.get("_class_name")
    return name == TEXT_UNET or (name is None and config.get("cross_attention_dim") is not None)


def text_width(config: dict) -> Optional[int]:
    """The token-embedding width E a ``UNet2DConditionModel`` config takes (``encoder_hid_dim`` when set, else
    ``cross_attention_dim``, diffusers' default 1280), None for other models."""
    if not is_text_conditional(config):
        return None
    width = config.get("encoder_hid_dim") or config.get("cross_attention_dim", 1280)
    return int(width) if isinstance(width, int) else None


def _read_json_config(path: str) -> dict:
    try:
        with open(path) as f:
            kwargs = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read JSON config ({exc})".splitlines()[0]) from None
    if not isinstance(kwargs, dict):
        raise ModelError(f"{path}: a model config must be a JSON object")
    return kwargs


def model_config(spec: str) -> dict:
    """The ``UNet2DModel`` keyword arguments of a model spec (preset, ``.json`` or diffusers folder), read without
    building the model (cheap: for checks before any work starts)."""
    if spec in PRESETS:
        return dict(PRESETS[spec])
    if os.path.isdir(spec):
        unet_dir = os.path.join(spec, "unet") if os.path.isfile(os.path.join(spec, "model_index.json")) else spec
        cfg = os.path.join(unet_dir, "config.json")
        if not os.path.isfile(cfg):
            raise ModelError(f"{spec}: not a diffusers UNet2DModel or DDPMPipeline folder (no {cfg})")
        return _read_json_config(cfg)
    if spec.lower().endswith(".json"):
        if not os.path.isfile(spec):
            raise ModelError(f"{spec}: no such file")
        return _read_json_config(spec)
    raise ModelError(f"{spec}: not a preset ({', '.join(PRESETS)}), a .json config or a model folder")


def num_class_embeds(config: dict) -> Optional[int]:
    """The number of class embeddings of a ``UNet2DModel`` config (``num_class_embeds``), None for a model without
    a class embedding table. A class-conditional model of this package reserves the last one, ``K - 1``, for the
    null condition of classifier-free guidance."""
    k = config.get("num_class_embeds")
    return None if k is None else int(k)


def downsampling_factor(config: dict) -> int:
    """How many times a ``UNet2DModel`` halves the image: 2 per down block but the last (diffusers adds no
    downsampler to the final block)."""
    blocks = config.get("down_block_types") or config.get("block_out_channels") or ("DownBlock2D",) * 4
    return 2 ** max(0, len(blocks) - 1)


def check_image_size(config: dict, height: int, width: int, source: str = "the model") -> None:
    """Raise ModelError unless ``height x width`` images pass through the UNet of ``config``: both sides must be
    multiples of its downsampling factor (an odd size after a halving breaks the skip connections)."""
    f = downsampling_factor(config)
    if height % f or width % f:
        raise ModelError(f"{source} halves the image {f.bit_length() - 1} time(s), so image sides must be "
                         f"multiples of {f}; the data is {height}x{width} (pass an image size such as "
                         f"{max(f, (height // f) * f)})")


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Raise ModelError naming the first parameter or buffer holding NaN or infinite values."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"{source}: weight {name!r} has {bad} NaN or infinite value(s) of {t.numel()}; "
                             f"the model is unusable (retrain it or use another --model)")


def build_model(spec: str, seed: int = 0, in_channels: Optional[int] = None, sample_size: Optional[int] = None,
                cross_attention_dim: Optional[int] = None):
    """A fresh ``UNet2DModel`` (or ``UNet2DConditionModel``) from a preset name or a JSON config, initialised
    with ``seed``.

    ``in_channels`` / ``sample_size`` override the preset's (e.g. to fit the data); out_channels follows in_channels;
    ``cross_attention_dim`` (text-conditional presets only) the width of the token embeddings.
    The global torch RNG state is left as it was.
    """
    if spec in PRESETS:
        kwargs = dict(PRESETS[spec])
        source = f"preset {spec}"
    elif spec.lower().endswith(".json"):
        if not os.path.isfile(spec):
            raise ModelError(f"{spec}: no such file")
        kwargs = _read_json_config(spec)
        source = spec
    else:
        raise ModelError(f"{spec}: not a preset ({', '.join(PRESETS)}), a .json config or a model folder")
    if in_channels is not None:
        kwargs["in_channels"] = kwargs["out_channels"] = int(in_channels)
    if sample_size is not None:
        kwargs["sample_size"] = int(sample_size)
    if cross_attention_dim is not None and spec in PRESETS and is_text_conditional(kwargs):
        kwargs["cross_attention_dim"] = int(cross_attention_dim)
    state = torch.get_rng_state()
    try:
        return _unet_from_kwargs(kwargs, source, seed)
    finally:
        torch.set_rng_state(state)


def load_model(path: str) -> Tuple[torch.nn.Module, Optional[object]]:
    """Load a ``UNet2DModel`` (and its ``DDPMScheduler``, when the folder has one) from a local diffusers folder.

    Returns ``(model, scheduler_or_None)``. Raises :class:`ModelError` for anything that is not such a folder,
    and for weights holding NaN or infinite values (naming the parameter). Weights are read from safetensors, or
    by diffusers' ``torch.load(weights_only=True)`` (no pickled code runs) for ``.bin`` files.
    """
    from diffusers import DDPMScheduler

    if not os.path.isdir(path):
        raise ModelError(f"{path}: no such model folder (or preset: {', '.join(PRESETS)})")
    unet_dir, sched = path, None
    if os.path.isfile(os.path.join(path, "model_index.json")):
        unet_dir = os.path.join(path, "unet")
        sdir = os.path.join(path, "scheduler")
        if os.path.isdir(sdir):
            try:
                sched = stable_config(DDPMScheduler.from_pretrained(sdir, local_files_only=True))
            except Exception as exc:
                raise ModelError(f"{sdir}: cannot load scheduler ({type(exc).__name__})") from None
    cfg = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(cfg):
        raise ModelError(f"{path}: not a diffusers UNet2DModel or DDPMPipeline folder (no {cfg})")
    try:
        with open(cfg) as f:
            cls = json.load(f).get("_class_name", "UNet2DModel")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg}: cannot read ({exc})".splitlines()[0]) from None
    if cls not in ("UNet2DModel", TEXT_UNET):
        raise ModelError(f"{cfg}: model class {cls!r} is not supported (expected UNet2DModel or {TEXT_UNET})")
    import diffusers

    try:
        model = getattr(diffusers, cls).from_pretrained(unet_dir, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"{unet_dir}: cannot load {cls} ({type(exc).__name__}: {exc})".splitlines()[0][:300]) \
            from None
    check_finite_weights(model, unet_dir)
    return model, sched


def save_pipeline(model, scheduler, path: str, vae=None) -> None:
    """Save ``model`` and ``scheduler`` as a ``DDPMPipeline`` folder, atomically (temp folder, then rename); with
    ``vae`` (a latent model's fixed ``AutoencoderKL``) as a latent pipeline folder (``vae.latent_pipeline``:
    ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``), which ``--model`` loads back."""
    import shutil

    from diffusers import DDPMPipeline

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    if vae is None:
        DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    else:
        from .vae import latent_pipeline

        latent_pipeline(model, vae, scheduler).save_pretrained(tmp, safe_serialization=True)
    if os.path.exists(path):
        old = path.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
