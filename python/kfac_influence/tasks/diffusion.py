"""DiffusionTask: an epsilon-predicting network (diffusers ``UNet2DModel`` or any ``model(x_t, t)``) under a DDPM
noise schedule. Conventions are design.md section 2: per-draw loss (1/D) ||eps - f||^2 with
x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, t ~ U{0..T-1}.

Measurements (all per draw; every one is a loss-like quantity, so a positive score means removing the training
example is predicted to RAISE it, i.e. make the query less likely):
  loss             (1/D) ||eps - f||^2, t uniform
  elbo             negative-ELBO estimate in nats: T * beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - f||^2
                   with sigma_t^2 the posterior variance (sigma_0^2 = beta_0), t uniform; theta-free constants dropped
  simplified_elbo  beta_t / (2 alpha_t (1 - abar_t)) * (1/D) ||eps - f||^2, t uniform
  square_norm      (1/D) ||f||^2 (D-TRAK), t uniform
  loss_at_time     (1/D) ||eps - f||^2 at the fixed ``timestep``
  weighted_loss    (1/D) ||eps - f||^2 with t drawn proportionally to ``timestep_weights`` (length T)
  sampling_trajectory_logprob  minus the log-probability of a recorded ancestral trajectory: queries are
                   trajectories (Q, S+1, C, H, W) from ``kfac_influence.diffusion.ddpm_sample``; each
                   stochastic step is one row (weight 1: the measurement sums over steps)

Conditional models (``condition="class"`` / ``"text"``, see ``tasks.conditioning``): every training example and
every query carries its condition (a class label, or token embeddings ``(L, E)`` with an optional mask), repeated
for each of its draws (example-major, like x_t) in ``Draws.data`` under the model keyword it is passed as
(``class_labels``, ``encoder_hidden_states``, ``encoder_attention_mask``); the forward pass is
``model(x_t, t, **condition)``. The loss of a training example is taken under its own condition (the one it was
trained with), and so is the measurement of a query (the one it was generated with). For a sample generated with
classifier-free guidance, ``measurement`` is the measurement of the conditional model at the query's condition,
not of the guided mixture ``(1 + w) eps(x, t, c) - w eps(x, t, null)``: the mixture is not a model that training
fits, its "loss" has no likelihood meaning, and the guidance scale w is a sampling choice (docs/conditional.md).
To attribute under the null condition instead, give the query the null condition.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch

from .base import MSETask, Draws, example_generator
from .conditioning import CONDITION_KEYS, Conditioning, check_model_condition, split_batch
from .ddpm import default_timesteps, transition

UNIFORM_T = ("loss", "elbo", "simplified_elbo", "square_norm")
MEASUREMENTS = ("loss", "elbo", "simplified_elbo", "square_norm", "loss_at_time", "weighted_loss",
                "sampling_trajectory_logprob")


class DiffusionTask(MSETask):
    """Diffusion training loss and query measurements for an epsilon-predictor.

    Args:
        scheduler: anything with ``betas`` (T,) (e.g. a diffusers ``DDPMScheduler``) or a betas tensor.
        num_train_draws / num_query_draws: M (t, eps) draws per training example / per query.
        measurement: one of ``MEASUREMENTS``.
        timestep: the fixed t for ``loss_at_time``; timestep_weights: (T,) non-negative, for ``weighted_loss``.
        seed: seeds the train and query draws (curvature draws use ``CurvatureConfig.seed``).
        trajectory_timesteps: (S,) decreasing timesteps the query trajectories were sampled with (None: the
            default spacing of ``ddpm_sample`` for S steps).
        share_draws: queries use the same (t, eps) draws as training examples with the same index (common random
            numbers between query and train gradients; needs num_query_draws == num_train_draws and a measurement
            with uniform t).
        stratified: an example's M draws cover [0, T) in equal strata (one per antithetic pair): t_m =
            floor((pi(m) + u_m) T / K), pi a seeded permutation, u_m ~ U[0, 1); each t keeps probability 1/T.
        antithetic: draw 2i+1 reuses draw 2i's t with noise -eps (and MC vector -xi).
            Both apply to every purpose for measurements with uniform t (queries of other measurements keep plain
            draws). Their effect on the digits LDS benchmark: bench/RESULTS.md. The pipeline turns them on, this
            class leaves them off by default.
        condition: None (unconditional: ``model(x_t, t)``; a batch's items after the images are ignored),
            "class" (batches ``(images, labels (B,) int)`` or dicts with "image" and "class_label"), "text"
            (batches ``(images, embeddings (B, L, E)[, mask (B, L)])`` or dicts with "image",
            "encoder_hidden_states" and optionally "encoder_attention_mask"), or a ``Conditioning`` that also
            fixes ``num_classes`` / ``embed_dim``. Training data and queries take the same form. Mismatches with
            a diffusers model's config (labels out of range of num_class_embeds, embeddings of another width than
            cross_attention_dim, a conditional model without condition) raise ``ValueError``.
    """

    def __init__(self, scheduler, *, num_train_draws: int = 250, num_query_draws: int = 250,
                 measurement: str = "loss", timestep: Optional[int] = None,
                 timestep_weights: Optional[Sequence[float]] = None, seed: int = 0,
                 trajectory_timesteps: Optional[Sequence[int]] = None, share_draws: bool = False,
                 stratified: bool = False, antithetic: bool = False,
                 condition: Union[None, str, Conditioning] = None):
        betas = scheduler if isinstance(scheduler, torch.Tensor) else getattr(scheduler, "betas", None)
        if betas is None:
            raise TypeError("scheduler must be a betas tensor or have a `betas` attribute (diffusers DDPMScheduler)")
        self.scheduler = scheduler
        self.betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if not ((self.betas > 0) & (self.betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.T = int(self.betas.numel())
        if measurement not in MEASUREMENTS:
            raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
        if num_train_draws < 1 or num_query_draws < 1:
            raise ValueError("numbers of draws must be >= 1")
        if measurement == "loss_at_time" and (timestep is None or not 0 <= int(timestep) < self.T):
            raise ValueError(f"loss_at_time needs timestep in [0, {self.T}), got {timestep!r}")
        self.timestep_probs = None
        if measurement == "weighted_loss":
            if timestep_weights is None or len(timestep_weights) != self.T:
                raise ValueError(f"weighted_loss needs timestep_weights of length T={self.T}")
            w = torch.as_tensor(timestep_weights, dtype=torch.float64)
            if (w < 0).any() or w.sum() <= 0 or not torch.isfinite(w).all():
                raise ValueError("timestep_weights must be finite, non-negative and not all zero")
            self.timestep_probs = w / w.sum()
        if measurement == "sampling_trajectory_logprob" and isinstance(scheduler, torch.Tensor):
            raise ValueError("sampling_trajectory_logprob needs a diffusers DDPMScheduler, not a betas tensor")
        self.trajectory_timesteps = trajectory_timesteps
        if share_draws and (num_query_draws != num_train_draws or measurement in
                            ("loss_at_time", "weighted_loss", "sampling_trajectory_logprob")):
            raise ValueError("share_draws needs num_query_draws == num_train_draws and a measurement with uniform t")
        self.share_draws = bool(share_draws)
        self.conditioning = Conditioning.of(condition)
        self.stratified = bool(stratified)
        self.antithetic = bool(antithetic)
        self.measurement_name = measurement
        self.timestep = None if timestep is None else int(timestep)
        self.num_train_draws = int(num_train_draws)
        self.num_query_draws = int(num_query_draws)
        self.seed = int(seed)
        posterior = torch.cat([self.betas[:1], self.betas[1:] * (1 - self.alphas_cumprod[:-1])
                               / (1 - self.alphas_cumprod[1:])])
        # negative-ELBO weight of ||eps - f||^2 per timestep (sum over pixels)
        self.elbo_weight = self.T * self.betas ** 2 / (2 * posterior * self.alphas * (1 - self.alphas_cumprod))
        self.simplified_weight = self.betas / (2 * self.alphas * (1 - self.alphas_cumprod))

    def num_draws(self, purpose: str) -> int:
        return self.num_query_draws if purpose == "query" else self.num_train_draws

    def _variance_reduced(self, purpose: str) -> bool:
        return purpose != "query" or self.measurement_name in UNIFORM_T

    def _timesteps(self, purpose: str, m: int, gen: torch.Generator) -> torch.Tensor:
        if self.stratified and self._variance_reduced(purpose):
            k = (m + 1) // 2 if self.antithetic else m  # one stratum per antithetic pair
            perm = torch.randperm(k, generator=gen)
            u = torch.rand(k, generator=gen, dtype=torch.float64)
            t = ((perm.double() + u) * self.T / k).floor().long().clamp_(0, self.T - 1)
            return t.repeat_interleave(2)[:m] if self.antithetic else t
        if purpose == "query" and self.measurement_name == "loss_at_time":
            return torch.full((m,), self.timestep, dtype=torch.long)
        if purpose == "query" and self.timestep_probs is not None:
            return torch.multinomial(self.timestep_probs, m, replacement=True, generator=gen)
        return torch.randint(0, self.T, (m,), generator=gen)

    def draws(self, batch, indices: torch.Tensor, purpose: str, *, num_draws: int, seed: int) -> Draws:
        if purpose == "query" and self.measurement_name == "sampling_trajectory_logprob":
            return self._trajectory_rows(batch, indices)
        x, cond = split_batch(batch, self.conditioning)
        if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"DiffusionTask expects float images (B, C, H, W), got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        m = int(num_draws)
        ts, eps, xis = [], [], []
        source = "train" if (purpose == "query" and self.share_draws) else purpose
        for i in indices.tolist():
            gen = example_generator(seed, source, i)
            ts.append(self._timesteps(purpose, m, gen))
            eps.append(torch.randn((m,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float64))
            if purpose == "fit":
                xis.append(torch.randn((m,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float64))
            if self.antithetic and self._variance_reduced(purpose) and m >= 2:
                pairs = m // 2
                ts[-1][1:2 * pairs:2] = ts[-1][0:2 * pairs:2]
                for z in (eps[-1], xis[-1] if purpose == "fit" else None):
                    if z is not None:
                        z[1:2 * pairs:2] = -z[0:2 * pairs:2]
        t = torch.cat(ts)
        e = torch.cat(eps)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = x.detach().to(torch.float64).repeat_interleave(m, dim=0)
        data = {"x_t": (abar.sqrt() * x0 + (1 - abar).sqrt() * e).to(x.dtype), "target": e.to(x.dtype),
                "t": t}
        if xis:
            data["xi"] = torch.cat(xis).to(x.dtype)
        data.update({k: v.repeat_interleave(m, dim=0) for k, v in cond.items()})
        return Draws(indices.repeat_interleave(m), torch.arange(m).repeat(len(indices)), 1.0 / m, data)

    def _trajectory_rows(self, batch, indices: torch.Tensor) -> Draws:
        traj, cond = split_batch(batch, self.conditioning)
        if not torch.is_tensor(traj) or traj.dim() != 5:
            raise ValueError("sampling_trajectory_logprob queries must be trajectories (Q, S+1, C, H, W) with "
                             "x_T first and x_0 last")
        steps = traj.shape[1] - 1
        ts = torch.as_tensor(self.trajectory_timesteps if self.trajectory_timesteps is not None
                             else default_timesteps(self.scheduler, steps), dtype=torch.long)
        if ts.numel() != steps:
            raise ValueError(f"trajectories have {steps} steps but {ts.numel()} timesteps were given")
        prev = torch.cat([ts[1:], ts.new_full((1,), -1)])
        keep = torch.nonzero(prev >= 0).flatten()  # the last step is deterministic: no density in theta
        q, k = traj.shape[0], keep.numel()
        data = {"x_in": traj[:, keep].reshape((q * k,) + traj.shape[2:]),
                "x_out": traj[:, keep + 1].reshape((q * k,) + traj.shape[2:]),
                "t": ts[keep].repeat(q), "prev_t": prev[keep].repeat(q)}
        data.update({name: v.repeat_interleave(k, dim=0) for name, v in cond.items()})
        return Draws(indices.repeat_interleave(k), torch.arange(k).repeat(q), 1.0, data)

    @staticmethod
    def condition_of(rows: Draws) -> Dict[str, torch.Tensor]:
        """The model keywords ``rows`` carry (empty for unconditional draws)."""
        return {k: rows.data[k] for k in CONDITION_KEYS if k in rows.data}

    def forward(self, model: torch.nn.Module, rows: Draws) -> torch.Tensor:
        cond = self.condition_of(rows)
        check_model_condition(model, self.conditioning, cond)
        if "x_in" in rows.data:  # one ancestral step per row: the model's mean of p(x_prev | x_t)
            mean, _ = transition(model, self.scheduler, rows.data["x_in"], rows.data["t"], rows.data["prev_t"],
                                 condition=cond)
            return mean
        try:
            out = model(rows.data["x_t"], rows.data["t"], **cond)
        except RuntimeError as e:
            shapes = "".join(f", {k} {tuple(v.shape)}" for k, v in cond.items())
            raise ValueError(f"the model rejected inputs of shape {tuple(rows.data['x_t'].shape)}{shapes} "
                             f"(expected input shape?): {str(e).splitlines()[0]}") from e
        except TypeError as e:
            if not cond or "unexpected keyword" not in str(e):
                raise
            raise ValueError(f"the model does not take the condition keywords {sorted(cond)} "
                             f"(condition={self.conditioning.kind!r}): {e}") from e
        out = getattr(out, "sample", out)
        if out.shape != rows.data["x_t"].shape:
            raise ValueError(f"the model predicts shape {tuple(out.shape)} for inputs {tuple(rows.data['x_t'].shape)};"
                             " an epsilon-predictor must keep the input shape")
        return out

    def _step_std(self, rows: Draws, like: torch.Tensor) -> torch.Tensor:
        abar = torch.as_tensor(self.scheduler.alphas_cumprod).to(like.dtype).cpu()  # as the sampler uses it
        t, p = rows.data["t"].cpu(), rows.data["prev_t"].cpu()
        abar_t, abar_p = abar[t], abar[p.clamp(min=0)]
        var = (1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)
        return var.sqrt().to(like).view(-1, *([1] * (like.dim() - 1)))

    def train_loss(self, outputs: torch.Tensor, rows: Draws) -> torch.Tensor:
        return self.mse(outputs, rows.data["target"])

    def measurement(self, outputs: torch.Tensor, rows: Draws) -> torch.Tensor:
        name = self.measurement_name
        if name == "sampling_trajectory_logprob":  # -log N(x_out; mean, std^2 I) per step
            std = self._step_std(rows, outputs)
            d = outputs[0].numel()
            sq = ((rows.data["x_out"] - outputs) / std).pow(2).flatten(1).sum(1)
            return 0.5 * sq + d * std.flatten().log() + 0.5 * d * math.log(2 * math.pi)
        if name == "square_norm":
            return outputs.pow(2).flatten(1).mean(dim=1)
        mse = self.mse(outputs, rows.data["target"])
        t = rows.data["t"].cpu()
        if name == "elbo":
            return mse * outputs[0].numel() * self.elbo_weight[t].to(outputs)
        if name == "simplified_elbo":
            return mse * self.simplified_weight[t].to(outputs)
        return mse
