"""One stage of the peer benchmark, in its own process (run by ``bench/peers.py``); prints one JSON line.

    python bench/peers_stage.py --lib ours --stage factors --work /tmp/peers16 --size 16

Every library sees the same ``UNet2DModel`` (preset ``digits-tiny`` widened to 3 channels: channels 32/64, one
ResNet layer per block, attention at the coarse level), the same images, the same (t, eps) draws (made by our
``DiffusionTask``: "fit" draws for the curvature, "train" draws for training gradients, "query" draws for the
queries), the same per-draw loss (1/D)||eps - f||^2, the same Fisher kind, EK-FAC with the expand approximation,
the same tracked layers (every Linear and Conv2d) and the same damping (per layer 0.1 * mean(Lambda): kronfluence's
default heuristic; ``damping_mode="relative"`` for us; applied by hand to curvlinops' factors).

Stages: ``factors`` (covariances, eigendecomposition, eigenvalue correction; saved to ``--work``), ``scores``
(load the factors, query gradients, one pass over the training draws, (Q, N) scores saved to ``--work``),
``floor`` (one plain forward + backward pass with parameter gradients over the training draws).
Timed: the stage itself, not imports or model construction. Memory: peak RSS of the process (ru_maxrss) and the
RSS just before the stage starts.

curvlinops has no scoring stage of its own (the paper's code scores with its own loop); ``curvlinops/scores``
forms per-example gradients with ``torch.func.vmap`` in batches and preconditions with curvlinops' eigenbases and
corrected eigenvalues, as a curvlinops user would.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

LIBS = ("ours", "kronfluence", "kronfluence_kk", "curvlinops", "plain")
STAGES = ("factors", "scores", "floor")
RHO = 0.1  # relative damping: lambda = RHO * mean(Lambda) per layer (kronfluence's heuristic default)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Setup:
    """Model, data and draws shared by every library."""

    def __init__(self, size: int, n: int, q: int, draws: int, seed: int = 0):
        from kfac_influence.diffusion.models import build_model, make_scheduler
        from kfac_influence.tasks import DiffusionTask

        self.model = build_model("digits-tiny", seed=seed, in_channels=3, sample_size=size).float().eval()
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
        self.queries = torch.rand(q, 3, size, size, generator=gen) * 2 - 1
        self.task = DiffusionTask(make_scheduler(), num_train_draws=draws, num_query_draws=draws, seed=seed)
        self.m, self.n, self.q, self.seed = draws, n, q, seed
        self.D = 3 * size * size

    def rows(self, purpose: str):
        """(x_t, t, eps) of every draw, example-major, as our pipeline makes them."""
        data = self.queries if purpose == "query" else self.x
        r = self.task.draws(data, torch.arange(data.shape[0]), purpose, num_draws=self.m, seed=self.seed)
        return r.data["x_t"].float(), r.data["t"], r.data["target"].float()

    def fold(self, s: torch.Tensor) -> torch.Tensor:
        """Draw-level scores (Q*M, N*M) -> example-level (Q, N): the mean over draw pairs (gradients are means)."""
        return s.reshape(self.q, self.m, self.n, self.m).mean(dim=(1, 3))


# ------------------------------------------------------------------------------------------------------ ours
def ours(st: Setup, stage: str, work: Path, fisher: str, batch: int):
    from kfac_influence import CurvatureConfig, fit_curvature, load_curvature, pairwise_scores

    path = work / "ours_curvature.safetensors"
    if stage == "factors":
        cfg = CurvatureConfig(method="ekfac", approx="expand", fisher=fisher, seed=st.seed)
        fit_curvature(st.model, st.task, st.x, cfg, draws_per_forward=batch, progress=False).save(path)
        return None
    curv = load_curvature(path, st.model)
    return pairwise_scores(st.model, st.task, curv, st.queries, st.x, draws_per_forward=batch, progress=False,
                           damping=RHO, damping_mode="relative")


# ----------------------------------------------------------------------------------------------- kronfluence
def kronfluence_task(D: int, fisher: str):
    from kronfluence.task import Task

    class DiffusionLoss(Task):
        """Per-draw loss (1/D)||eps - f||^2 summed over the batch (kronfluence wants a sum); MC Fisher: targets
        sampled from N(f, D/2) so that the backpropagated vector is sqrt(2/D) xi, as ours."""

        def compute_train_loss(self, batch, model, sample=False):
            x_t, t, eps = batch
            f = model(x_t, t).sample
            if sample:
                with torch.no_grad():
                    eps = f.detach() + (D / 2) ** 0.5 * torch.randn_like(f)
            return (f - eps).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model):
            x_t, t, eps = batch
            return (model(x_t, t).sample - eps).pow(2).flatten(1).mean(1).sum()

    return DiffusionLoss()


def kronfluence(st: Setup, stage: str, work: Path, fisher: str, batch: int, adapter: bool = False):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    task = kronfluence_task(st.D, fisher)
    model = prepare_model(st.model, task)
    analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, log_level=logging.ERROR,
                        output_dir=str(work / ("kf_kk" if adapter else "kf")))
    ctx = None
    if adapter:
        from kfac_kernels.integrations.kronfluence import use_kfac_kernels
        ctx = use_kfac_kernels()
        ctx.__enter__()
    try:
        if stage == "factors":
            args = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical")
            analyzer.fit_all_factors("ekfac", TensorDataset(*st.rows("fit")), per_device_batch_size=batch,
                                     factor_args=args, overwrite_output_dir=True)
            return None
        analyzer.compute_pairwise_scores("s", "ekfac", TensorDataset(*st.rows("query")),
                                         TensorDataset(*st.rows("train")), per_device_query_batch_size=st.q * st.m,
                                         per_device_train_batch_size=batch,
                                         score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        return st.fold(analyzer.load_pairwise_scores("s")["all_modules"])
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------ curvlinops
class Flat(torch.nn.Module):
    """curvlinops wants (B, D) outputs and one input object per batch."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, X):
        return self.unet(X["x_t"], X["t"]).sample.flatten(1)


def tracked(st: Setup):
    from kfac_influence.capture import select_layers
    return select_layers(st.model)


def curvlinops(st: Setup, stage: str, work: Path, fisher: str, batch: int):
    path = work / "curvlinops_factors.pt"
    modules = tracked(st)
    if stage == "factors":
        from curvlinops import EKFACLinearOperator

        x_t, t, eps = st.rows("fit")
        data = [({"x_t": x_t[s:s + batch], "t": t[s:s + batch]}, eps[s:s + batch].flatten(1))
                for s in range(0, len(t), batch)]
        params = [p for m in modules.values() for p in m.parameters(recurse=False)]
        op = EKFACLinearOperator(Flat(st.model), torch.nn.MSELoss(reduction="mean"), params, data,
                                 fisher_type=fisher, kfac_approx="expand", separate_weight_and_bias=False,
                                 check_deterministic=False, num_data=len(t), num_per_example_loss_terms=1,
                                 batch_size_fn=lambda X: X["x_t"].shape[0])
        op.compute_kronecker_factors()
        op.compute_eigenvalue_correction()
        out = {}
        for name in modules:
            key = f"unet.{name}"
            out[name] = (op._input_covariances_eigenvectors[key], op._gradient_covariances_eigenvectors[key],
                         op._corrected_eigenvalues[key])
        torch.save(out, path)
        return None
    from torch.func import functional_call, grad, vmap

    factors = torch.load(path)
    model = st.model
    names = [f"{n}.{pn}" for n, m in modules.items() for pn, _ in m.named_parameters(recurse=False)]
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}

    def loss(p, x, t, e):
        f = functional_call(model, p, (x[None], t[None]), strict=False).sample
        return (f - e[None]).pow(2).mean()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))

    def layer_grads(x, t, e):
        g = per_example(params, x, t, e)
        out = {}
        for name, m in modules.items():
            w = g[f"{name}.weight"].flatten(2)
            out[name] = torch.cat([w, g[f"{name}.bias"][:, :, None]], dim=2) if m.bias is not None else w
        return out

    xq, tq, eq = st.rows("query")
    qg = layer_grads(xq, tq, eq)
    pre = {}
    for name, v in qg.items():
        qa, qgv, lam = factors[name]
        rot = qgv.T @ v @ qa
        pre[name] = (qgv @ (rot / (lam + RHO * lam.mean())) @ qa.T).flatten(1)
    x_t, t, eps = st.rows("train")
    scores = torch.zeros(len(tq), len(t))
    for s in range(0, len(t), batch):
        g = layer_grads(x_t[s:s + batch], t[s:s + batch], eps[s:s + batch])
        for name, v in g.items():
            scores[:, s:s + batch] += pre[name] @ v.flatten(1).T
    return st.fold(scores)


# ---------------------------------------------------------------------------------------------------- floor
def floor(st: Setup, batch: int):
    x_t, t, eps = st.rows("train")
    for s in range(0, len(t), batch):
        f = st.model(x_t[s:s + batch], t[s:s + batch]).sample
        torch.nn.functional.mse_loss(f, eps[s:s + batch]).backward()
    st.model.zero_grad(set_to_none=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", choices=LIBS, required=True)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--draws", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help="draws per forward pass, every library")
    p.add_argument("--fisher", choices=("mc", "empirical"), default="mc")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    st = Setup(a.size, a.n, a.queries, a.draws)
    torch.manual_seed(1234)  # kronfluence / curvlinops MC draws
    base = rss_mb()
    t0 = time.perf_counter()
    if a.stage == "floor":
        floor(st, a.batch)
        scores = None
    elif a.lib == "ours":
        scores = ours(st, a.stage, a.work, a.fisher, a.batch)
    elif a.lib in ("kronfluence", "kronfluence_kk"):
        scores = kronfluence(st, a.stage, a.work, a.fisher, a.batch, adapter=a.lib == "kronfluence_kk")
    elif a.lib == "curvlinops":
        scores = curvlinops(st, a.stage, a.work, a.fisher, a.batch)
    else:
        raise SystemExit(f"--lib {a.lib} has no stage {a.stage}")
    wall = time.perf_counter() - t0
    if scores is not None:
        torch.save(scores.detach().float().cpu(), a.work / f"{a.lib}_scores.pt")
    print(json.dumps({"lib": a.lib, "stage": a.stage, "size": a.size, "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
                      "base_rss_mb": base}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
