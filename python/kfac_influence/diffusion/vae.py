"""The fixed VAE of a latent diffusion run: presets, loading from a diffusers folder, and seeded, resumable training.

A latent run (``--model latent-tiny``, or a local diffusers pipeline folder with ``model_index.json``, ``unet/``,
``vae/`` and ``scheduler/``) trains, samples, fits and scores its UNet on latents ``z = scaling_factor *
E(x).mean`` of a fixed ``AutoencoderKL`` (``kfac_influence.latents``). The VAE is not attributed: it has no
tracked layer, no curvature and no gradient (docs/latent.md).

Presets (``VAE_PRESETS``) are built from a config, never downloaded, and trained by the pipeline's ``vae`` stage
(``train_vae``): ``latent-tiny`` is a 3-block ``AutoencoderKL`` (8/16/16 channels, ~61k parameters) for the
embedded digits upscaled to 32x32, with 2 latent channels at a quarter of the side (32x32x1 -> 8x8x2). Its UNet
(``models.PRESETS["latent-tiny"]``) is ``digits-cond``'s on 2 channels.

Training loss (per batch of B images x ``(B, C, H, W)`` with D = C H W pixels each): the reconstruction MSE of a
sampled latent, mean over pixels, plus ``kl_weight`` times the KL divergence of the encoder's Gaussian from N(0, I)
per pixel: ``mean_b [ ||x_b - dec(mu_b + sigma_b eps_b)||^2 / D + kl_weight KL(N(mu_b, sigma_b^2) || N(0, I)) / D ]``.
No adversarial or perceptual term (small grey digits need none). After training, ``scaling_factor`` is set to
``1 / std`` of the training images' latent means (Stable Diffusion's recipe: unit-variance latents for the
diffusion model) and saved in the VAE's ``config.json``.

Determinism and resumption follow ``training.py``: batches and the reparameterisation noise come from a private
``torch.Generator``; a checkpoint (one safetensors file, JSON header, nothing pickled) holds the weights, the AdamW
and learning-rate state, the generator and the batch cursor, and a resumed run ends with the weights of an
uninterrupted one; a checkpoint of another config or other images is refused (``CheckpointMismatch``).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..identity import tensors_fingerprint
from ..storage import save_tensors
from .models import ModelError, _read_json_config, check_finite_weights
from .training import (_load_matching, _lr_factor, _next_batch, _prefixed, _training_start, _unprefixed,
                       optimizer_from_flat, optimizer_to_flat)

__all__ = ["VAE_PRESETS", "VAEConfig", "VAETrainResult", "vae_source", "vae_config", "build_vae", "load_vae",
           "latent_shape", "train_vae", "latent_std", "save_vae", "latent_pipeline"]

VAE_PRESETS = {
    # 32x32 grey digits -> 8x8x2 latents (two halvings); ~61k parameters, ~0.13 s per batch of 32 on one thread.
    "latent-tiny": dict(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    ),
}


@dataclass(frozen=True)
class VAEConfig:
    """The VAE of a latent run. Training (preset VAEs only; a folder's VAE is used as it is): steps (0: keep the
    initial weights), batch_size (images per step), lr / warmup_steps / grad_clip (AdamW with linear warmup and
    gradient-norm clipping, 0: off), kl_weight (weight of the per-pixel KL term), checkpoint_every (steps between
    checkpoints, 0: only at the end), seed (batches and reparameterisation noise). Encoding: encode_batch_size
    (images per ``encode`` call; recorded with the latents, since batch composition can change float rounding)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 20
    grad_clip: float = 1.0
    kl_weight: float = 1e-3
    checkpoint_every: int = 200
    seed: int = 0
    encode_batch_size: int = 64

    def __post_init__(self):
        for name in ("steps", "batch_size", "warmup_steps", "checkpoint_every", "seed", "encode_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"vae {name} must be a whole number, got {v!r}")
        if self.steps < 0 or self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("vae steps, warmup_steps and checkpoint_every must be >= 0")
        if self.batch_size < 1 or self.encode_batch_size < 1:
            raise ValueError(f"vae batch sizes must be >= 1, got {self.batch_size}, {self.encode_batch_size}")
        for name in ("lr", "grad_clip", "kl_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"vae {name} must be a finite number >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"vae lr must be > 0, got {self.lr}")

    def training(self) -> dict:
        """The settings training depends on (all but ``encode_batch_size``)."""
        d = asdict(self)
        d.pop("encode_batch_size")
        return d


def vae_source(spec: str) -> Optional[str]:
    """Where a model spec's fixed VAE comes from: ``"preset"`` for a VAE preset (trained by the ``vae`` stage), the
    path of the ``vae/`` folder of a local diffusers pipeline folder (one with ``model_index.json`` and
    ``vae/config.json``), None for a pixel-space model."""
    if spec in VAE_PRESETS:
        return "preset"
    vae_dir = os.path.join(spec, "vae")
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "model_index.json")) and \
            os.path.isfile(os.path.join(vae_dir, "config.json")):
        return vae_dir
    return None


def vae_config(spec: str) -> dict:
    """The ``AutoencoderKL`` keyword arguments of a latent model spec (preset or folder), read without building the
    VAE (cheap: for checks before any work starts). ModelError for a spec without a VAE or an unreadable config."""
    src = vae_source(spec)
    if src is None:
        raise ModelError(f"{spec}: not a latent model (a VAE preset: {', '.join(VAE_PRESETS)}, or a diffusers "
                         f"pipeline folder with model_index.json and vae/)")
    if src == "preset":
        return dict(VAE_PRESETS[spec])
    path = os.path.join(src, "config.json")
    cfg = _read_json_config(path)
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ModelError(f"{path}: VAE class {cls!r} is not supported (expected AutoencoderKL)")
    return cfg


def latent_shape(config: dict, image_shape, source: str = "the VAE") -> Tuple[int, int, int]:
    """``(latent_channels, H / f, W / f)``: the latents of ``(C, H, W)`` images under the ``AutoencoderKL`` of
    ``config``, which halves the image ``len(block_out_channels) - 1`` times (f = 2^that). ModelError (one line)
    when the VAE takes other channels or the sides are not multiples of f."""
    c, h, w = (int(v) for v in image_shape)
    cin = int(config.get("in_channels", 3))
    if cin != c:
        raise ModelError(f"{source} takes {cin}-channel images but the data has {c} channel(s)")
    f = 2 ** max(0, len(config.get("block_out_channels") or (64,)) - 1)
    if h % f or w % f:
        raise ModelError(f"{source} halves the image {f.bit_length() - 1} time(s), so image sides must be multiples "
                         f"of {f}; the data is {h}x{w} (pass an image size such as {max(f, (h // f) * f)})")
    return int(config.get("latent_channels", 4)), h // f, w // f


def build_vae(spec: str, seed: int = 0, in_channels: Optional[int] = None, sample_size: Optional[int] = None):
    """A fresh ``AutoencoderKL`` of a VAE preset, initialised with ``seed`` (the global torch RNG state is left as
    it was); ``in_channels`` / ``sample_size`` override the preset's (out_channels follows in_channels)."""
    from diffusers import AutoencoderKL

    if spec not in VAE_PRESETS:
        raise ModelError(f"{spec}: not a VAE preset ({', '.join(VAE_PRESETS)})")
    kwargs = dict(VAE_PRESETS[spec])
    if in_channels is not None:
        kwargs["in_channels"] = kwargs["out_channels"] = int(in_channels)
    if sample_size is not None:
        kwargs["sample_size"] = int(sample_size)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        return AutoencoderKL(**kwargs)
    finally:
        torch.set_rng_state(state)


def load_vae(path: str):
    """The ``AutoencoderKL`` saved in folder ``path`` (``config.json`` + weights; safetensors, or ``.bin`` through
    diffusers' ``torch.load(weights_only=True)``), eval mode. ModelError (one line) for anything else and for
    weights holding NaN or infinite values (naming the tensor)."""
    from diffusers import AutoencoderKL

    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ModelError(f"{path}: not a diffusers AutoencoderKL folder (no config.json)")
    cls = _read_json_config(cfg).get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ModelError(f"{cfg}: VAE class {cls!r} is not supported (expected AutoencoderKL)")
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load AutoencoderKL ({type(exc).__name__}: {exc})".splitlines()[0][:300]) \
            from None
    check_finite_weights(vae, path)
    return vae.eval()


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """Standard deviation (float64, over all elements) of the latent means ``E(x).mean`` of ``images``
    ``(N, C, H, W)``, encoded ``batch_size`` at a time in eval mode: ``1 / latent_std`` is the scaling factor that
    gives unit-variance latents."""
    was = vae.training
    vae.eval()
    param = next(vae.parameters())
    try:
        means = [vae.encode(images[s:s + batch_size].to(param.device, param.dtype)).latent_dist.mean.double().cpu()
                 for s in range(0, images.shape[0], batch_size)]
    finally:
        vae.train(was)
    return float(torch.cat(means).std())


@dataclass
class VAETrainResult:
    """``vae``: the trained VAE (eval mode) with ``config.scaling_factor`` set; ``losses``: per-step
    ``[reconstruction, kl]`` of the steps run in this call; ``resumed_from``: the checkpoint's step (0: fresh);
    ``scaling_factor``: ``1 / latent_std`` of the training images."""

    vae: torch.nn.Module
    losses: List[List[float]]
    resumed_from: int
    scaling_factor: float


VAE_CHECKPOINT = "vae_checkpoint.safetensors"
VAE_STATE_VERSION = 1


def _architecture(vae) -> dict:
    """The VAE's config without diffusers' private entries (``_use_default_values`` changes order between
    processes)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items() if not k.startswith("_")}


def train_vae(vae, images: torch.Tensor, config: VAEConfig, checkpoint_dir: Optional[str] = None,
              progress: bool = True, device=None) -> VAETrainResult:
    """Train ``vae`` (an ``AutoencoderKL``, in place) on ``images`` ``(N, C, H, W)`` in [-1, 1] for
    ``config.steps`` AdamW steps (loss in the module docstring), then set its ``scaling_factor`` to one over the
    latent means' standard deviation. Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same
    config, architecture and images (else ``CheckpointMismatch``); writes one every ``config.checkpoint_every``
    steps and at the end."""
    device, images = _training_start(vae, images, device, " for the VAE")
    n = images.shape[0]
    D = images[0].numel()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(config))
    gen = torch.Generator().manual_seed(int(config.seed))
    perm, cursor, start = torch.randperm(n, generator=gen), 0, 0
    ckpt = os.path.join(checkpoint_dir, VAE_CHECKPOINT) if checkpoint_dir else None
    identity = {"kind": "vae_train_state", "version": VAE_STATE_VERSION, "config": config.training(),
                "architecture": _architecture(vae), "num_images": n, "data": tensors_fingerprint([images])}
    if ckpt and os.path.isfile(ckpt):
        tensors, saved = _load_matching(ckpt, identity, "VAE, config or data")
        vae.load_state_dict(_unprefixed("vae", tensors))
        opt.load_state_dict(optimizer_from_flat(tensors, saved["optimizer"]))
        lr_sched.load_state_dict(saved["lr_scheduler"])
        gen.set_state(tensors["generator"])
        perm, cursor, start = tensors["perm"], int(saved["cursor"]), int(saved["step"])
    losses: List[List[float]] = []
    bar = tqdm(total=config.steps, initial=start, desc="train vae", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, config.steps):
            idx, perm, cursor = _next_batch(perm, cursor, n, config.batch_size, gen)
            x = images[idx].to(device)
            post = vae.encode(x).latent_dist
            eps = torch.randn(post.mean.shape, generator=gen).to(device)
            rec = vae.decode(post.mean + post.std * eps).sample
            l_rec = torch.nn.functional.mse_loss(rec, x)
            l_kl = post.kl().mean() / D
            loss = l_rec + config.kl_weight * l_kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            opt.step()
            lr_sched.step()
            lv = [float(l_rec.detach()), float(l_kl.detach())]
            if not all(math.isfinite(v) for v in lv):
                raise FloatingPointError(f"VAE training loss became {lv} at step {step + 1}; lower the VAE's "
                                         f"learning rate")
            losses.append(lv)
            bar.update(1)
            bar.set_postfix(rec=f"{lv[0]:.4f}", refresh=False)
            done = step + 1
            if ckpt and ((config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps):
                opt_tensors, opt_rest = optimizer_to_flat(opt.state_dict())
                save_tensors(ckpt, {**_prefixed("vae", vae.state_dict()), **opt_tensors,
                                    "generator": gen.get_state(), "perm": perm.clone()},
                             {**identity, "step": done, "cursor": cursor, "optimizer": opt_rest,
                              "lr_scheduler": lr_sched.state_dict()})
    finally:
        bar.close()
    vae.eval()
    std = latent_std(vae, images, config.batch_size)
    if not (math.isfinite(std) and std > 0):
        raise FloatingPointError(f"the VAE's latents have standard deviation {std}; no scaling factor (retrain it)")
    scaling = 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    return VAETrainResult(vae=vae, losses=losses, resumed_from=start, scaling_factor=scaling)


def save_vae(vae, path: str) -> None:
    """Save ``vae`` as a diffusers folder (``config.json``, ``diffusion_pytorch_model.safetensors``) at ``path``
    (which must not exist: the pipeline writes into a stage's staging folder)."""
    vae.save_pretrained(path, safe_serialization=True)



_PIPELINE_CLASS = None


def latent_pipeline(unet, vae, scheduler):
    """A diffusers ``DiffusionPipeline`` holding ``unet``, ``vae`` and ``scheduler`` (class
    ``LatentDDPMPipeline``), whose ``save_pretrained`` writes the standard folder: ``model_index.json``, ``unet/``,
    ``vae/``, ``scheduler/``. It is a container for saving: ``--model`` reads such a folder component by
    component (``models.load_model``, ``load_vae``), so the class need not be importable from diffusers."""
    global _PIPELINE_CLASS
    if _PIPELINE_CLASS is None:
        from diffusers import DiffusionPipeline

        class LatentDDPMPipeline(DiffusionPipeline):
            """UNet + fixed AutoencoderKL + DDPM scheduler (sampling: ``kfac_influence.diffusion.sampling`` on
            latents, then ``kfac_influence.latents.decode_latents``)."""

            def __init__(self, unet, vae, scheduler):
                super().__init__()
                self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

        _PIPELINE_CLASS = LatentDDPMPipeline
    return _PIPELINE_CLASS(unet=unet, vae=vae, scheduler=scheduler)
