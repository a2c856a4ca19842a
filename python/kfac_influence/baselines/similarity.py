"""Similarity baselines: gradient dot product and cosine, TracIn, and pixel / embedding cosine similarity.

Gradients are exact per-example gradients (mean over each example's draws of the training loss / the query's
measurement), formed one group of examples at a time; dot products are summed over the tracked layers.
Sign convention as for influence: a larger score means removing the example is predicted to raise the query's
measurement (a training gradient aligned with the query's loss gradient lowers that loss when trained on).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..capture import select_layers
from ..data_iter import get_batch, num_examples
from ..scoring.gradients import example_gradients
from ..tasks.base import Task
from .gradients import iter_example_gradients


def gradient_similarity(model: nn.Module, task: Task, queries: Any, train: Any, *, cosine: bool = False,
                        modules: Optional[Sequence[str]] = None, draws_per_forward: int = 64,
                        progress: bool = False) -> torch.Tensor:
    """``(Q, N)``: ``<grad m_q, grad l_n>`` or their cosine (float64 accumulation, float32 result)."""
    mods = select_layers(model, modules)
    qg = example_gradients(model, task, mods, queries, purpose="query", draws_per_forward=draws_per_forward)
    qg = {k: v.double() for k, v in qg.items()}
    q = next(iter(qg.values())).shape[0]
    n = num_examples(train)
    dots = torch.zeros(q, n, dtype=torch.float64)
    norms = torch.zeros(n, dtype=torch.float64)
    for idx, grads in iter_example_gradients(model, task, mods, train, purpose="train", draws_per_forward=draws_per_forward,
                                             progress=progress):
        for name, v in grads.items():
            v = v.double().flatten(1)
            dots[:, idx] += (qg[name].flatten(1) @ v.T).cpu()
            norms[idx] += v.pow(2).sum(1).cpu()
    if cosine:
        qn = sum(v.flatten(1).pow(2).sum(1) for v in qg.values()).sqrt().cpu()
        dots = dots / (qn[:, None] * norms.sqrt()[None, :]).clamp_min(1e-300)
    return dots.float()


def tracin_scores(checkpoints: Sequence[Tuple[nn.Module, float]], task: Task, queries: Any, train: Any, *,
                  modules: Optional[Sequence[str]] = None, draws_per_forward: int = 64,
                  progress: bool = False) -> torch.Tensor:
    """TracIn-CP: ``sum_c eta_c <grad m_q(theta_c), grad l_n(theta_c)>`` over ``(model, eta)`` checkpoints."""
    if not checkpoints:
        raise ValueError("TracIn needs at least one (model, learning_rate) checkpoint")
    total = None
    for model, eta in checkpoints:
        s = gradient_similarity(model, task, queries, train, modules=modules, draws_per_forward=draws_per_forward,
                                progress=progress).double() * float(eta)
        total = s if total is None else total + s
    return total.float()


def embedding_similarity(queries: Any, train: Any, encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         *, batch_size: int = 256) -> torch.Tensor:
    """Cosine similarity ``(Q, N)`` of ``encoder(images)`` (default: the flattened pixels, i.e. pixel cosine).

    ``encoder``: any callable mapping a batch of images ``(B, C, H, W)`` to features ``(B, ...)`` (e.g. a CLIP
    image tower); it is called under ``torch.no_grad`` on ``batch_size`` images at a time."""
    enc = encoder or (lambda x: x)

    def feats(data):
        n = num_examples(data)
        out = []
        with torch.no_grad():
            for s in range(0, n, batch_size):
                b = get_batch(data, torch.arange(s, min(n, s + batch_size)))
                b = b[0] if isinstance(b, (tuple, list)) else b
                out.append(enc(b).reshape(b.shape[0], -1).double())
        f = torch.cat(out)
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-300)

    return (feats(queries) @ feats(train).T).float()


pixel_similarity = embedding_similarity
