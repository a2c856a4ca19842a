"""Latent diffusion: training images encoded once by a fixed VAE, and generated latents decoded for viewing.

A latent diffusion model (Stable-Diffusion style) trains its UNet on ``z = scaling_factor * (E(x) - shift)``, with
``E`` the encoder of a fixed ``AutoencoderKL``. Influence runs on the UNet only: the training set of the
attribution is the latents, curvature and scores are those of the UNet's tracked layers, and the VAE is not a
tracked layer (it is fixed: no curvature, no gradient). A query is a generated latent; ``decode_latents`` turns
it into an image for the report.

Encoding is deterministic: the latent of an image is the MEAN of the encoder's Gaussian ``latent_dist`` (no
sample), times ``scaling_factor`` (``vae.config.scaling_factor``; 0.18215, Stable Diffusion 1.x's, when the VAE
has none), after subtracting ``shift_factor`` (``vae.config.shift_factor``, None for SD 1.x / 2.x VAEs):
``z = scaling_factor * (mean - shift_factor)``. Training with sampled latents (``latent_dist.sample()``) instead
adds noise the attribution does not see; the mean is what we attribute to.

``encode_latents(vae, images, path)`` encodes in batches into a safetensors file (``storage.save_tensors``,
atomic). The file's header records what the latents were computed from: the VAE's weights
(``storage.model_fingerprint``), the images (``identity.data_fingerprint``), the scaling and shift factors, the
batch size and the dtype; tensor ``latents`` holds the first ``done`` latents. An interrupted encoding resumes
from its last saved batch and writes the same bytes as an uninterrupted one; a file made from other inputs is
refused (``LatentsMismatch``), never mixed.

    from kfac_influence.latents import encode_latents, decode_latents
    z = encode_latents(vae, images, "cache/latents.safetensors", batch_size=32)     # (N, c, h, w) float32
    task = DiffusionTask(scheduler, condition="text")
    curv = fit_curvature(unet, task, (z, embeddings), cfg)                          # the UNet, on latents
    images = decode_latents(vae, generated_latents)                                 # for the report
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn as nn

from .data_iter import get_batch, num_examples
from .engine import model_device_dtype, progress_bar, use_model_mode
from .identity import data_fingerprint
from .storage import load_tensors, model_fingerprint, save_tensors
from .tasks.conditioning import split_batch

__all__ = ["DEFAULT_SCALING_FACTOR", "LatentsMismatch", "latent_factors", "encode_latents", "decode_latents",
           "load_latents"]

DEFAULT_SCALING_FACTOR = 0.18215  # Stable Diffusion 1.x; used when the VAE's config has no scaling_factor
LATENTS_VERSION = 1


class LatentsMismatch(ValueError):
    """A latents file was encoded from other inputs or settings than the call's; the message names them."""


def _config_value(vae: nn.Module, key: str):
    cfg = getattr(vae, "config", None)
    if cfg is None:
        return None
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def latent_factors(vae: nn.Module, scaling_factor: Optional[float] = None,
                   shift_factor: Optional[float] = None) -> Tuple[float, float]:
    """``(scaling_factor, shift_factor)``: the arguments when given, else the VAE config's, else
    ``(DEFAULT_SCALING_FACTOR, 0.0)``."""
    scale = scaling_factor if scaling_factor is not None else _config_value(vae, "scaling_factor")
    shift = shift_factor if shift_factor is not None else _config_value(vae, "shift_factor")
    scale = DEFAULT_SCALING_FACTOR if scale is None else float(scale)
    shift = 0.0 if shift is None else float(shift)
    if not (scale > 0 and torch.isfinite(torch.tensor(scale))) or not torch.isfinite(torch.tensor(shift)):
        raise ValueError(f"scaling_factor must be positive and finite and shift_factor finite, got {scale}, {shift}")
    return scale, shift


def _encode_batch(vae: nn.Module, x: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    if not callable(getattr(vae, "encode", None)):
        raise TypeError(f"a {type(vae).__name__} has no encode(); the VAE must have encode(x).latent_dist "
                        "(diffusers' AutoencoderKL)")
    out = vae.encode(x)
    dist = getattr(out, "latent_dist", None)
    if dist is None and isinstance(out, (tuple, list)) and out:
        dist = out[0]
    if dist is None or not hasattr(dist, "mean"):
        raise TypeError("vae.encode(x) must return an object with .latent_dist (a diagonal Gaussian with .mean), "
                        "as diffusers' AutoencoderKL does")
    z = (dist.mean - shift) * scale
    return z.to(torch.promote_types(z.dtype, torch.float32)).cpu()


_WHAT = {"vae": "the VAE's weights", "images": "the images", "num_examples": "the number of images",
         "scaling_factor": "scaling_factor", "shift_factor": "shift_factor", "batch_size": "batch_size",
         "vae_dtype": "the VAE's dtype", "kind": "the kind of file", "version": "the file version"}


def _identity(vae: nn.Module, images: Any, n: int, scale: float, shift: float, batch_size: int) -> dict:
    _, dtype = model_device_dtype(vae)
    return {"kind": "latents", "version": LATENTS_VERSION, "vae": model_fingerprint(vae.named_parameters()),
            "images": data_fingerprint(images), "num_examples": n, "scaling_factor": scale,
            "shift_factor": shift, "batch_size": int(batch_size), "vae_dtype": str(dtype).replace("torch.", "")}


def load_latents(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, dict]:
    """``(latents (done, c, h, w), header)`` of a file written by ``encode_latents`` (``header["done"]`` of
    ``header["num_examples"]`` encoded)."""
    tensors, header = load_tensors(path)
    if header.get("kind") != "latents" or "latents" not in tensors:
        raise ValueError(f"{path} is not a latents file (kind {header.get('kind')!r})")
    return tensors["latents"], header


@torch.no_grad()
def encode_latents(vae: nn.Module, images: Any, path: Optional[Union[str, os.PathLike]] = None, *,
                   batch_size: int = 16, scaling_factor: Optional[float] = None,
                   shift_factor: Optional[float] = None, save_every: Optional[int] = None,
                   seconds: float = 60.0, progress: bool = False) -> torch.Tensor:
    """Latents ``(N, c, h, w)`` (CPU; float32, or float64 from a float64 VAE) of ``images``: ``scaling_factor * (latent_dist.mean - shift)``.

    Args:
        vae: a module with ``encode(x).latent_dist`` (diffusers ``AutoencoderKL``), in eval mode while encoding
            (restored afterwards); images are moved to its device and dtype.
        images: a tensor ``(N, C, H, W)`` (in the VAE's range, [-1, 1] for Stable Diffusion's), a tuple whose
            first item is one (e.g. ``(images, labels)``; only the images are encoded), or a map-style Dataset of
            such items or of dicts with "image".
        path: the cache file (safetensors). None: encode in memory. An existing file from the same inputs is
            read (and completed if partial); one from other inputs raises ``LatentsMismatch``.
        batch_size: images per ``encode`` call (recorded: batch composition can change float rounding).
        save_every / seconds: write the partial file every ``save_every`` batches, or ``seconds`` seconds after
            the last write (default: every 60 s), and always at the end.
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    scale, shift = latent_factors(vae, scaling_factor, shift_factor)
    n = num_examples(images)
    if n == 0:
        raise ValueError("no images to encode")
    identity = _identity(vae, images, n, scale, shift, batch_size) if path is not None else None
    parts, done = [], 0
    if path is not None and Path(path).exists():
        saved, header = load_latents(path)
        differs = [_WHAT.get(k, k) for k in identity if header.get(k) != identity[k]]
        if differs:
            raise LatentsMismatch(f"{path} holds latents of other inputs or settings ({', '.join(differs)} "
                                  "differ); delete it or choose another path")
        done = int(header.get("done", 0))
        if done == n:
            return saved
        parts = [saved]
    device, dtype = model_device_dtype(vae)
    batches = -(-n // batch_size)
    first = done // batch_size
    last_save = time.monotonic()
    bar = progress_bar(batches, "encoding latents", progress, initial=first)
    try:
        with use_model_mode(vae, "eval"):
            for b in range(first, batches):
                idx = torch.arange(b * batch_size, min(n, (b + 1) * batch_size))
                x, _ = split_batch(get_batch(images, idx), None)
                if not torch.is_tensor(x) or x.dim() != 4:
                    raise ValueError(f"images must be (N, C, H, W) tensors, got {tuple(getattr(x, 'shape', ()))}")
                parts.append(_encode_batch(vae, x.to(device=device, dtype=dtype), scale, shift))
                done = int(idx[-1]) + 1
                bar.update(1)
                due = (save_every is not None and (b + 1 - first) % save_every == 0) or \
                    time.monotonic() - last_save >= seconds
                if path is not None and (done == n or due):
                    parts = [torch.cat(parts)]
                    save_tensors(path, {"latents": parts[0]}, {**identity, "done": done})
                    last_save = time.monotonic()
    finally:
        bar.close()
    return torch.cat(parts)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, *, scaling_factor: Optional[float] = None,
                   shift_factor: Optional[float] = None, batch_size: Optional[int] = None) -> torch.Tensor:
    """Images ``vae.decode(latents / scaling_factor + shift).sample`` of latents ``(N, c, h, w)``, in batches of
    ``batch_size`` (None: all at once), on the VAE's device and in its dtype; the inverse of the encoding's scaling
    (factors as in ``latent_factors``)."""
    scale, shift = latent_factors(vae, scaling_factor, shift_factor)
    if latents.dim() != 4:
        raise ValueError(f"latents must be (N, c, h, w), got {tuple(latents.shape)}")
    device, dtype = model_device_dtype(vae)
    step = latents.shape[0] if batch_size is None else int(batch_size)
    out = []
    with use_model_mode(vae, "eval"):
        for s in range(0, latents.shape[0], max(1, step)):
            z = latents[s:s + step].to(device=device, dtype=dtype)
            dec = vae.decode(z / scale + shift)
            out.append(getattr(dec, "sample", dec))
    return torch.cat(out)
