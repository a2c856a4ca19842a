"""Influence scores against independent references: the exact GGN with a dense float64 solve (single Linear layer,
where K-FAC with type2 is exact), and explicit per-example parameter gradients from autograd (diffusion UNet)."""
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, jacrev, vmap, grad

import kfac_kernels as kk
from kfac_influence import (CurvatureConfig, fit_curvature, pairwise_scores, preconditioned_query_gradients,
                            self_scores)
from kfac_influence.engine import Shard, examples_of_groups, shard_groups
from kfac_influence.tasks import DiffusionTask, RegressionTask

import bruteforce as bf
from helpers import scheduler, tiny_unet

F64 = torch.float64


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_single_linear_type2_is_exact_ggn_and_scores_match_dense_solve(method):
    torch.manual_seed(0)
    model = nn.Linear(6, 4).to(F64)
    X, Y = torch.randn(15, 6, dtype=F64), torch.randn(15, 4, dtype=F64)
    curv = fit_curvature(model, RegressionTask(), (X, Y), CurvatureConfig(method=method, fisher="type2", dtype=F64),
                         draws_per_forward=4, progress=False)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def flat(p):  # (d_out, d_in + 1) matrix, column-major vec (the vec in which A (x) G acts)
        return torch.cat([p["weight"], p["bias"][:, None]], 1).T.reshape(-1)

    def out(p, x):
        return functional_call(model, p, (x,))

    J = vmap(jacrev(out), in_dims=(None, 0))(params, X)  # dict of (N, D, *param)
    Jm = torch.stack([torch.stack([flat({"weight": J["weight"][n, d], "bias": J["bias"][n, d]})
                                   for d in range(4)]) for n in range(15)])  # (N, D, P)
    ggn = torch.einsum("ndp,ndq->pq", Jm, Jm) * (2.0 / 4) / 15
    kron = torch.kron(curv.A(""), curv.G(""))
    torch.testing.assert_close(kron, ggn, rtol=1e-12, atol=1e-14)

    def loss(p, x, y):
        return (out(p, x) - y).pow(2).mean()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    gvec = torch.stack([flat({"weight": g["weight"][n], "bias": g["bias"][n]}) for n in range(15)])
    # damping is a scoring choice: one fit, a sweep of dampings, each equal to its own dense solve
    for lam in (1e-3, 1e-1, 10.0):
        S_ref = gvec[:5] @ torch.linalg.solve(ggn + lam * torch.eye(ggn.shape[0], dtype=F64), gvec.T)
        S = pairwise_scores(model, RegressionTask(), curv, (X[:5], Y[:5]), (X, Y), draws_per_forward=4,
                            progress=False, damping=lam)
        torch.testing.assert_close(S, S_ref, rtol=1e-9, atol=1e-10)


def explicit_example_grads(model, task, layers, data, purpose):
    """Per-example gradients (mean over the example's draws) from autograd on the parameters, one row at a time."""
    n = data.shape[0]
    rows = task.draws(data, torch.arange(n), purpose, num_draws=task.num_draws(purpose), seed=task.seed)
    out = {k: torch.zeros((n,) + tuple(bf.weight_matrix_grad_shape(l)), dtype=F64) for k, l in layers.items()}
    for i in range(len(rows)):
        r = rows.slice(i, i + 1)
        f = task.forward(model, r)
        value = task.measurement(f, r) if purpose == "query" else task.train_loss(f, r)
        for k, gm in bf.param_grads(model, layers, value.sum() * r.weight).items():
            out[k][int(r.example[0])] += gm
    return out


@pytest.mark.parametrize("measurement", ["loss", "elbo", "square_norm"])
def test_streamed_scores_equal_explicit_per_example_gradients(measurement):
    unet = tiny_unet(size=4)
    task = DiffusionTask(scheduler(), num_train_draws=3, num_query_draws=2, measurement=measurement, seed=4)
    x = torch.rand(7, 1, 4, 4, dtype=F64) * 2 - 1
    q = torch.rand(3, 1, 4, 4, dtype=F64) * 2 - 1
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64, num_draws=2), draws_per_forward=5,
                         progress=False)
    # 4 draws per forward: splits examples' draws
    S = pairwise_scores(unet, task, curv, q, x, draws_per_forward=4, progress=False, damping=1e-4)
    layers = {n: m for n, m in unet.named_modules() if n in curv.module_names}
    gq = explicit_example_grads(unet, task, layers, q, "query")
    gt = explicit_example_grads(unet, task, layers, x, "train")
    pre = curv.precondition(gq, damping=1e-4)
    S_ref = sum(pre[k].flatten(1) @ gt[k].flatten(1).T for k in layers)
    torch.testing.assert_close(S, S_ref, rtol=1e-9, atol=1e-9 * float(S_ref.abs().max()))


class LocalShard(Shard):
    """A rank's share of the groups, without a process group: reductions do nothing (each part stays partial)."""

    def all_reduce(self, tensors):
        pass


@pytest.mark.parametrize("per_forward", [2, 9])  # 2: draws of an example span chunks; 9: fused path
def test_self_scores_equal_diagonal_of_pairwise(per_forward):
    unet = tiny_unet(size=4)
    task = DiffusionTask(scheduler(), num_train_draws=3, num_query_draws=3, share_draws=True, seed=1)
    x = torch.rand(5, 1, 4, 4, dtype=F64) * 2 - 1
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), draws_per_forward=6, progress=False)
    damp = dict(damping=1e-3, damping_mode="relative")
    S = pairwise_scores(unet, task, curv, x, x, draws_per_forward=4, progress=False, **damp)
    s = self_scores(unet, task, curv, x, draws_per_forward=per_forward, progress=False, **damp)
    torch.testing.assert_close(s, torch.diagonal(S), rtol=1e-9, atol=1e-9 * float(s.abs().max()))
    assert (s > 0).all()
    # shards of example groups (what distributed ranks score): disjoint, empty ones give zeros, they add up
    groups = -(-5 // max(1, per_forward // 3))
    parts = [self_scores(unet, task, curv, x, draws_per_forward=per_forward, progress=False,
                         shard=LocalShard(rank, 3), **damp) for rank in range(3)]
    for rank, part in enumerate(parts):
        owned = examples_of_groups(shard_groups(groups, 3, rank), 5, per_forward, 3)
        mask = torch.zeros(5, dtype=torch.bool)
        mask[owned.start:owned.stop] = True
        assert not part[~mask].any() and (part[mask] > 0).all()
    assert len(examples_of_groups(shard_groups(groups, 3, 2), 5, per_forward, 3)) == (0 if per_forward == 9 else 1)
    torch.testing.assert_close(sum(parts), s, rtol=1e-12, atol=0)


def test_scores_with_one_draw_and_int8_queries():
    unet = tiny_unet(size=4, dtype=torch.float32)
    task = DiffusionTask(scheduler(), num_train_draws=1, num_query_draws=1)
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    curv = fit_curvature(unet, task, x, CurvatureConfig(), progress=False)
    damp = dict(damping=1e-3, damping_mode="relative")
    S = pairwise_scores(unet, task, curv, x[:2], x, progress=False, **damp)
    S8 = pairwise_scores(unet, task, curv, x[:2], x, progress=False, int8_queries=True, **damp)
    assert S.shape == (2, 6) and torch.isfinite(S).all()
    rel = (S8 - S).norm() / S.norm()
    assert rel < 0.05, rel


def test_low_rank_query_scores_equal_scores_of_the_rank_k_matrices():
    unet = tiny_unet(size=4)
    task = DiffusionTask(scheduler(), num_train_draws=2, num_query_draws=2, seed=6)
    x = torch.rand(5, 1, 4, 4, dtype=F64) * 2 - 1
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), draws_per_forward=4, progress=False)
    run = dict(draws_per_forward=4, progress=False, damping=1e-3)
    pre = preconditioned_query_gradients(unet, task, curv, x[:3], draws_per_forward=4, damping=1e-3)
    full = pairwise_scores(unet, task, curv, x[:3], x, preconditioned=pre, **run)
    for rank in (1, 2):
        # the definition: the dense rank-k matrices (truncated SVD) scored the ordinary way
        dense = {k: kk.lowrank_queries(v, rank).dense() for k, v in pre.items()}
        want = pairwise_scores(unet, task, curv, x[:3], x, preconditioned=dense, **run)
        got = pairwise_scores(unet, task, curv, x[:3], x, query_rank=rank, **run)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
        assert not torch.allclose(got, full, rtol=1e-3)  # rank 1-2 is an approximation here
    widest = max(min(v.shape[1:]) for v in pre.values())
    torch.testing.assert_close(pairwise_scores(unet, task, curv, x[:3], x, query_rank=widest, **run), full,
                               rtol=1e-9, atol=1e-9 * float(full.abs().max()))
    with pytest.raises(ValueError, match="int8"):
        pairwise_scores(unet, task, curv, x[:3], x, query_rank=2, int8_queries=True, **run)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_rounds_the_operands_and_accumulates_in_float32(precision):
    """K-FAC factors of a Linear layer at reduced precision equal the float64 Gram matrices of the rounded layer
    inputs and output gradients (the definition of "operands in bf16, sums in >= float32"), and scores from
    rounded operands stay close to float32 scores."""
    torch.manual_seed(0)
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    X, Y = torch.randn(40, 6), torch.randn(40, 4)
    task = RegressionTask()
    cfg = CurvatureConfig(method="kfac", fisher="empirical", precision=precision)
    curv = fit_curvature(model, task, (X, Y), cfg, draws_per_forward=16, progress=False)
    # the definition for the first layer: inputs X rounded, output gradients from autograd rounded
    a = torch.cat([X.to(low).double(), torch.ones(40, 1, dtype=F64)], 1)
    torch.testing.assert_close(curv.A("0"), (a.T @ a / 40).float(), rtol=1e-6, atol=1e-7)
    out0 = model[0](X)
    f = model[2](model[1](out0))
    g = torch.autograd.grad(f, out0, (2.0 / 4) * (f - Y).detach())[0]
    gr = g.to(low).double()
    torch.testing.assert_close(curv.G("0"), (gr.T @ gr / 40).float(), rtol=1e-5, atol=1e-9)
    full = fit_curvature(model, task, (X, Y), CurvatureConfig(method="kfac", fisher="empirical"),
                         draws_per_forward=16, progress=False)
    assert not torch.equal(curv.A("0"), full.A("0"))  # the rounding is really there
    S = pairwise_scores(model, task, full, (X[:4], Y[:4]), (X, Y), progress=False, damping=1e-3)
    S_low = pairwise_scores(model, task, full, (X[:4], Y[:4]), (X, Y), progress=False, damping=1e-3,
                            precision=precision)
    assert S_low.dtype == torch.float32
    rel = float((S_low - S).norm() / S.norm())
    assert 0 < rel < 2e-2, rel
    with pytest.raises(ValueError, match="precision"):
        CurvatureConfig(precision="int4")
    with pytest.raises(ValueError, match="precision"):
        pairwise_scores(model, task, full, (X[:4], Y[:4]), (X, Y), progress=False, precision="float8")


@pytest.mark.parametrize("per_forward,query_batch", [(3, 1), (3, 2), (6, 3), (6, 1), (6, 5), (9, 4)])
def test_query_blocks_give_the_unblocked_scores_and_resume_by_block(tmp_path, per_forward, query_batch):
    # 5 queries in blocks of whole query groups (per_forward 6, 3 draws: groups of 2 queries, so a block of 1 query
    # holds one group of 2): each block is its own query pass, training pass and checkpoint folder
    unet = tiny_unet(size=4)
    task = DiffusionTask(scheduler(), num_train_draws=3, num_query_draws=3, seed=2)
    x = torch.rand(4, 1, 4, 4, dtype=F64) * 2 - 1
    q = torch.rand(5, 1, 4, 4, dtype=F64) * 2 - 1
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), draws_per_forward=6, progress=False)
    kw = dict(draws_per_forward=per_forward, progress=False, damping=1e-3, damping_mode="relative")
    whole = pairwise_scores(unet, task, curv, q, x, **kw)
    calls = []
    real = preconditioned_query_gradients

    def counting(*args, **kwargs):  # one query pass per block, each over at most its block's queries
        out = real(*args, **kwargs)
        calls.append(next(iter(out.values())).shape[0])
        return out

    import kfac_influence.scoring.pairwise as pw
    pw.preconditioned_query_gradients = counting
    try:
        blocked = pairwise_scores(unet, task, curv, q, x, query_batch=query_batch, checkpoint_dir=tmp_path, **kw)
    finally:
        pw.preconditioned_query_gradients = real
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12 * float(whole.abs().max()))
    # blocks of whole groups, as many as fit in query_batch (one group when a group alone is bigger): the groups of
    # 5 queries are [0..g), [g..2g), ... with the last one partial
    group = max(1, per_forward // 3)
    sizes = [min(group, 5 - i) for i in range(0, 5, group)]
    want, cur = [], 0
    for size in sizes:
        if cur and cur + size > query_batch:
            want.append(cur)
            cur = 0
        cur += size
    want.append(cur)
    assert calls == want, (calls, want)
    folders = sorted(p.name for p in tmp_path.iterdir())
    if len(want) > 1:
        assert len(folders) == len(calls) and all(f.startswith("queries-") for f in folders)
    else:  # query_batch >= Q: one block, in the checkpoint folder itself
        assert not any(f.startswith("queries-") for f in folders)
    # resumed: every block's checkpoint is finished, so no query pass runs and the scores come back
    pw.preconditioned_query_gradients = counting
    calls.clear()
    try:
        again = pairwise_scores(unet, task, curv, q, x, query_batch=query_batch, checkpoint_dir=tmp_path, **kw)
    finally:
        pw.preconditioned_query_gradients = real
    assert calls == [] and torch.equal(again, blocked)


def test_query_blocks_of_precomputed_gradients_and_bad_batch():
    unet = tiny_unet(size=4)
    task = DiffusionTask(scheduler(), num_train_draws=2, num_query_draws=2, seed=3)
    x = torch.rand(3, 1, 4, 4, dtype=F64) * 2 - 1
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), progress=False)
    pre = preconditioned_query_gradients(unet, task, curv, x, damping=1e-2)
    whole = pairwise_scores(unet, task, curv, None, x, preconditioned=pre, progress=False)
    blocked = pairwise_scores(unet, task, curv, None, x, preconditioned=pre, progress=False, query_batch=2)
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="query_batch must be >= 1"):
        pairwise_scores(unet, task, curv, None, x, preconditioned=pre, progress=False, query_batch=0)
