"""Task variants used by the baselines: fixed timesteps (D-TRAK, Journey-TRAK), another output function for the
training-side gradients (D-TRAK's square norm), and one sampling step of a recorded trajectory (Journey-TRAK)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..tasks.base import MSETask, Draws
from ..tasks.conditioning import split_batch
from ..tasks.diffusion import DiffusionTask

OUTPUTS = ("loss", "square_norm")


class FixedTimestepTask(DiffusionTask):
    """A DiffusionTask whose draws use fixed timesteps: draw m of every example (train, fit and query rows) has
    ``t = timesteps[m % len(timesteps)]`` and fresh seeded noise. ``output`` is the function differentiated for
    training examples (``train_loss``): "loss" (diffusion MSE) or "square_norm" ((1/D)||f||^2, D-TRAK).
    Queries use ``measurement`` as usual (``square_norm`` for D-TRAK)."""

    def __init__(self, scheduler, timesteps: Sequence[int], *, output: str = "loss", **kwargs):
        super().__init__(scheduler, **kwargs)
        ts = torch.as_tensor(list(timesteps), dtype=torch.long).flatten()
        if ts.numel() == 0 or (ts < 0).any() or (ts >= self.T).any():
            raise ValueError(f"timesteps must be a non-empty sequence in [0, {self.T}), got {ts.tolist()}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.fixed_timesteps = ts
        self.output = output

    def _timesteps(self, purpose: str, m: int, gen: torch.Generator) -> torch.Tensor:
        return self.fixed_timesteps[torch.arange(m) % self.fixed_timesteps.numel()]

    def train_loss(self, outputs: torch.Tensor, rows: Draws) -> torch.Tensor:
        if self.output == "square_norm":
            return outputs.pow(2).flatten(1).mean(dim=1)
        return super().train_loss(outputs, rows)


class TrajectoryStepTask(MSETask):
    """Queries = the states of recorded sampling trajectories at one step (Journey-TRAK).

    A query is ``(x_t, x_0)``: the trajectory state at timestep ``t`` and the generated image, both ``(C, H, W)``;
    its measurement is the diffusion loss ``(1/D) ||eps_hat - f(x_t, t)||^2`` with ``eps_hat = (x_t - sqrt(abar_t)
    x_0) / sqrt(1 - abar_t)``, the noise that takes the generated image to that state. One draw per query
    (deterministic).

    ``condition`` (None, "class", "text" or a ``Conditioning``, as for ``DiffusionTask``): a conditional query is
    ``(x_t, x_0, labels (B,))`` or ``(x_t, x_0, embeddings (B, L, E)[, mask (B, L)])``, the condition the
    trajectory was sampled with, passed to the model at the step (the query's measurement under its own
    condition)."""

    def __init__(self, scheduler, timestep: int, *, condition=None):
        self._base = DiffusionTask(scheduler, num_train_draws=1, num_query_draws=1, condition=condition)
        if not 0 <= int(timestep) < self._base.T:
            raise ValueError(f"timestep must lie in [0, {self._base.T}), got {timestep}")
        self.timestep = int(timestep)
        self.seed = 0

    @property
    def conditioning(self):
        return self._base.conditioning

    def num_draws(self, purpose: str) -> int:
        return 1

    def draws(self, batch, indices, purpose, *, num_draws, seed):
        want = "(x_t, x_0)" if self.conditioning is None else "(x_t, x_0, condition...)"
        if not (isinstance(batch, (tuple, list)) and (len(batch) == 2 if self.conditioning is None
                                                      else len(batch) >= 3)):
            raise ValueError(f"TrajectoryStepTask expects batches of {want}")
        xt, x0 = batch[0], batch[1]
        _, cond = split_batch((xt, *batch[2:]), self.conditioning)
        abar = float(self._base.alphas_cumprod[self.timestep])
        eps = (xt.double() - abar ** 0.5 * x0.double()) / (1 - abar) ** 0.5
        m = int(num_draws)
        rep = lambda v: v.repeat_interleave(m, dim=0)  # noqa: E731
        data = {"x_t": rep(xt), "target": rep(eps.to(xt.dtype)),
                "t": torch.full((len(indices) * m,), self.timestep, dtype=torch.long)}
        data.update({k: rep(v) for k, v in cond.items()})
        return Draws(indices.repeat_interleave(m), torch.arange(m).repeat(len(indices)), 1.0 / m, data)

    def forward(self, model, rows):
        return self._base.forward(model, rows)

    def train_loss(self, outputs, rows):
        return self.mse(outputs, rows.data["target"])
