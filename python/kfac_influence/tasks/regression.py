"""RegressionTask: batch = (inputs, targets); per-example loss = mean over output elements of the squared error.

One draw per example for gradients; for curvature with fisher="mc", ``num_draws`` MC samples per example."""
from __future__ import annotations

import torch

from .base import MSETask, Draws, example_generator


class RegressionTask(MSETask):
    """Supervised regression with MSE(reduction="mean") per example. Outputs of ``model(inputs)`` must have the
    shape of ``targets``. ``seed`` seeds the train/query draws (only MC vectors are random here)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def num_draws(self, purpose: str) -> int:
        return 1

    def draws(self, batch, indices: torch.Tensor, purpose: str, *, num_draws: int, seed: int) -> Draws:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("RegressionTask expects batches of (inputs, targets)")
        x, y = batch
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs ({x.shape[0]}) and targets ({y.shape[0]}) differ in number of examples")
        m = int(num_draws)
        rep = lambda t: t.repeat_interleave(m, dim=0)  # noqa: E731
        data = {"inputs": rep(x), "target": rep(y)}
        if purpose == "fit":
            xi = [torch.randn((m,) + tuple(y.shape[1:]), generator=example_generator(seed, purpose, int(i)),
                              dtype=torch.float64) for i in indices.tolist()]
            data["xi"] = torch.cat(xi).to(y.dtype)
        return Draws(indices.repeat_interleave(m), torch.arange(m).repeat(len(indices)), 1.0 / m, data)

    def forward(self, model: torch.nn.Module, rows: Draws) -> torch.Tensor:
        out = model(rows.data["inputs"])
        if out.shape != rows.data["target"].shape:
            raise ValueError(f"model output shape {tuple(out.shape)} differs from targets "
                             f"{tuple(rows.data['target'].shape)}")
        return out

    def train_loss(self, outputs: torch.Tensor, rows: Draws) -> torch.Tensor:
        return self.mse(outputs, rows.data["target"])
