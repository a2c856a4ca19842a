"""Seeded, resumable DDPM training with AdamW, linear warmup, gradient clipping and an EMA of the weights.

The loss is diffusers' standard epsilon MSE, mean over pixels: ``(1/D) ||eps - eps_theta(x_t, t)||^2`` with
``t ~ U{0..T-1}`` and ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (the per-draw loss of the design, section 2).

Determinism: batches, timesteps and noise come from a private ``torch.Generator``; dropout uses the global torch
RNG, which is seeded at the start and saved in every checkpoint. A run interrupted at any step and resumed from
its last checkpoint replays the same steps and ends with the same weights as an uninterrupted run (on the same
machine and thread count).
Checkpoints are written atomically (temp file, then ``os.replace``); only the newest is kept. A checkpoint is one
safetensors file (``checkpoint.safetensors``, via ``kfac_influence.storage``): the model, EMA and AdamW state
tensors under named keys, the random states as byte tensors, and everything else (step, batch cursor, AdamW
param-group settings, learning-rate schedule state) in its JSON header. Nothing is unpickled when resuming; a
checkpoint of another config or other training images is refused (``CheckpointMismatch``), not resumed.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, asdict
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..engine import CheckpointMismatch
from ..identity import tensors_fingerprint
from ..storage import load_tensors, save_tensors

__all__ = ["TrainConfig", "TrainResult", "train", "EMA"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters.

    steps: optimiser steps; batch_size: examples per step (sampled with replacement-free shuffled epochs);
    lr, weight_decay, betas: AdamW; warmup_steps: linear warmup from 0 to lr, then constant;
    grad_clip: max global gradient norm (0 disables); ema_decay: EMA of the weights (the attributed model), with
    the usual warm-started decay ``min(ema_decay, (1 + step) / (10 + step))``;
    checkpoint_every: steps between checkpoints (0: only at the end); seed: everything random in training;
    condition_dropout: conditional training only (``train(..., labels=...)`` or ``condition=...``): the
    probability that a training example's label (or token embeddings) is replaced by the null one in a step (what
    classifier-free guidance needs); in [0, 1). Unconditional training ignores it.
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    seed: int = 0
    condition_dropout: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.condition_dropout, (int, float)) and 0.0 <= self.condition_dropout < 1.0):
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, checkpoint_every, grad_clip and weight_decay must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """``ema <- ema + (1 - d) (param - ema)`` for floating tensors (one fused foreach call); others copied."""
        d = self.decay_at(step)
        src = dict(model.named_parameters())
        src.update(dict(model.named_buffers()))
        dst, new = [], []
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if t.is_floating_point():
                dst.append(t)
                new.append(src[name].detach())
            else:
                t.copy_(src[name])
        if dst:
            torch._foreach_lerp_(dst, new, 1.0 - d)


@dataclass
class TrainResult:
    """``model``: the EMA model (eval mode, parameters requiring grad) used for attribution; ``raw_model``: the
    last optimiser weights;
    ``losses``: per-step training losses of the steps run in this call; ``resumed_from``: step of the checkpoint
    the run resumed from (0: fresh)."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    losses: List[float]
    resumed_from: int


def _lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / cfg.warmup_steps)
    return f


CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_VERSION = 1


def _checkpoint_path(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, CHECKPOINT_FILE)


def optimizer_to_flat(state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as named tensors (``optimizer.<param index>.<key>``) and a JSON-able rest
    (param groups; per-parameter non-tensor entries)."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, dict] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: Dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of ``optimizer_to_flat``: an optimizer ``state_dict``."""
    state: Dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _training_start(module: torch.nn.Module, images, device,
                    what: str) -> Tuple[torch.device, torch.Tensor]:
    """The device (``device``, else the module's), ``module`` moved there in train mode, and ``images`` as a
    float32 tensor; raises when there are none (``what``: the error's words)."""
    device = torch.device(device) if device is not None else next(module.parameters()).device
    module.to(device).train()
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.shape[0] == 0:
        raise ValueError(f"no training images{what}")
    return device, images


def _load_matching(ckpt: str, identity: dict, what: str):
    """``(tensors, header)`` of the training checkpoint ``ckpt``; ``CheckpointMismatch`` naming the entries of
    ``identity`` that differ (``what``: what it may be a checkpoint of)."""
    tensors, saved = load_tensors(ckpt)
    differs = [k for k, v in identity.items() if saved.get(k) != v]
    if differs:
        raise CheckpointMismatch(f"{ckpt}: checkpoint of a different {what} ({', '.join(differs)} differ); "
                                 f"delete it to start over")
    return tensors, saved


def _next_batch(perm: torch.Tensor, cursor: int, n: int, batch_size: int, gen: torch.Generator):
    """``(indices, perm, cursor)``: the next batch of an epoch-wise shuffle (a new permutation when the epoch's
    rest is smaller than a batch: the incomplete tail is dropped; with replacement when the batch exceeds ``n``)."""
    if cursor + batch_size > n:
        perm, cursor = torch.randperm(n, generator=gen), 0
    idx = perm[cursor: cursor + batch_size] if batch_size <= n else torch.randint(0, n, (batch_size,), generator=gen)
    return idx, perm, cursor + batch_size


def _prefixed(prefix: str, d: dict) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in d.items()}


def _unprefixed(prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _check_condition(condition, null_condition, n: int, labels, config: TrainConfig):
    """Validated ``(condition, null_condition)`` of ``train`` (tensors on the CPU; None, None without)."""
    if condition is None:
        if null_condition is not None:
            raise ValueError("null_condition needs condition")
        return None, None
    if labels is not None:
        raise ValueError("pass labels (class-conditional) or condition (e.g. token embeddings), not both")
    if not condition:
        raise ValueError("condition must hold at least one model keyword")
    condition = {k: torch.as_tensor(v) for k, v in condition.items()}
    for k, v in condition.items():
        if v.dim() < 1 or v.shape[0] != n:
            raise ValueError(f"condition {k!r} must have one row per image ({n}), got {tuple(v.shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"condition {k!r} has NaN or infinite values")
    if null_condition is None:
        if config.condition_dropout > 0:
            raise ValueError("condition dropout > 0 needs null_condition (the empty prompt's embeddings); pass "
                             "one or set condition_dropout to 0")
        return condition, None
    null_condition = {k: torch.as_tensor(v) for k, v in null_condition.items()}
    if set(null_condition) != set(condition):
        raise ValueError(f"null_condition has the keys {sorted(null_condition)}, condition {sorted(condition)}")
    for k, v in null_condition.items():
        if tuple(v.shape) != (1, *condition[k].shape[1:]) or v.dtype != condition[k].dtype:
            raise ValueError(f"null_condition {k!r} must be {condition[k].dtype} {(1, *condition[k].shape[1:])}, "
                             f"got {v.dtype} {tuple(v.shape)}")
    return condition, null_condition


def train(model: torch.nn.Module, scheduler, images: torch.Tensor, config: TrainConfig,
          checkpoint_dir: Optional[str] = None, progress: bool = True, device=None,
          labels: Optional[torch.Tensor] = None, null_label: Optional[int] = None,
          condition: Optional[Dict[str, torch.Tensor]] = None,
          null_condition: Optional[Dict[str, torch.Tensor]] = None) -> TrainResult:
    """Train ``model`` (an epsilon predictor called as ``model(x_t, t).sample`` or returning a tensor) on
    ``images`` ``(N, C, H, W)`` in [-1, 1] with the DDPM loss; resumes from ``checkpoint_dir`` if it holds a
    checkpoint of a run with the same config. ``model`` is trained in place (train mode, dropout on).

    Class-conditional training: ``labels`` ``(N,)`` integers in ``[0, null_label)`` are passed as
    ``model(x_t, t, class_labels=y)``; each example's label is replaced by ``null_label`` with probability
    ``config.condition_dropout`` (drawn from the training generator, so a resumed run replays it). Without
    ``labels`` the model is called as ``model(x_t, t)`` and the random stream is that of earlier versions.

    Text-conditional training: ``condition`` holds model keywords with one row per image, e.g.
    ``{"encoder_hidden_states": (N, L, E)[, "encoder_attention_mask": (N, L)]}``, passed as
    ``model(x_t, t, **condition[idx])``; ``null_condition`` the same keys with one row (the empty prompt's
    embeddings, ``(1, L, E)``), which replaces an example's row with probability ``config.condition_dropout``
    (needed when it is > 0). Not together with ``labels``.
    """
    device, images = _training_start(model, images, device, "")
    n = images.shape[0]
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (n,) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
        if null_label is None or int(null_label) < 1:
            raise ValueError("class-conditional training needs null_label >= 1 (the reserved label of the null "
                             "condition)")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= int(null_label)):
            raise ValueError(f"labels must lie in [0, {int(null_label)}) (label {int(null_label)} is the null "
                             f"condition), got {int(labels.min())}..{int(labels.max())}")
        labels = labels.long()
    condition, null_condition = _check_condition(condition, null_condition, n, labels, config)
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    T = abar.shape[0]

    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(config))
    ema = EMA(model, config.ema_decay)
    gen = torch.Generator().manual_seed(int(config.seed))
    torch.manual_seed(int(config.seed) + 1)  # dropout
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    start = 0

    ckpt = _checkpoint_path(checkpoint_dir) if checkpoint_dir else None
    identity = {}
    if ckpt:
        cfg = config.to_dict()
        if labels is None and condition is None:  # unconditional checkpoints keep earlier versions' identity
            cfg.pop("condition_dropout")
        identity = {"kind": "train_state", "version": STATE_VERSION, "config": cfg, "num_images": n,
                    "data": tensors_fingerprint([images])}
        if labels is not None:
            identity["labels"] = tensors_fingerprint([labels])
            identity["null_label"] = int(null_label)
        if condition is not None:
            identity["condition"] = tensors_fingerprint([condition])
            identity["null_condition"] = tensors_fingerprint([null_condition])
    if ckpt and os.path.isfile(ckpt):
        tensors, saved = _load_matching(ckpt, identity, "training config or data")
        model.load_state_dict(_unprefixed("model", tensors))
        ema.model.load_state_dict(_unprefixed("ema", tensors))
        opt.load_state_dict(optimizer_from_flat(tensors, saved["optimizer"]))
        lr_sched.load_state_dict(saved["lr_scheduler"])
        gen.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch_rng"])
        perm, cursor, start = tensors["perm"], int(saved["cursor"]), int(saved["step"])

    losses: List[float] = []
    bar = tqdm(total=config.steps, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
    ema_loss = None
    for step in range(start, config.steps):
        idx, perm, cursor = _next_batch(perm, cursor, n, config.batch_size, gen)
        x0 = images[idx].to(device)
        t = torch.randint(0, T, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        t = t.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
        if condition is not None:
            drop = (torch.rand(x0.shape[0], generator=gen) < config.condition_dropout).to(device)
            kw = {}
            for key, rows in condition.items():
                rows = rows[idx].to(device)
                if null_condition is not None:
                    keep = drop.view(-1, *([1] * (rows.dim() - 1)))
                    rows = torch.where(keep, null_condition[key].to(device).expand_as(rows), rows)
                kw[key] = rows
            out = model(xt, t, **kw)
        elif labels is None:
            out = model(xt, t)
        else:
            y = labels[idx]
            drop = torch.rand(y.shape[0], generator=gen) < config.condition_dropout
            out = model(xt, t, class_labels=torch.where(drop, torch.full_like(y, int(null_label)), y).to(device))
        out = out.sample if hasattr(out, "sample") else out
        loss = torch.nn.functional.mse_loss(out, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        lr_sched.step()
        ema.update(model, step)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"training loss became {lv} at step {step + 1}; lower the learning rate")
        losses.append(lv)
        ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}", refresh=False)
        done = step + 1
        if ckpt and ((config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps):
            opt_tensors, opt_rest = optimizer_to_flat(opt.state_dict())
            save_tensors(ckpt, {**_prefixed("model", model.state_dict()), **_prefixed("ema", ema.model.state_dict()),
                                **opt_tensors, "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                                "perm": perm.clone()},
                         {**identity, "step": done, "cursor": cursor, "optimizer": opt_rest,
                          "lr_scheduler": lr_sched.state_dict()})
    bar.close()
    model.eval()
    # the EMA copy was kept out of autograd while averaging; attribution differentiates it
    return TrainResult(model=ema.model.eval().requires_grad_(True), raw_model=model, losses=losses,
                       resumed_from=start)
