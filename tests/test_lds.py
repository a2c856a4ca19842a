"""LDS machinery: statistics, subsets, sign convention, a synthetic case with a known answer, resume, retrain-top,
and the variance-reduced draws."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from kfac_influence import CurvatureConfig, fit_curvature, pairwise_scores
from kfac_influence.evaluation import (LDSConfig, LDSRun, RetrainTopConfig, lds, make_subsets, oracle_ceiling,
                                       removed_score_sums, retrain_top, spearman_rows, task_measurements)
from kfac_influence.evaluation.retrain_top import top_indices
from kfac_influence.tasks import DiffusionTask, RegressionTask


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(6, 20)).astype(float)  # many ties
    y = x + rng.normal(size=x.shape)
    ours = spearman_rows(x, y)
    ref = [stats.spearmanr(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), np.arange(5.0)[None]))[0]


def test_subsets_are_seeded_sized_and_prefix_stable():
    cfg = LDSConfig(num_subsets=5, num_seeds=1, alpha=0.3, seed=4)
    keep = make_subsets(20, cfg)
    assert keep.shape == (5, 20) and (keep.sum(1) == 6).all()
    assert torch.equal(keep, make_subsets(20, cfg))
    more = make_subsets(20, LDSConfig(num_subsets=8, num_seeds=1, alpha=0.3, seed=4))
    assert torch.equal(more[:5], keep)
    assert not torch.equal(keep, make_subsets(20, LDSConfig(num_subsets=5, num_seeds=1, alpha=0.3, seed=5)))
    with pytest.raises(ValueError):
        LDSConfig(alpha=1.0)


def test_removed_sums_and_sign_convention():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 10, generator=g, dtype=torch.float64)
    keep = make_subsets(10, LDSConfig(num_subsets=12, num_seeds=1))
    pred = removed_score_sums(scores, keep)
    manual = torch.stack([torch.stack([scores[q][~keep[j]].sum() for j in range(12)]) for q in range(3)])
    torch.testing.assert_close(pred, manual)
    # ground truth that rises with the removed examples' scores (a positive score = removing raises the
    # measurement): LDS = +1; minus the scores: -1; the kept sum ranks the other way round
    truth = 5.0 + 2.0 * pred + 0.1 * pred ** 3
    assert lds(scores, keep, truth).mean == pytest.approx(1.0)
    assert lds(-scores, keep, truth).mean == pytest.approx(-1.0)
    kept = scores.double() @ keep.double().T
    assert np.allclose(spearman_rows(kept.numpy(), truth.numpy()), -1.0)
    # per-seed ground truth (K, Q, M) is averaged over seeds
    assert lds(scores, keep, torch.stack([truth, truth])).mean == pytest.approx(1.0)


def test_oracle_ceiling_formula():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 15))
    per_seed = torch.tensor(np.stack([base + 0.5 * rng.normal(size=base.shape) for _ in range(3)]))
    res = oracle_ceiling(per_seed)
    manual = np.mean([spearman_rows(per_seed[k].numpy(),
                                    per_seed[[i for i in range(3) if i != k]].mean(0).numpy()) for k in range(3)], 0)
    np.testing.assert_allclose(res.per_query, manual)
    assert oracle_ceiling(torch.stack([per_seed[0]] * 2)).mean == pytest.approx(1.0)
    with pytest.raises(ValueError):
        oracle_ceiling(per_seed[:1])


# ---- a linear regression: exact retraining, exact GGN influence -> LDS near 1 -------------------------------
def _regression(n=60, d=5, nq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    x = torch.randn(n + nq, d, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n + nq, 1, generator=g, dtype=torch.float64)
    return (x[:n], y[:n]), (x[n:], y[n:])


RIDGE = 1e-3


def _fit_linear(x, y, ridge=RIDGE):
    """argmin (1/n) sum (w^T x + b - y)^2 + ridge |w|^2, exactly."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    reg = ridge * torch.eye(xa.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0
    sol = torch.linalg.solve(xa.T @ xa / len(x) + reg, xa.T @ y / len(x))
    m = nn.Linear(x.shape[1], 1).double()
    with torch.no_grad():
        m.weight.copy_(sol[:-1].T)
        m.bias.copy_(sol[-1])
    return m


def test_lds_near_one_on_linear_regression(tmp_path):
    train, queries = _regression()
    calls = []

    def train_fn(idx, seed):
        calls.append(int(seed))
        return _fit_linear(train[0][idx], train[1][idx])

    task = RegressionTask()
    # alpha = 0.9: removing 10% keeps the first-order (influence) prediction of the exactly retrained model
    # accurate, so the LDS must be near 1 (with 50% subsets the quadratic terms pull it to ~0.85 here)
    run = LDSRun(tmp_path / "lds", 60, LDSConfig(num_subsets=30, num_seeds=2, alpha=0.9), train_fn,
                 build_fn=lambda: nn.Linear(5, 1).double(), key="linreg")
    run.retrain(progress=False)
    assert sorted(set(calls)) == [0, 1] and len(calls) == 60
    truth = run.measure("gt", lambda m: task_measurements(m, task, queries), progress=False)["gt"]
    assert truth.shape == (2, 8, 30)
    # deterministic training: the two seeds agree exactly, so the oracle ceiling is 1
    assert run.oracle(truth).mean == pytest.approx(1.0)
    full = _fit_linear(*train)
    curv = fit_curvature(full, task, train, CurvatureConfig(method="kfac", fisher="type2", dtype=torch.float64),
                         progress=False)
    scores = pairwise_scores(full, task, curv, queries, train, progress=False, damping=2 * RIDGE)
    res = run.lds(scores, truth)
    assert res.mean > 0.9 and res.num_valid == 8
    assert run.lds(-scores, truth).mean < -0.9  # the sign matters
    noise = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert abs(run.lds(noise, truth).mean) < 0.3


def test_lds_run_resumes_after_interruption(tmp_path):
    train, queries = _regression(n=20, nq=3, seed=2)
    task = RegressionTask()
    cfg = LDSConfig(num_subsets=4, num_seeds=2, seed=1)

    def make_train_fn(log, fail_after=None):
        def fn(idx, seed):
            if fail_after is not None and len(log) >= fail_after:
                raise KeyboardInterrupt("simulated crash")
            log.append((tuple(idx.tolist()), seed))
            return _fit_linear(train[0][idx], train[1][idx]) if seed == 0 else \
                _fit_linear(train[0][idx], train[1][idx], ridge=0.1)
        return fn

    build = lambda: nn.Linear(5, 1).double()  # noqa: E731
    measure = lambda m: task_measurements(m, task, queries)  # noqa: E731
    ref_log = []
    ref = LDSRun(tmp_path / "ref", 20, cfg, make_train_fn(ref_log), build, key="k")
    ref_truth = ref.measure("gt", measure, progress=False)["gt"]

    log1 = []
    run = LDSRun(tmp_path / "run", 20, cfg, make_train_fn(log1, fail_after=3), build, key="k")
    with pytest.raises(KeyboardInterrupt):
        run.retrain(progress=False)
    assert len(run.missing_models()) == 5
    # measurements interrupted half-way too
    count = {"n": 0}

    def flaky(m):
        count["n"] += 1
        if count["n"] == 3:
            raise RuntimeError("simulated crash while measuring")
        return measure(m)
    with pytest.raises(RuntimeError):
        run.measure("gt", flaky, progress=False)
    log2 = []
    run2 = LDSRun(tmp_path / "run", 20, cfg, make_train_fn(log2), build, key="k")
    truth = run2.measure("gt", measure, progress=False)["gt"]
    assert len(log1) + len(log2) == 8 and set(log1).isdisjoint(log2)
    torch.testing.assert_close(truth, ref_truth)
    assert torch.equal(run2.keep, ref.keep)
    with pytest.raises(ValueError, match="different"):
        LDSRun(tmp_path / "run", 20, LDSConfig(num_subsets=5, num_seeds=2, seed=1), make_train_fn([]), build, key="k")
    with pytest.raises(ValueError, match="different key"):
        LDSRun(tmp_path / "run", 20, cfg, make_train_fn([]), build, key="other")


def test_parallel_retraining_matches_serial(tmp_path):
    train, queries = _regression(n=16, nq=2, seed=5)
    cfg = LDSConfig(num_subsets=3, num_seeds=2)
    fn = lambda idx, seed: _fit_linear(train[0][idx], train[1][idx])  # noqa: E731
    build = lambda: nn.Linear(5, 1).double()  # noqa: E731
    a = LDSRun(tmp_path / "a", 16, cfg, fn, build)
    a.retrain(num_workers=2, progress=False)
    assert not a.missing_models()
    b = LDSRun(tmp_path / "b", 16, cfg, fn, build)
    b.retrain(progress=False)
    m = lambda mod: task_measurements(mod, RegressionTask(), queries)  # noqa: E731
    torch.testing.assert_close(a.measure("x", m, progress=False)["x"], b.measure("x", m, progress=False)["x"])


def test_retrain_top_removes_the_right_examples_and_resumes(tmp_path):
    train, queries = _regression(n=40, nq=3, seed=7)
    task = RegressionTask()
    full = _fit_linear(*train)
    curv = fit_curvature(full, task, train, CurvatureConfig(method="kfac", fisher="type2", dtype=torch.float64),
                         progress=False)
    scores = pairwise_scores(full, task, curv, queries, train, progress=False, damping=2 * RIDGE)
    seen = []

    def train_fn(idx, seed):
        seen.append(set(idx.tolist()))
        return _fit_linear(train[0][idx], train[1][idx])
    measure = lambda m: task_measurements(m, task, queries)  # noqa: E731
    cfg = RetrainTopConfig(percents=(10.0,), num_seeds=1)
    res = retrain_top(tmp_path / "rt", scores, train_fn, measure, cfg, progress=False)
    assert len(seen) == 1 + 2 * 3
    top = top_indices(scores, 4)
    assert set(range(40)) - seen[1] == set(top[0].tolist())  # first job after "full": top for query 0
    # removing the examples predicted to raise the query's loss raises it more than random removal
    assert res.difference[10.0].mean > 0 and res.top[10.0].mean > 0
    again = retrain_top(tmp_path / "rt", scores, train_fn, measure, cfg, progress=False)
    assert len(seen) == 7 and again.top[10.0].mean == res.top[10.0].mean
    assert "top - random" in res.table()


# ---- variance-reduced draws -----------------------------------------------------------------------------
def test_stratified_antithetic_draws():
    betas = torch.linspace(1e-4, 0.02, 1000)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = DiffusionTask(betas, stratified=True, antithetic=True, num_train_draws=8)
    rows = t.draws(x, torch.arange(3), "fit", num_draws=8, seed=0)
    ts = rows.data["t"].view(3, 8)
    eps = rows.data["target"].view(3, 8, -1)
    assert torch.equal(ts[:, 0::2], ts[:, 1::2])
    torch.testing.assert_close(eps[:, 0::2], -eps[:, 1::2])
    torch.testing.assert_close(rows.data["xi"].view(3, 8, -1)[:, 0::2], -rows.data["xi"].view(3, 8, -1)[:, 1::2])
    assert all(sorted((ts[i, 0::2] // 250).tolist()) == [0, 1, 2, 3] for i in range(3))  # one pair per stratum
    abar = t.alphas_cumprod[rows.data["t"]].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x.repeat_interleave(8, 0) + (1 - abar).sqrt() * rows.data["target"]
    torch.testing.assert_close(rows.data["x_t"], xt)
    # same draws for every call (seeded per example), and a uniform marginal over many examples
    torch.testing.assert_close(t.draws(x, torch.arange(3), "fit", num_draws=8, seed=0).data["x_t"], rows.data["x_t"])
    s = DiffusionTask(betas, stratified=True, num_train_draws=10)
    many = s.draws(torch.zeros(400, 1, 2, 2), torch.arange(400), "train", num_draws=10, seed=1).data["t"]
    hist = torch.bincount(many // 100, minlength=10)
    assert (hist == 400).all()  # exactly one draw per stratum per example
    assert abs(many.double().mean().item() - 499.5) < 10
