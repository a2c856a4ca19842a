"""Baselines against slow references: explicit per-example gradients by autograd and dense projections."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kfac_influence.baselines import (KroneckerProjector, ProjectionConfig, TRAKConfig, dtrak_scores,
                                      embedding_similarity, gradient_similarity, journey_trak_scores, kernel_scores,
                                      projected_gradients, tracin_scores, trak_scores)
from kfac_influence.baselines.tasks import FixedTimestepTask, TrajectoryStepTask
from kfac_influence.baselines.trak import dtrak_timesteps, make_projector
from kfac_influence.capture import LayerCapture, select_layers
from kfac_influence.tasks import DiffusionTask

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


class TinyEps(nn.Module):
    """Conv (weight sharing over positions) + Linear layers, with and without bias; (x_t, t) -> eps."""

    def __init__(self):
        super().__init__()
        self.temb = nn.Linear(2, 3)
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        tt = t.to(x.dtype)[:, None] / 1000.0
        e = self.temb(torch.cat([tt.sin(), tt.cos()], 1))
        h = torch.tanh(self.c1(x) + e[:, :, None, None])
        return self.lin(self.c2(h))


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyEps().double()


def _data(n, seed):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def explicit_gradients(model, task, data, purpose, num_draws, output=None):
    """Reference: per-example gradients {layer: (N, d_out, d_in')} by autograd, one example and draw at a time,
    on the draws the task gives (mean over draws)."""
    mods = select_layers(model)
    specs = LayerCapture(mods).specs
    n = data[0].shape[0] if isinstance(data, tuple) else data.shape[0]
    out = {nm: torch.zeros((n,) + s.grad_shape, dtype=torch.float64) for nm, s in specs.items()}
    for i in range(n):
        batch = tuple(d[i:i + 1] for d in data) if isinstance(data, tuple) else data[i:i + 1]
        rows = task.draws(batch, torch.tensor([i]), purpose, num_draws=num_draws, seed=task.seed)
        for r in range(len(rows)):
            one = rows.slice(r, r + 1)
            f = task.forward(model, one)
            fn = output or (task.measurement if purpose == "query" else task.train_loss)
            val = fn(f, one).sum() * one.weight
            for nm, m in mods.items():
                params = [m.weight] + ([m.bias] if m.bias is not None else [])
                gs = torch.autograd.grad(val, params, retain_graph=True)
                g = gs[0].flatten(1)
                if m.bias is not None:
                    g = torch.cat([g, gs[1][:, None]], 1)
                out[nm][i] += g
    return out


def dense_project(proj, grads):
    return torch.cat([grads[nm].flatten(1) @ proj.dense_matrix(nm).T for nm in proj.specs], 1)


def test_kronecker_projection_equals_dense_kron_of_explicit_gradients():
    model = _model()
    task = DiffusionTask(BETAS, num_train_draws=3, num_query_draws=2, seed=4)
    data = _data(5, 1)
    proj = make_projector(model, TRAKConfig(projection=ProjectionConfig(dim_in=4, dim_out=2, seed=3)))
    assert proj.p_out["c2"] is None and proj.p_in["lin"] is not None  # d_out = 1 <= 2: not projected
    fast = projected_gradients(model, task, data, proj, purpose="train", draws_per_forward=4)  # chunks split examples
    ref = dense_project(proj, explicit_gradients(model, task, data, "train", 3))
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj.project_gradients(explicit_gradients(model, task, data, "train", 3)), ref)


def test_kronecker_projection_preserves_inner_products_in_expectation():
    """E[<Pu, Pv>] = <u, v>, like a dense Gaussian projection; checked over 400 seeds within 5 standard errors."""
    from kfac_influence.capture import LayerSpec
    spec = {"l": LayerSpec("l", "linear", 11, 7, True)}
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    u = u + 0.8 * v  # correlated
    vals = []
    for s in range(400):
        p = KroneckerProjector(spec, ProjectionConfig(dim_in=4, dim_out=3, seed=s))
        pu, pv = p.project_gradients({"l": torch.stack([u, v])})
        vals.append(float(pu @ pv))
    vals = torch.tensor(vals)
    exact = float((u * v).sum())
    assert abs(vals.mean() - exact) < 5 * vals.std() / math.sqrt(len(vals))
    dense_vals = []
    for s in range(400):
        p = torch.randn(12, 84, generator=torch.Generator().manual_seed(s), dtype=torch.float64) / math.sqrt(12)
        dense_vals.append(float((p @ u.flatten()) @ (p @ v.flatten())))
    dense_vals = torch.tensor(dense_vals)
    assert abs(dense_vals.mean() - exact) < 5 * dense_vals.std() / math.sqrt(len(dense_vals))


def _trak_reference(psi, phi, rho):
    f = phi.T @ phi / phi.shape[0]
    lam = rho * torch.trace(f) / f.shape[0]
    return psi @ torch.linalg.inv(f + lam * torch.eye(f.shape[0], dtype=f.dtype)) @ phi.T


def test_trak_matches_reference():
    model = _model(1)
    task = DiffusionTask(BETAS, num_train_draws=2, num_query_draws=3, seed=2)
    train, queries = _data(6, 2), _data(3, 3)
    cfg = TRAKConfig(projection=ProjectionConfig(dim_in=3, dim_out=2, seed=1), damping=0.05)
    s = trak_scores(model, task, queries, train, cfg, draws_per_forward=5)
    proj = make_projector(model, cfg)
    phi = dense_project(proj, explicit_gradients(model, task, train, "train", 2))
    psi = dense_project(proj, explicit_gradients(model, task, queries, "query", 3))
    torch.testing.assert_close(s.double(), _trak_reference(psi, phi, 0.05), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(kernel_scores(psi, phi, 0.05).double(), _trak_reference(psi, phi, 0.05),
                               rtol=2e-4, atol=1e-6)


def test_dtrak_uses_square_norm_at_fixed_timesteps():
    model = _model(2)
    train, queries = _data(5, 4), _data(2, 5)
    ts = dtrak_timesteps(4, 1000)
    assert ts == [125, 375, 625, 875]
    task = FixedTimestepTask(BETAS, ts, output="square_norm", num_train_draws=4, num_query_draws=4,
                             measurement="square_norm", seed=7)
    rows = task.draws(train[:2], torch.arange(2), "train", num_draws=4, seed=7)
    assert rows.data["t"].tolist() == ts * 2
    cfg = TRAKConfig(projection=ProjectionConfig(dim_in=3, dim_out=2, seed=0), damping=0.1)
    s = dtrak_scores(model, BETAS, queries, train, cfg, num_timesteps=4, seed=7, draws_per_forward=8)
    sq = lambda f, r: f.pow(2).flatten(1).mean(1)  # noqa: E731
    proj = make_projector(model, cfg)
    phi = dense_project(proj, explicit_gradients(model, task, train, "train", 4, output=sq))
    psi = dense_project(proj, explicit_gradients(model, task, queries, "query", 4, output=sq))
    torch.testing.assert_close(s.double(), _trak_reference(psi, phi, 0.1), rtol=2e-4, atol=1e-6)


def test_journey_trak_matches_reference():
    model = _model(3)
    train = _data(4, 6)
    timesteps = torch.tensor([900, 600, 300, 0])
    traj = _data(2 * 5, 7).view(2, 5, 1, 4, 4)
    cfg = TRAKConfig(projection=ProjectionConfig(dim_in=3, dim_out=2, seed=2), damping=0.1)
    s = journey_trak_scores(model, BETAS, traj, timesteps, train, cfg, steps=[0, 2], num_train_draws=2, seed=1)
    proj = make_projector(model, cfg)
    ref = 0
    for i in (0, 2):
        t = int(timesteps[i])
        qt = TrajectoryStepTask(BETAS, t)
        rows = qt.draws((traj[:, i], traj[:, -1]), torch.arange(2), "query", num_draws=1, seed=0)
        abar = float(torch.cumprod(1 - BETAS, 0)[t])
        torch.testing.assert_close(math.sqrt(abar) * traj[:, -1] + math.sqrt(1 - abar) * rows.data["target"],
                                   traj[:, i])
        tt = FixedTimestepTask(BETAS, [t], num_train_draws=2, num_query_draws=1, seed=1)
        phi = dense_project(proj, explicit_gradients(model, tt, train, "train", 2))
        psi = dense_project(proj, explicit_gradients(model, qt, (traj[:, i], traj[:, -1]), "query", 1))
        ref = ref + _trak_reference(psi, phi, 0.1)
    torch.testing.assert_close(s.double(), ref / 2, rtol=2e-4, atol=1e-6)


def test_gradient_dot_cosine_and_tracin():
    task = DiffusionTask(BETAS, num_train_draws=2, num_query_draws=2, seed=3)
    train, queries = _data(5, 8), _data(3, 9)
    m1, m2 = _model(4), _model(5)
    dot = gradient_similarity(m1, task, queries, train, draws_per_forward=3)  # groups of 1 example, 2 chunks
    tg = explicit_gradients(m1, task, train, "train", 2)
    qg = explicit_gradients(m1, task, queries, "query", 2)
    tflat = torch.cat([v.flatten(1) for v in tg.values()], 1)
    qflat = torch.cat([v.flatten(1) for v in qg.values()], 1)
    torch.testing.assert_close(dot.double(), qflat @ tflat.T, rtol=1e-5, atol=1e-8)
    cos = gradient_similarity(m1, task, queries, train, cosine=True)
    ref = F.normalize(qflat, dim=1) @ F.normalize(tflat, dim=1).T
    torch.testing.assert_close(cos.double(), ref, rtol=1e-5, atol=1e-6)
    tr = tracin_scores([(m1, 0.5), (m2, 2.0)], task, queries, train)
    ref2 = 0.5 * dot.double() + 2.0 * gradient_similarity(m2, task, queries, train).double()
    torch.testing.assert_close(tr.double(), ref2, rtol=1e-5, atol=1e-8)


def test_pixel_and_embedding_similarity():
    train, queries = _data(6, 10).float(), _data(2, 11).float()
    s = embedding_similarity(queries, train, batch_size=4)
    ref = F.normalize(queries.flatten(1), dim=1) @ F.normalize(train.flatten(1), dim=1).T
    torch.testing.assert_close(s, ref)
    enc = lambda x: x.mean(dim=(2, 3)) + torch.tensor([1.0])  # noqa: E731  (a user-supplied encoder)
    s2 = embedding_similarity(queries, train, enc)
    ref2 = F.normalize(enc(queries), dim=1) @ F.normalize(enc(train), dim=1).T
    torch.testing.assert_close(s2, ref2)
    assert torch.allclose(embedding_similarity(train, train).diagonal(), torch.ones(6))


def test_configs_validate():
    with pytest.raises(ValueError):
        TRAKConfig(damping_mode="bogus")
    with pytest.raises(ValueError):
        ProjectionConfig(dim_in=-1)
    with pytest.raises(ValueError):
        FixedTimestepTask(BETAS, [1000])
    with pytest.raises(ValueError):
        FixedTimestepTask(BETAS, [3], output="nope")


class TinyClassEps(TinyEps):
    """TinyEps with a class embedding added to the time embedding: ``(x_t, t, class_labels) -> eps``."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.emb = nn.Embedding(num_classes, 3)

    def forward(self, x, t, class_labels):
        tt = t.to(x.dtype)[:, None] / 1000.0
        e = self.temb(torch.cat([tt.sin(), tt.cos()], 1)) + self.emb(class_labels)
        h = torch.tanh(self.c1(x) + e[:, :, None, None])
        return self.lin(self.c2(h))


def _labelled_gradient(model, x_t, t, target, label):
    """{layer: (d_out, d_in')} of ``mean((target - model(x_t, t, label))^2)`` for one example, by autograd."""
    mods = select_layers(model)
    val = (target - model(x_t, t, class_labels=label)).pow(2).mean()
    out = {}
    for nm, m in mods.items():
        params = [m.weight] + ([m.bias] if m.bias is not None else [])
        gs = torch.autograd.grad(val, params, retain_graph=True)
        out[nm] = torch.cat([gs[0].flatten(1), gs[1][:, None]], 1) if m.bias is not None else gs[0].flatten(1)
    return out


def test_journey_trak_conditional_scores_each_query_under_its_class():
    """Class-conditional Journey-TRAK against an autograd reference that passes the labels itself: the query side
    is the loss at the trajectory state under the query's label (eps_hat computed here), the training side the
    loss at that t under each example's own label; other query labels give other scores."""
    torch.manual_seed(4)
    model = TinyClassEps().double()
    train, labels = _data(4, 12), torch.tensor([0, 2, 1, 2])
    timesteps = torch.tensor([900, 600, 300, 0])
    traj = _data(2 * 5, 13).view(2, 5, 1, 4, 4)
    qlabels = torch.tensor([1, 0])
    cfg = TRAKConfig(projection=ProjectionConfig(dim_in=3, dim_out=2, seed=2), damping=0.1)
    s = journey_trak_scores(model, BETAS, traj, timesteps, (train, labels), cfg, steps=[0, 2], num_train_draws=2,
                            seed=1, condition="class", query_condition=qlabels)
    proj = make_projector(model, cfg)
    abar_all = torch.cumprod(1 - BETAS, 0)
    ref = 0
    for i in (0, 2):
        t = int(timesteps[i])
        abar = float(abar_all[t])
        tt = FixedTimestepTask(BETAS, [t], num_train_draws=2, num_query_draws=1, seed=1)  # its noise only
        phi = {nm: torch.zeros(4, *sp.grad_shape, dtype=torch.float64) for nm, sp in proj.specs.items()}
        for n in range(4):
            rows = tt.draws(train[n:n + 1], torch.tensor([n]), "train", num_draws=2, seed=1)
            for r in range(2):
                g = _labelled_gradient(model, rows.data["x_t"][r:r + 1], rows.data["t"][r:r + 1],
                                       rows.data["target"][r:r + 1], labels[n:n + 1])
                for nm in phi:
                    phi[nm][n] += g[nm] / 2
        psi = {nm: torch.zeros(2, *sp.grad_shape, dtype=torch.float64) for nm, sp in proj.specs.items()}
        for q in range(2):
            xt, x0 = traj[q:q + 1, i], traj[q:q + 1, -1]
            eps = (xt - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            g = _labelled_gradient(model, xt, torch.tensor([t]), eps, qlabels[q:q + 1])
            for nm in psi:
                psi[nm][q] = g[nm]
        ref = ref + _trak_reference(dense_project(proj, psi), dense_project(proj, phi), 0.1)
    torch.testing.assert_close(s.double(), ref / 2, rtol=2e-4, atol=1e-6)
    other = journey_trak_scores(model, BETAS, traj, timesteps, (train, labels), cfg, steps=[0, 2],
                                num_train_draws=2, seed=1, condition="class", query_condition=(qlabels + 1) % 3)
    assert not torch.allclose(other, s, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="together"):
        journey_trak_scores(model, BETAS, traj, timesteps, (train, labels), cfg, condition="class")
    # D-TRAK takes the condition too (fixed-timestep task with class labels on both sides)
    d = dtrak_scores(model, BETAS, (traj[:, -1], qlabels), (train, labels), cfg, num_timesteps=2, seed=3,
                     condition="class")
    d_other = dtrak_scores(model, BETAS, (traj[:, -1], (qlabels + 1) % 3), (train, labels), cfg, num_timesteps=2,
                           seed=3, condition="class")
    assert d.shape == (2, 4) and torch.isfinite(d).all() and not torch.allclose(d, d_other, rtol=1e-3, atol=1e-6)
