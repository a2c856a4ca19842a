"""Variance-reduced (t, eps) draws for DiffusionTask: stratified timesteps and antithetic noise.

``StratifiedDiffusionTask(scheduler, stratified=True, antithetic=True, **DiffusionTask kwargs)``:
  stratified  the M draws of an example cover [0, T) in M equal strata (pairs of draws share a stratum when
              antithetic): ``t_m = floor((pi(m) + u_m) T / M)``, pi a seeded permutation, u_m ~ U[0, 1).
              Every t keeps marginal probability 1/T, so all estimates stay unbiased.
  antithetic  draw 2i+1 reuses draw 2i's timestep with noise ``-eps`` (and MC vector ``-xi``); an odd M leaves the
              last draw unpaired.
Applies to every purpose (fit, train, query) for measurements with uniform t; other measurements keep the base
draws for queries. Everything else is DiffusionTask's (seeding per example, measurements, Fisher vectors).
"""
from __future__ import annotations

import torch

from ..tasks.base import Rows
from ..tasks.diffusion import DiffusionTask

UNIFORM_T = ("loss", "elbo", "simplified_elbo", "square_norm")


class StratifiedDiffusionTask(DiffusionTask):
    def __init__(self, scheduler, *, stratified: bool = True, antithetic: bool = False, **kwargs):
        super().__init__(scheduler, **kwargs)
        self.stratified = bool(stratified)
        self.antithetic = bool(antithetic)

    def _applies(self, purpose: str) -> bool:
        return purpose != "query" or self.measurement_name in UNIFORM_T

    def _timesteps(self, purpose: str, m: int, gen: torch.Generator) -> torch.Tensor:
        if not (self.stratified and self._applies(purpose)):
            return super()._timesteps(purpose, m, gen)
        k = (m + 1) // 2 if self.antithetic else m  # number of strata (one per pair when antithetic)
        perm = torch.randperm(k, generator=gen)
        u = torch.rand(k, generator=gen, dtype=torch.float64)
        t = ((perm.double() + u) * self.T / k).floor().long().clamp_(0, self.T - 1)
        if self.antithetic:
            t = t.repeat_interleave(2)[:m]
        return t

    def rows(self, batch, indices: torch.Tensor, purpose: str, *, num_draws: int, seed: int) -> Rows:
        rows = super().rows(batch, indices, purpose, num_draws=num_draws, seed=seed)
        m = int(num_draws)
        if not (self.antithetic and self._applies(purpose)) or m < 2 or "x_t" not in rows.data:
            return rows
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        b = len(indices)
        t = rows.data["t"].view(b, m).clone()
        eps = rows.data["target"].view(b, m, *x.shape[1:]).double().clone()
        pairs = m // 2
        t[:, 1:2 * pairs:2] = t[:, 0:2 * pairs:2]
        eps[:, 1:2 * pairs:2] = -eps[:, 0:2 * pairs:2]
        t, eps = t.reshape(-1), eps.reshape(b * m, *x.shape[1:])
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = x.detach().double().repeat_interleave(m, dim=0)
        rows.data["t"] = t
        rows.data["target"] = eps.to(x.dtype)
        rows.data["x_t"] = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).to(x.dtype)
        if "xi" in rows.data:
            xi = rows.data["xi"].view(b, m, *x.shape[1:]).clone()
            xi[:, 1:2 * pairs:2] = -xi[:, 0:2 * pairs:2]
            rows.data["xi"] = xi.reshape(b * m, *x.shape[1:])
        return rows
