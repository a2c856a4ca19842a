"""DiffusionTask draws and measurements against slow definitions; module selection by name patterns."""
import torch

from kfac_influence.capture import select_layers
from kfac_influence.tasks import DiffusionTask

from helpers import scheduler, tiny_unet

F64 = torch.float64


def test_draws_are_reproducible_per_example_whatever_the_batching():
    task = DiffusionTask(scheduler(), num_train_draws=3, seed=7)
    x = torch.rand(5, 1, 4, 4, dtype=F64)
    whole = task.draws(x, torch.arange(5), "train", num_draws=3, seed=7)
    part = task.draws(x[2:4], torch.arange(2, 4), "train", num_draws=3, seed=7)
    assert torch.equal(whole.data["x_t"][6:12], part.data["x_t"])
    assert torch.equal(whole.data["t"][6:12], part.data["t"])
    query = task.draws(x, torch.arange(5), "query", num_draws=3, seed=7)
    assert not torch.equal(query.data["t"], whole.data["t"])  # independent draws for queries by default
    shared = DiffusionTask(scheduler(), num_train_draws=3, num_query_draws=3, seed=7, share_draws=True)
    assert torch.equal(shared.draws(x, torch.arange(5), "query", num_draws=3, seed=7).data["x_t"], whole.data["x_t"])
    abar = task.alphas_cumprod[whole.data["t"]].view(-1, 1, 1, 1)
    x0 = x.repeat_interleave(3, 0)
    torch.testing.assert_close(whole.data["x_t"], abar.sqrt() * x0 + (1 - abar).sqrt() * whole.data["target"])


def test_elbo_measurements_equal_gaussian_kl_definition():
    """For t >= 1: T * KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with the posterior variance on both sides."""
    sch = scheduler()
    task = DiffusionTask(sch, num_query_draws=16, measurement="elbo", seed=3)
    simple = DiffusionTask(sch, num_query_draws=16, measurement="simplified_elbo", seed=3)
    x = torch.rand(2, 1, 4, 4, dtype=F64) * 2 - 1
    rows = task.draws(x, torch.arange(2), "query", num_draws=16, seed=3)
    f = torch.randn_like(rows.data["x_t"])  # any network output
    t = rows.data["t"]
    keep = t >= 1
    b = sch.betas.double()
    a = 1 - b
    ab = torch.cumprod(a, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    v = lambda z: z[t].view(-1, 1, 1, 1)  # noqa: E731
    x0 = x.repeat_interleave(16, 0)
    xt = rows.data["x_t"]
    mu_q = v(ab_prev.sqrt() * b / (1 - ab)) * x0 + v(a.sqrt() * (1 - ab_prev) / (1 - ab)) * xt
    mu_p = (xt - v(b / (1 - ab).sqrt()) * f) / v(a.sqrt())
    var = v(b * (1 - ab_prev) / (1 - ab))
    kl = ((mu_q - mu_p) ** 2 / (2 * var)).flatten(1).sum(1)
    got = task.measurement(f, rows)
    torch.testing.assert_close(got[keep], 1000 * kl[keep], rtol=1e-7, atol=1e-9)
    mse = ((rows.data["target"] - f) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(simple.measurement(f, rows), mse * (b / (2 * a * (1 - ab)))[t])


def test_loss_at_time_and_weighted_loss_timesteps():
    x = torch.rand(3, 1, 4, 4, dtype=F64)
    fixed = DiffusionTask(scheduler(), measurement="loss_at_time", timestep=123)
    assert (fixed.draws(x, torch.arange(3), "query", num_draws=5, seed=0).data["t"] == 123).all()
    w = torch.zeros(1000)
    w[[10, 500]] = torch.tensor([1.0, 3.0])
    weighted = DiffusionTask(scheduler(), measurement="weighted_loss", timestep_weights=w)
    t = weighted.draws(x, torch.arange(3), "query", num_draws=400, seed=0).data["t"]
    assert set(t.tolist()) == {10, 500}
    assert 0.6 < (t == 500).double().mean() < 0.9


def test_select_layers_by_pattern_includes_attention_and_time_mlp():
    unet = tiny_unet(size=4)
    everything = select_layers(unet)
    assert any(n.endswith("to_q") for n in everything) and "time_embedding.linear_1" in everything
    att = select_layers(unet, ["*attentions*"])
    assert att and all("attentions" in n for n in att)
    no_att = select_layers(unet, None, exclude=["*attentions*"])
    assert set(no_att) == set(everything) - set(att)


def test_trajectory_measurement_gradients_equal_autograd_of_trajectory_logprob():
    import bruteforce as bf
    from kfac_influence.capture import select_layers
    from kfac_influence.diffusion.sampling import trajectory_logprob
    from kfac_influence.scoring import example_gradients

    unet = tiny_unet(size=4)
    sch = scheduler()
    task = DiffusionTask(sch, measurement="sampling_trajectory_logprob")
    traj = torch.randn(2, 6, 1, 4, 4, dtype=F64)  # 5 steps: 4 stochastic + the deterministic last one
    modules = select_layers(unet)
    got = example_gradients(unet, task, modules, traj, purpose="query", draws_per_forward=3)
    for q in range(2):
        ref = bf.param_grads(unet, modules, -trajectory_logprob(unet, sch, traj[q:q + 1]).sum())
        for name in modules:
            torch.testing.assert_close(got[name][q], ref[name], rtol=1e-5, atol=1e-8)


def test_stratified_antithetic_draws():
    task = DiffusionTask(scheduler(), num_train_draws=6, seed=2, stratified=True, antithetic=True)
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    rows = task.draws(x, torch.arange(2), "fit", num_draws=6, seed=2)
    t = rows.data["t"].view(2, 6)
    eps = rows.data["target"].view(2, 6, -1)
    xi = rows.data["xi"].view(2, 6, -1)
    assert torch.equal(t[:, 0::2], t[:, 1::2])  # pairs share t
    assert torch.equal(eps[:, 0::2], -eps[:, 1::2]) and torch.equal(xi[:, 0::2], -xi[:, 1::2])
    for b in range(2):  # one pair per stratum of width T/3
        assert sorted((t[b, 0::2] * 3 // 1000).tolist()) == [0, 1, 2]
    abar = task.alphas_cumprod[rows.data["t"]].view(-1, 1, 1, 1)
    torch.testing.assert_close(rows.data["x_t"], abar.sqrt() * x.repeat_interleave(6, 0)
                               + (1 - abar).sqrt() * rows.data["target"])
