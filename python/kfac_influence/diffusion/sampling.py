"""DDPM ancestral sampling (seeded, optionally recording the trajectory) and the trajectory log-probability.

The step maths (timestep spacing; the model's Gaussian transition, exactly diffusers' ``DDPMScheduler.step``)
is ``kfac_influence.tasks.ddpm``. A trajectory is a tensor ``(B, S + 1, C, H, W)``: ``[:, 0]`` is the initial
noise ``x_T`` and ``[:, i + 1]`` the state after step i; ``[:, -1]`` is the generated image.
Sample ``k`` of a call with ``seed`` uses its own generator seeded ``seed + k``, so a sample does not depend on the
batch size or on how many samples are drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..tasks.ddpm import default_timesteps, prev_timesteps, transition

__all__ = ["SampleResult", "default_timesteps", "transition", "ddpm_sample", "trajectory_logprob"]


@dataclass
class SampleResult:
    """``images``: ``(B, C, H, W)`` generated images in [-1, 1]; ``seeds``: ``(B,)`` the seed of each sample;
    ``timesteps``: ``(S,)`` the decreasing timesteps used; ``trajectory``: ``(B, S + 1, C, H, W)`` or None."""

    images: torch.Tensor
    seeds: torch.Tensor
    timesteps: torch.Tensor
    trajectory: Optional[torch.Tensor] = None


@torch.no_grad()
def ddpm_sample(model, scheduler, num_samples: int, shape: Sequence[int], seed: int = 0, batch_size: int = 64,
                num_inference_steps: Optional[int] = None, record_trajectory: bool = False,
                progress: bool = True, device=None) -> SampleResult:
    """Draw ``num_samples`` images of ``shape = (C, H, W)`` by DDPM ancestral sampling (model in eval mode).

    Returns a :class:`SampleResult`; the images are the last trajectory state clamped to [-1, 1]. Raises
    ``FloatingPointError`` naming the first sample (and its seed) whose final state holds NaN or infinite values
    (a diverged model), instead of returning it (clamping keeps NaN).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = param.dtype if param.is_floating_point() else torch.float32
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
            for t, p in zip(timesteps.tolist(), prev.tolist()):
                tt = torch.full((B,), t, dtype=torch.long, device=device)
                pp = torch.full((B,), p, dtype=torch.long, device=device)
                mean, std = transition(model, scheduler, x, tt, pp)
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
            images.append(x.clamp(-1.0, 1.0).cpu())
            if record_trajectory:
                trajs.append(torch.stack(traj, dim=1))
    finally:
        bar.close()
        model.train(was_training)
    return SampleResult(images=torch.cat(images), seeds=seeds, timesteps=timesteps,
                        trajectory=torch.cat(trajs) if record_trajectory else None)


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
