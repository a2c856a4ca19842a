"""The Task protocol: what the curvature and scoring engine needs from a model family.

A training example expands into M "draws" (rows); for diffusion one draw is a (t, eps) pair, for regression the
example itself. Every row carries the global index of its example, so draws are reproducible per example whatever
the batching (each example's draws come from a generator seeded by (seed, purpose, example index)).

Purposes: "fit" (curvature), "train" (training-example gradients), "query" (measurement gradients).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator

import numpy as np
import torch

PURPOSES = ("fit", "train", "query")
FISHER_KINDS = ("mc", "empirical", "type2")


def example_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    """A CPU generator seeded by (seed, purpose, example index): the same draws in every pass, any batching."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, PURPOSES.index(purpose), int(index)]).generate_state(2)
    gen = torch.Generator()
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


@dataclass
class Draws:
    """A chunk of draws. ``example: (n,)`` global example index of each row, ``draw: (n,)`` draw index,
    ``weight``: 1/M (each row's share of its example's mean), ``data``: tensors with leading dim n (for a
    conditional diffusion task also each row's condition, under the model keyword it is passed as:
    ``tasks.conditioning.CONDITION_KEYS``). ``to`` moves every tensor to the device and casts floating ones to
    the model's dtype (integer labels and boolean masks keep theirs)."""
    example: torch.Tensor
    draw: torch.Tensor
    weight: float
    data: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.example.shape[0])

    def slice(self, start: int, stop: int) -> "Draws":
        return Draws(self.example[start:stop], self.draw[start:stop], self.weight,
                    {k: v[start:stop] for k, v in self.data.items()})

    def to(self, device: torch.device, dtype: torch.dtype) -> "Draws":
        def conv(v):
            return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        return Draws(self.example, self.draw, self.weight, {k: conv(v) for k, v in self.data.items()})


class Task(abc.ABC):
    """What a model family must provide. Subclasses implement ``rows``, ``forward``, ``train_loss``.

    ``seed`` seeds the draws of the train and query passes."""

    seed: int = 0

    @abc.abstractmethod
    def num_draws(self, purpose: str) -> int:
        """Default number of draws per example for a purpose."""

    @abc.abstractmethod
    def draws(self, batch, indices: torch.Tensor, purpose: str, *, num_draws: int, seed: int) -> Draws:
        """Expand a batch of examples (global indices ``indices: (B,)``) into B * num_draws rows, example-major."""

    @abc.abstractmethod
    def forward(self, model: torch.nn.Module, rows: Draws) -> torch.Tensor:
        """Network outputs f for every row: ``(n, *out_shape)``."""

    @abc.abstractmethod
    def train_loss(self, outputs: torch.Tensor, rows: Draws) -> torch.Tensor:
        """Per-draw training loss ``(n,)``; the per-example loss is its mean over draws."""

    def measurement(self, outputs: torch.Tensor, rows: Draws) -> torch.Tensor:
        """Per-draw measurement ``(n,)`` of a query; defaults to the training loss."""
        return self.train_loss(outputs, rows)

    @abc.abstractmethod
    def fisher_vectors(self, outputs: torch.Tensor, rows: Draws, fisher: str) -> Iterator[torch.Tensor]:
        """Vectors to backpropagate through f for curvature: their g g^T average to the loss Hessian (mc, type2)
        or are the loss gradient (empirical). Each has the shape of ``outputs``."""


class MSETask(Task):
    """Shared pieces of tasks whose per-draw loss is ``(1/D) ||target - f||^2`` (loss Hessian (2/D) I).

    Draws must hold ``target`` (same shape as f) and, for fisher="mc", ``xi`` (standard normal, same shape)."""

    @staticmethod
    def mse(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (outputs - target).pow(2).flatten(1).mean(dim=1)

    def fisher_vectors(self, outputs: torch.Tensor, rows: Draws, fisher: str) -> Iterator[torch.Tensor]:
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
        d = outputs[0].numel()
        if fisher == "mc":
            yield math.sqrt(2.0 / d) * rows.data["xi"].to(outputs.dtype)
        elif fisher == "empirical":
            yield (2.0 / d) * (outputs.detach() - rows.data["target"].to(outputs.dtype))
        else:  # type2: every column of the Hessian square root, sqrt(2/D) e_d
            for j in range(d):
                flat = torch.zeros_like(outputs).flatten(1)
                flat[:, j] = math.sqrt(2.0 / d)
                yield flat.view_as(outputs)
