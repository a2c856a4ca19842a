"""DDPM training (seeded, resumable) and ancestral sampling / trajectory log-probability."""
import pytest
import torch

from kfac_influence.diffusion import training
from kfac_influence.diffusion.models import make_scheduler, SchedulerConfig
from kfac_influence.diffusion.sampling import ddpm_sample, trajectory_logprob
from kfac_influence.tasks.ddpm import default_timesteps, transition
from kfac_influence.diffusion.training import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(seed=0, dropout=0.0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, dropout=dropout)


def _images(n=24, seed=0):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_decreases_loss_and_is_seeded():
    sched = make_scheduler()
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, ema_decay=0.9)
    r1 = train(_tiny_model(), sched, _images(), cfg, progress=False)
    r2 = train(_tiny_model(), sched, _images(), cfg, progress=False)
    assert _same(r1.model, r2.model) and r1.losses == r2.losses
    assert sum(r1.losses[-10:]) < sum(r1.losses[:10])
    assert not _same(r1.model, r1.raw_model)  # the EMA is returned, not the raw weights
    assert not r1.model.training


def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch):
    """A run interrupted mid-way (between checkpoints: Ctrl-C after step 7, last checkpoint at step 4) and resumed
    ends with the weights of an uninterrupted run, dropout included."""
    sched = make_scheduler()
    cfg = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=3, checkpoint_every=4, ema_decay=0.9)
    full = train(_tiny_model(dropout=0.2), sched, _images(), cfg, progress=False)

    update = training.EMA.update

    def interrupt_after_step_7(self, model, step):
        update(self, model, step)
        if step + 1 == 7:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(training.EMA, "update", interrupt_after_step_7)
        with pytest.raises(KeyboardInterrupt):
            train(_tiny_model(dropout=0.2), sched, _images(), cfg, checkpoint_dir=str(tmp_path), progress=False)
    resumed = train(_tiny_model(dropout=0.2), sched, _images(), cfg, checkpoint_dir=str(tmp_path), progress=False)
    assert resumed.resumed_from == 4 and len(resumed.losses) == 8
    assert resumed.losses == full.losses[4:]
    assert _same(resumed.model, full.model) and _same(resumed.raw_model, full.raw_model)
    with pytest.raises(ValueError, match="different training config"):
        train(_tiny_model(), sched, _images(), TrainConfig(steps=12, batch_size=4), checkpoint_dir=str(tmp_path),
              progress=False)


def test_train_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(steps=-1)
    with pytest.raises(ValueError):
        TrainConfig(ema_decay=1.0)


def test_transition_matches_diffusers_step():
    """One ancestral step equals DDPMScheduler.step with the same noise, for full and strided timesteps."""
    for clip in (True, False):
        sched = make_scheduler(SchedulerConfig(clip_sample=clip))
        model = _tiny_model().eval()
        x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2
        for S in (None, 50):
            ts = default_timesteps(sched, S)
            sched.set_timesteps(S or 1000)
            assert torch.equal(sched.timesteps.long(), ts)
            for i in (0, len(ts) // 2, len(ts) - 1):
                t = int(ts[i])
                prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
                with torch.no_grad():
                    mean, std = transition(model, sched, x, torch.full((3,), t), torch.full((3,), prev))
                    eps = model(x, torch.full((3,), t)).sample
                z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
                ours = mean + std * z if prev >= 0 else mean
                g = torch.Generator().manual_seed(5)
                theirs = sched.step(eps, t, x, generator=g).prev_sample
                assert torch.allclose(ours, theirs, atol=1e-5), (clip, S, i)


def test_sampling_is_seeded_per_sample_and_records_trajectory():
    sched = make_scheduler()
    model = _tiny_model()
    a = ddpm_sample(model, sched, 3, (1, 4, 4), seed=7, batch_size=2, num_inference_steps=20,
                    record_trajectory=True, progress=False)
    b = ddpm_sample(model, sched, 2, (1, 4, 4), seed=8, batch_size=5, num_inference_steps=20, progress=False)
    assert a.images.shape == (3, 1, 4, 4) and a.trajectory.shape == (3, 21, 1, 4, 4)
    assert torch.allclose(a.images[1:], b.images, atol=1e-6)  # sample k depends on seed + k only
    assert torch.equal(a.trajectory[:, -1].clamp(-1, 1), a.images)
    assert a.seeds.tolist() == [7, 8, 9] and a.timesteps.tolist()[:2] == [950, 900]


def _slow_logprob(model, sched, traj, ts):
    """Per-step reference with torch.distributions, float64."""
    out = torch.zeros(traj.shape[0], dtype=torch.float64)
    abar = sched.alphas_cumprod.double()
    for i in range(len(ts) - 1):
        t, p = int(ts[i]), int(ts[i + 1])
        x = traj[:, i]
        eps = model(x, torch.full((x.shape[0],), t)).sample
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        alpha = abar[t] / abar[p]
        mean = (abar[p].sqrt() * (1 - alpha) / (1 - abar[t])) * x0 + (alpha.sqrt() * (1 - abar[p]) / (1 - abar[t])) * x
        var = (1 - abar[p]) / (1 - abar[t]) * (1 - alpha)
        dist = torch.distributions.Normal(mean, var.sqrt())
        out = out + dist.log_prob(traj[:, i + 1]).flatten(1).sum(1)
    return out


def test_trajectory_logprob_matches_per_step_reference():
    sched = make_scheduler()
    model = _tiny_model().double().eval()
    res = ddpm_sample(model, sched, 2, (1, 4, 4), seed=0, num_inference_steps=10, record_trajectory=True,
                      progress=False)
    traj = res.trajectory.double()
    fast = trajectory_logprob(model, sched, traj, res.timesteps, chunk_size=7)
    with torch.no_grad():
        slow = _slow_logprob(model, sched, traj, res.timesteps)
    assert fast.shape == (2,) and torch.allclose(fast, slow, rtol=1e-10, atol=1e-8)
    assert torch.allclose(trajectory_logprob(model, sched, traj), fast)  # timesteps inferred from the length
    # differentiable in the parameters, and a perturbed trajectory is less likely
    fast.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    noisy = traj.clone()
    noisy[:, 1:-1] += 0.5 * torch.randn_like(noisy[:, 1:-1])
    with torch.no_grad():
        assert (trajectory_logprob(model, sched, noisy, res.timesteps) < fast.detach()).all()
    with pytest.raises(ValueError, match="states"):
        trajectory_logprob(model, sched, traj, res.timesteps[:-1])


def test_trajectory_measurement_scores_through_the_core():
    """The recorded trajectories plug into DiffusionTask's `sampling_trajectory_logprob` measurement."""
    from kfac_influence import CurvatureConfig, fit_curvature, pairwise_scores
    from kfac_influence.tasks import DiffusionTask

    sched = make_scheduler()
    model = _tiny_model().eval()
    res = ddpm_sample(model, sched, 2, (1, 4, 4), seed=0, num_inference_steps=5, record_trajectory=True,
                      progress=False)
    task = DiffusionTask(sched, num_train_draws=2, num_query_draws=1, measurement="sampling_trajectory_logprob")
    train_x = _images(6)
    curv = fit_curvature(model, task, train_x, CurvatureConfig(num_draws=2), progress=False)
    s = pairwise_scores(model, task, curv, res.trajectory, train_x, damping=1e-3, progress=False)
    assert s.shape == (2, 6) and torch.isfinite(s).all() and s.abs().sum() > 0
