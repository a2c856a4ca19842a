"""TRAK, D-TRAK and Journey-TRAK on Kronecker-projected gradients.

All three score ``S[q, n] = psi_q^T (F + lambda I)^-1 phi_n`` with ``phi_n`` the projected per-example gradient of
the training-side output and ``psi_q`` that of the query-side output, ``F = (1/N) sum_n phi_n phi_n^T`` (the
empirical Fisher in the projected space) and damping ``lambda`` absolute or relative (``rho * trace(F) / k``).
Sign: same as the influence scores (positive = removing the example is predicted to raise the query's
measurement) whenever both sides are loss gradients (TRAK, Journey-TRAK). D-TRAK differentiates the square norm on
both sides, as its authors do; its sign is then a heuristic.

* TRAK: both sides the diffusion loss, uniform t, M draws.
* D-TRAK (Zheng et al. 2024): both sides ``(1/D)||f||^2`` at K fixed timesteps (evenly spaced), one noise each.
* Journey-TRAK (Georgiev et al. 2023): per sampling step t of a recorded trajectory, the query side is the loss at
  the trajectory state (``TrajectoryStepTask``), the training side the loss at that t; one kernel per step; the
  score is the mean over the chosen steps.

Conditional models: pass ``condition`` ("class" / "text") and the data in its conditional form (training data
``(images, labels)`` etc.; ``trak_scores`` takes a conditional task); each query is scored under the condition it
was generated with, each training example under its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..capture import LayerCapture, select_layers
from ..curvature.damping import DAMPING_MODES
from ..tasks.base import Task
from ..tasks.diffusion import DiffusionTask
from .gradients import projected_gradients
from .projection import KroneckerProjector, ProjectionConfig
from .tasks import FixedTimestepTask, TrajectoryStepTask


@dataclass(frozen=True)
class TRAKConfig:
    """projection: Kronecker projection sizes and seed; damping: lambda, or rho with lambda = rho * trace(F)/k
    (damping_mode "relative"); modules: fnmatch patterns of tracked layers (None: all Linear/Conv2d)."""
    projection: ProjectionConfig = ProjectionConfig()
    damping: float = 1e-2
    damping_mode: str = "relative"
    modules: Optional[Sequence[str]] = None

    def __post_init__(self):
        if self.damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {self.damping_mode!r}")
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")


def make_projector(model: nn.Module, config: TRAKConfig) -> KroneckerProjector:
    modules = select_layers(model, config.modules)
    return KroneckerProjector(LayerCapture(modules).specs, config.projection)


def kernel_scores(psi: torch.Tensor, phi: torch.Tensor, damping: float, mode: str = "relative") -> torch.Tensor:
    """``psi (F + lambda I)^-1 phi^T`` with ``F = phi^T phi / N``: ``(Q, k), (N, k) -> (Q, N)`` (float64 solve)."""
    phi64, psi64 = phi.double(), psi.double()
    n, k = phi64.shape
    f = phi64.T @ phi64 / n
    lam = damping * float(torch.trace(f)) / k if mode == "relative" else float(damping)
    if lam <= 0:
        lam = 1e-12 * max(1.0, float(torch.trace(f)) / k)
    sol = torch.linalg.solve(f + lam * torch.eye(k, dtype=torch.float64, device=f.device), phi64.T)
    return (psi64 @ sol).float()


def trak_scores(model: nn.Module, task: Task, queries: Any, train: Any, config: TRAKConfig = TRAKConfig(), *,
                draws_per_forward: int = 64, progress: bool = False, train_output=None, query_output=None,
                return_features: bool = False):
    """TRAK scores ``(Q, N)`` with ``task``'s training loss (train side) and measurement (query side)."""
    proj = make_projector(model, config)
    phi = projected_gradients(model, task, train, proj, purpose="train", draws_per_forward=draws_per_forward,
                              output=train_output, progress=progress)
    psi = projected_gradients(model, task, queries, proj, purpose="query", draws_per_forward=draws_per_forward,
                              output=query_output, progress=progress)
    s = kernel_scores(psi, phi, config.damping, config.damping_mode)
    return (s, phi, psi) if return_features else s


def dtrak_timesteps(num_timesteps: int, T: int) -> list:
    """K evenly spaced timesteps in [0, T): ``round((i + 0.5) T / K)``."""
    return [min(T - 1, int((i + 0.5) * T / num_timesteps)) for i in range(num_timesteps)]


def dtrak_scores(model: nn.Module, scheduler, queries: Any, train: Any, config: TRAKConfig = TRAKConfig(), *,
                 num_timesteps: int = 10, seed: int = 0, draws_per_forward: int = 64, progress: bool = False,
                 condition=None):
    """D-TRAK scores ``(Q, N)``: square-norm output on both sides at ``num_timesteps`` fixed timesteps.
    ``condition``: as for ``DiffusionTask`` (queries and train data then carry their conditions)."""
    T = DiffusionTask(scheduler, num_train_draws=1, num_query_draws=1).T
    ts = dtrak_timesteps(num_timesteps, T)
    task = FixedTimestepTask(scheduler, ts, output="square_norm", num_train_draws=len(ts),
                             num_query_draws=len(ts), measurement="square_norm", seed=seed, condition=condition)
    return trak_scores(model, task, queries, train, config, draws_per_forward=draws_per_forward, progress=progress)


def journey_trak_scores(model: nn.Module, scheduler, trajectory: torch.Tensor, timesteps: torch.Tensor, train: Any,
                        config: TRAKConfig = TRAKConfig(), *, steps: Optional[Sequence[int]] = None,
                        num_steps: int = 10, num_train_draws: int = 4, seed: int = 0, draws_per_forward: int = 64,
                        progress: bool = False, condition=None, query_condition=None) -> torch.Tensor:
    """Journey-TRAK scores ``(Q, N)`` averaged over sampling steps.

    trajectory: ``(Q, S + 1, C, H, W)`` (``[:, i]`` is the state at ``timesteps[i]``, ``[:, -1]`` the image);
    timesteps: ``(S,)`` decreasing; steps: indices i into the S sampling steps (default: ``num_steps`` evenly
    spaced ones); num_train_draws: noise draws per training example at each step's t.
    condition: None, "class", "text" or a ``Conditioning``; then ``train`` carries the training conditions
    (``(images, labels)``, ...) and ``query_condition`` the condition each trajectory was sampled with: labels
    ``(Q,)``, or embeddings ``(Q, L, E)`` or a tuple ``(embeddings, mask (Q, L))``."""
    if (condition is None) != (query_condition is None):
        raise ValueError("journey_trak_scores: pass condition and query_condition together (a conditional model's "
                         "trajectories are scored under the condition they were sampled with)")
    qcond = () if query_condition is None else (
        tuple(query_condition) if isinstance(query_condition, (tuple, list)) else (query_condition,))
    timesteps = torch.as_tensor(timesteps, dtype=torch.long)
    if trajectory.dim() != 5 or trajectory.shape[1] != timesteps.numel() + 1:
        raise ValueError("trajectory must be (Q, S + 1, C, H, W) with S = len(timesteps)")
    S = timesteps.numel()
    if steps is None:
        steps = sorted({min(S - 1, int((i + 0.5) * S / num_steps)) for i in range(num_steps)})
    proj = make_projector(model, config)
    x0 = trajectory[:, -1]
    total = None
    for i in steps:
        t = int(timesteps[i])
        qtask = TrajectoryStepTask(scheduler, t, condition=condition)
        ttask = FixedTimestepTask(scheduler, [t], num_train_draws=num_train_draws, num_query_draws=1, seed=seed,
                                  condition=condition)
        phi = projected_gradients(model, ttask, train, proj, purpose="train", draws_per_forward=draws_per_forward,
                                  progress=progress)
        psi = projected_gradients(model, qtask, (trajectory[:, i], x0, *qcond), proj, purpose="query",
                                  draws_per_forward=draws_per_forward, progress=progress)
        s = kernel_scores(psi, phi, config.damping, config.damping_mode)
        total = s if total is None else total + s
    return total / len(steps)
