"""DDPM ancestral sampling (seeded, optionally recording the trajectory) and the trajectory log-probability.

The step maths (timestep spacing; the model's Gaussian transition, exactly diffusers' ``DDPMScheduler.step``)
is ``kfac_influence.tasks.ddpm``. A trajectory is a tensor ``(B, S + 1, C, H, W)``: ``[:, 0]`` is the initial
noise ``x_T`` and ``[:, i + 1]`` the state after step i; ``[:, -1]`` is the generated image.
Sample ``k`` of a call with ``seed`` uses its own generator seeded ``seed + k``, so a sample does not depend on the
batch size or on how many samples are drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..tasks.ddpm import default_timesteps, guided_epsilon, prev_timesteps, transition

__all__ = ["SampleResult", "default_timesteps", "transition", "ddpm_sample", "trajectory_logprob"]


@dataclass
class SampleResult:
    """``images``: ``(B, C, H, W)`` generated images in [-1, 1]; ``seeds``: ``(B,)`` the seed of each sample;
    ``timesteps``: ``(S,)`` the decreasing timesteps used; ``trajectory``: ``(B, S + 1, C, H, W)`` or None;
    ``labels``: ``(B,)`` the class each sample was generated for (class-conditional sampling), or None.
    (Text-conditional sampling returns no conditions: the caller knows the prompt of each sample.)"""

    images: torch.Tensor
    seeds: torch.Tensor
    timesteps: torch.Tensor
    trajectory: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None


class _Guided(torch.nn.Module):
    """``model`` under classifier-free guidance: called as ``(x, t, class_labels=y)``, returns
    ``s eps(x, t, y) + (1 - s) eps(x, t, null)`` (``tasks.ddpm.guided_epsilon`` with ``w = s - 1``)."""

    def __init__(self, model, null_label: Optional[int], guidance_scale: float,
                 null_condition: Optional[Mapping[str, torch.Tensor]] = None):
        super().__init__()
        self.model, self.w = model, float(guidance_scale) - 1.0
        self.null_label = None if null_label is None else int(null_label)
        self.null_condition = null_condition

    def forward(self, x, t, **condition):
        if self.null_condition is None:  # class labels
            null = {"class_labels": torch.full_like(condition["class_labels"], self.null_label)}
        else:  # one null row (e.g. the empty prompt's embeddings), repeated for the batch
            null = {k: v.expand(x.shape[0], *v.shape[1:]) for k, v in self.null_condition.items()}
        return guided_epsilon(self.model, x, t, condition, null, self.w)


@torch.no_grad()
def ddpm_sample(model, scheduler, num_samples: int, shape: Sequence[int], seed: int = 0, batch_size: int = 64,
                num_inference_steps: Optional[int] = None, record_trajectory: bool = False,
                progress: bool = True, device=None, class_labels: Optional[torch.Tensor] = None,
                guidance_scale: float = 1.0, null_label: Optional[int] = None,
                condition: Optional[Mapping[str, torch.Tensor]] = None,
                null_condition: Optional[Mapping[str, torch.Tensor]] = None, clamp: bool = True) -> SampleResult:
    """Draw ``num_samples`` images of ``shape = (C, H, W)`` by DDPM ancestral sampling (model in eval mode).

    Class-conditional sampling: ``class_labels`` ``(num_samples,)`` integers, sample k generated for label k
    (``model(x_t, t, class_labels=...)``); ``guidance_scale`` s is classifier-free guidance in diffusers'
    convention, ``eps = s eps(x, t, y) + (1 - s) eps(x, t, null_label)``: 1 is plain conditional sampling (one
    forward per step), s > 1 guides (two forwards; needs ``null_label``). The noise of sample k depends only
    on its seed, so the same seed gives the same noise for every label and scale.

    Other conditions (text): ``condition`` holds model keywords with one row per sample, e.g.
    ``{"encoder_hidden_states": (num_samples, L, E)[, "encoder_attention_mask": (num_samples, L)]}``, and
    ``null_condition`` the same keys with one row (the empty prompt's), needed for ``guidance_scale != 1``.

    Returns a :class:`SampleResult`; the images are the last trajectory state clamped to [-1, 1] (with
    ``clamp=False`` as they are: latents of a latent model, whose range is not [-1, 1]). Raises
    ``FloatingPointError`` naming the first sample (and its seed) whose final state holds NaN or infinite values
    (a diverged model), instead of returning it (clamping keeps NaN).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not (isinstance(guidance_scale, (int, float)) and 0.0 <= guidance_scale < float("inf")):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if condition is not None:
        if class_labels is not None:
            raise ValueError("pass class_labels or condition, not both")
        for k, v in condition.items():
            if v.shape[0] != num_samples:
                raise ValueError(f"condition {k!r} must have one row per sample ({num_samples}), got "
                                 f"{tuple(v.shape)}")
        if guidance_scale != 1.0:
            if null_condition is None or set(null_condition) != set(condition) or any(
                    tuple(v.shape) != (1, *condition[k].shape[1:]) for k, v in null_condition.items()):
                raise ValueError("guidance_scale != 1 needs null_condition: the condition's keys with one row each "
                                 "(the null condition, e.g. the empty prompt's embeddings)")
    elif class_labels is not None:
        class_labels = torch.as_tensor(class_labels)
        if class_labels.shape != (num_samples,) or class_labels.is_floating_point():
            raise ValueError(f"class_labels must be integers of shape ({num_samples},), got "
                             f"{class_labels.dtype} {tuple(class_labels.shape)}")
        class_labels = class_labels.long()
    elif guidance_scale != 1.0:
        raise ValueError("guidance_scale != 1 needs class_labels (classifier-free guidance is for conditional "
                         "models)")
    if guidance_scale != 1.0 and null_label is None and condition is None:
        raise ValueError("guidance_scale != 1 needs null_label (the label of the null condition)")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = param.dtype if param.is_floating_point() else torch.float32

    def on_device(v: torch.Tensor) -> torch.Tensor:  # floating conditions in the model's dtype
        return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)

    null = None if condition is None or guidance_scale == 1.0 else \
        {k: on_device(v) for k, v in null_condition.items()}
    net = model if guidance_scale == 1.0 else _Guided(model, null_label, guidance_scale, null)
    was_training = model.training
    model.eval()
    timesteps = default_timesteps(scheduler, num_inference_steps)
    prev = prev_timesteps(timesteps)
    shape = tuple(int(s) for s in shape)
    seeds = torch.arange(num_samples, dtype=torch.long) + int(seed)
    images, trajs = [], []
    nb = (num_samples + batch_size - 1) // batch_size
    bar = tqdm(total=nb * len(timesteps), desc="sample", disable=not progress, dynamic_ncols=True)
    try:
        for b in range(nb):
            bseeds = seeds[b * batch_size:(b + 1) * batch_size].tolist()
            gens = [torch.Generator().manual_seed(s) for s in bseeds]
            x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)
            traj = [x.cpu()] if record_trajectory else None
            B = x.shape[0]
            cond = None if class_labels is None else \
                {"class_labels": class_labels[b * batch_size:(b + 1) * batch_size].to(device)}
            if condition is not None:
                cond = {k: on_device(v[b * batch_size:(b + 1) * batch_size]) for k, v in condition.items()}
            for t, p in zip(timesteps.tolist(), prev.tolist()):
                tt = torch.full((B,), t, dtype=torch.long, device=device)
                pp = torch.full((B,), p, dtype=torch.long, device=device)
                mean, std = transition(net, scheduler, x, tt, pp, condition=cond)
                z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)
                x = mean + std * z if p >= 0 else mean
                if record_trajectory:
                    traj.append(x.cpu())
                bar.update(1)
            finite = torch.isfinite(x.flatten(1)).all(1).cpu()
            if not bool(finite.all()):
                j = int((~finite).nonzero()[0])
                raise FloatingPointError(f"sample {b * batch_size + j} (seed {bseeds[j]}) has NaN or infinite "
                                         f"values after the last sampling step: the model diverged")
            images.append((x.clamp(-1.0, 1.0) if clamp else x).cpu())
            if record_trajectory:
                trajs.append(torch.stack(traj, dim=1))
    finally:
        bar.close()
        model.train(was_training)
    return SampleResult(images=torch.cat(images), seeds=seeds, timesteps=timesteps,
                        trajectory=torch.cat(trajs) if record_trajectory else None,
                        labels=None if class_labels is None else class_labels.clone())


def trajectory_logprob(model, scheduler, trajectory: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                       chunk_size: int = 256) -> torch.Tensor:
    """Log-probability ``(B,)`` (nats) of recorded ancestral trajectories under the model's Gaussian transitions.

    trajectory: ``(B, S + 1, C, H, W)`` as returned by :func:`ddpm_sample`; timesteps: ``(S,)`` the decreasing
    timesteps it was sampled with (None: ``default_timesteps(scheduler, S)``, what :func:`ddpm_sample` uses for
    ``num_inference_steps=S``). Returns ``sum_i log N(x_{i+1}; mean_theta(x_i, t_i), std_i^2 I)`` over the
    stochastic steps (std > 0). Excluded, because they carry no density in theta: the prior ``N(x_T; 0, I)``
    (theta-free) and the deterministic last step (std = 0, a point mass). Differentiable in the model's
    parameters; the model is called on ``chunk_size`` (state, step) pairs at a time, in its current mode.
    """
    if trajectory.ndim != 5:
        raise ValueError(f"trajectory must be (B, S + 1, C, H, W), got {tuple(trajectory.shape)}")
    B, S1 = trajectory.shape[:2]
    if timesteps is None:
        timesteps = default_timesteps(scheduler, S1 - 1)
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    if S1 != timesteps.numel() + 1:
        raise ValueError(f"trajectory has {S1} states but {timesteps.numel()} timesteps (need S + 1 states)")
    prev = prev_timesteps(timesteps)
    keep = torch.nonzero(prev >= 0).flatten()
    # the std is theta-free; drop steps whose std is 0 (only the last, with fixed_small variance)
    x_in = trajectory[:, keep]                      # (B, K, C, H, W)
    x_out = trajectory[:, keep + 1]
    t_in = timesteps[keep].unsqueeze(0).expand(B, -1)
    p_in = prev[keep].unsqueeze(0).expand(B, -1)
    K = keep.numel()
    flat = lambda z: z.reshape(B * K, *z.shape[2:])  # noqa: E731
    x_in, x_out, t_in, p_in = flat(x_in), flat(x_out), t_in.reshape(-1), p_in.reshape(-1)
    device = next(model.parameters()).device
    D = x_in[0].numel()
    parts = []
    for s in range(0, B * K, chunk_size):
        xi = x_in[s:s + chunk_size].to(device)
        xo = x_out[s:s + chunk_size].to(device)
        tt, pp = t_in[s:s + chunk_size].to(device), p_in[s:s + chunk_size].to(device)
        mean, std = transition(model, scheduler, xi, tt, pp)
        std = std.flatten()
        sq = (xo - mean).flatten(1).pow(2).sum(1)
        parts.append(-0.5 * sq / std.pow(2) - D * std.log() - 0.5 * D * torch.log(
            torch.tensor(2.0 * torch.pi, dtype=xi.dtype, device=device)))
    if not parts:
        return trajectory.new_zeros(B)
    return torch.cat(parts).view(B, K).sum(1)
