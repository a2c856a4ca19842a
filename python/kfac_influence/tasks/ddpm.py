"""DDPM step maths shared by the diffusion task and the sampler: timestep spacing and the model's transition.

Conventions. ``timesteps`` is a decreasing sequence ``t_0 > t_1 > ... > t_{S-1}`` (all T steps by default, or
strided like diffusers' ``set_timesteps``); step i goes from ``t_i`` to ``p_i = t_{i+1}`` (``p_{S-1} = -1`` with
``abar_{-1} = 1``). With ``alpha = abar_t / abar_p`` and ``beta = 1 - alpha`` the model's transition is Gaussian,

    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)     (clipped to [-1, 1] if the scheduler
                                                                             has clip_sample, as diffusers does)
    mean   = sqrt(abar_p) beta / (1 - abar_t) * x0_hat + sqrt(alpha) (1 - abar_p) / (1 - abar_t) * x_t
    var    = (1 - abar_p) / (1 - abar_t) * beta                              ("fixed_small", diffusers' default)

exactly diffusers' ``DDPMScheduler.step``. Sampling itself lives in ``kfac_influence.diffusion.sampling``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

__all__ = ["default_timesteps", "prev_timesteps", "epsilon", "guided_epsilon", "transition"]


def default_timesteps(scheduler, num_inference_steps: Optional[int] = None) -> torch.Tensor:
    """Decreasing timesteps ``(S,)`` int64: all T steps, or ``S`` steps strided by ``T // S`` (diffusers' leading
    spacing, ending at 0)."""
    T = int(scheduler.config.num_train_timesteps)
    S = T if num_inference_steps is None else int(num_inference_steps)
    if not 1 <= S <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {S}")
    ratio = T // S
    return (torch.arange(S, dtype=torch.long) * ratio).flip(0)


def prev_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """``p_i = t_{i+1}`` for decreasing ``timesteps (S,)``, with ``p_{S-1} = -1`` (the last, deterministic step)."""
    prev = torch.full_like(timesteps, -1)
    prev[:-1] = timesteps[1:]
    return prev


def epsilon(model, x: torch.Tensor, t: torch.Tensor, condition: Optional[Mapping[str, torch.Tensor]] = None
            ) -> torch.Tensor:
    """The model's noise prediction: ``model(x, t, **condition).sample`` (diffusers) or ``model(x, t, **condition)``
    (a plain module); ``condition``: keywords such as ``class_labels`` or ``encoder_hidden_states``, one row each."""
    out = model(x, t, **(condition or {}))
    return out.sample if hasattr(out, "sample") else out


def guided_epsilon(model, x: torch.Tensor, t: torch.Tensor, condition: Mapping[str, torch.Tensor],
                   null_condition: Mapping[str, torch.Tensor], guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``(1 + w) eps(x, t, c) - w eps(x, t, null)`` with ``w = guidance_scale``
    (``w = 0``: the conditional prediction, one forward). A sampling-time rule only: measurements are taken under
    the query's own condition, never of this mixture (docs/conditional.md)."""
    w = float(guidance_scale)
    eps_c = epsilon(model, x, t, condition)
    if w == 0.0:
        return eps_c
    return (1.0 + w) * eps_c - w * epsilon(model, x, t, null_condition)


def transition(model, scheduler, x_t: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor,
               condition: Optional[Mapping[str, torch.Tensor]] = None):
    """Mean and standard deviation of ``p_theta(x_prev | x_t)`` (under ``condition``, passed on to ``epsilon``).

    x_t: ``(B, C, H, W)``; t, prev_t: ``(B,)`` int64 (``prev_t = -1`` for the last step).
    Returns ``mean (B, C, H, W)`` (differentiable in the model's parameters) and ``std (B, 1, 1, 1)`` (0 on the last
    step, where the transition is deterministic).
    """
    abar_all = scheduler.alphas_cumprod.to(device=x_t.device, dtype=x_t.dtype)
    one = torch.ones((), device=x_t.device, dtype=x_t.dtype)
    abar_t = abar_all[t].view(-1, 1, 1, 1)
    abar_p = torch.where(prev_t >= 0, abar_all[prev_t.clamp(min=0)], one).view(-1, 1, 1, 1)
    alpha = abar_t / abar_p
    beta = 1.0 - alpha
    eps = epsilon(model, x_t, t.to(x_t.device), condition)
    x0 = (x_t - (1.0 - abar_t).sqrt() * eps) / abar_t.sqrt()
    if getattr(scheduler.config, "clip_sample", False):
        r = float(getattr(scheduler.config, "clip_sample_range", 1.0))
        x0 = x0.clamp(-r, r)
    mean = (abar_p.sqrt() * beta / (1.0 - abar_t)) * x0 + (alpha.sqrt() * (1.0 - abar_p) / (1.0 - abar_t)) * x_t
    var = (1.0 - abar_p) / (1.0 - abar_t) * beta
    std = var.clamp(min=0.0).sqrt()
    return mean, std
