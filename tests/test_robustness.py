"""Resume after interruption, atomic storage, load mismatch, and clear errors for bad input."""
import os
import signal

import pytest
import torch
import torch.nn as nn

from kfac_influence import CurvatureConfig, fit_curvature, load_curvature, pairwise_scores
from kfac_influence.curvature.damping import Damping
from kfac_influence.engine import CheckpointMismatch
from kfac_influence.identity import settings_fingerprint
from kfac_influence.storage import load_tensors
from kfac_influence.tasks import DiffusionTask, RegressionTask

from helpers import scheduler, tiny_unet

F64 = torch.float64


class Interrupt(Exception):
    pass


class FailingTask(DiffusionTask):
    """Raises after ``fail_after`` calls of ``rows`` (an interruption in the middle of a pass)."""

    def __init__(self, *args, fail_after=None, **kw):
        super().__init__(*args, **kw)
        self.fail_after, self.calls = fail_after, 0

    def draws(self, *args, **kw):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Interrupt()
        return super().draws(*args, **kw)

    def fingerprint(self):  # the failure schedule does not change results: a resumed run may drop it
        return settings_fingerprint(self, exclude=("fail_after", "calls"))


def setup():
    unet = tiny_unet(size=4)
    x = torch.rand(9, 1, 4, 4, dtype=F64) * 2 - 1
    return unet, x


@pytest.mark.parametrize("fail_after", [2, 7])  # during the factor pass; during the eigenvalue pass
@pytest.mark.parametrize("stored", [F64, torch.float32])  # float32 factors: the pass's bases are saved apart
def test_interrupted_fit_resumes_to_identical_factors(tmp_path, fail_after, stored):
    unet, x = setup()
    cfg = CurvatureConfig(dtype=stored, num_draws=2)
    full = fit_curvature(unet, FailingTask(scheduler()), x, cfg, draws_per_forward=4, progress=False)
    with pytest.raises(Interrupt):
        fit_curvature(unet, FailingTask(scheduler(), fail_after=fail_after), x, cfg, draws_per_forward=4,
                      checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    assert (tmp_path / "fit_state.safetensors").exists()
    task = FailingTask(scheduler())
    resumed = fit_curvature(unet, task, x, cfg, draws_per_forward=4, checkpoint_dir=tmp_path, checkpoint_every=1,
                            progress=False)
    assert task.calls < 10  # groups before the interruption were not recomputed
    for n in full.module_names:
        for k in ("A", "G", "QA", "QG", "sA", "sG", "Lambda"):
            assert torch.equal(full.factors[n][k], resumed.factors[n][k]), (n, k)


def test_interrupted_scoring_resumes(tmp_path):
    unet, x = setup()
    task = FailingTask(scheduler(), num_train_draws=2, num_query_draws=2)
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), draws_per_forward=4, progress=False)
    full = pairwise_scores(unet, task, curv, x[:2], x, draws_per_forward=4, progress=False)
    bad = FailingTask(scheduler(), num_train_draws=2, num_query_draws=2, fail_after=3)
    with pytest.raises(Interrupt):
        pairwise_scores(unet, bad, curv, x[:2], x, draws_per_forward=4, progress=False, checkpoint_dir=tmp_path,
                        checkpoint_every=1)
    resumed = pairwise_scores(unet, task, curv, x[:2], x, draws_per_forward=4, progress=False, checkpoint_dir=tmp_path,
                              checkpoint_every=1)
    assert torch.equal(full, resumed)


def test_checkpoint_from_other_config_is_refused(tmp_path):
    unet, x = setup()
    task = DiffusionTask(scheduler(), num_train_draws=1)
    fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatch, match="config: "):
        fit_curvature(unet, task, x, CurvatureConfig(dtype=F64, fisher="empirical"), checkpoint_dir=tmp_path,
                      progress=False)
    # other training data of the same size: refused, not answered with the first data's curvature
    with pytest.raises(CheckpointMismatch, match="data: "):
        fit_curvature(unet, task, x.flip(0), CurvatureConfig(dtype=F64), checkpoint_dir=tmp_path, progress=False)


def test_score_checkpoint_of_other_inputs_is_refused(tmp_path):
    unet, x = setup()
    task = DiffusionTask(scheduler(), num_train_draws=1, num_query_draws=1)
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), progress=False)
    first = pairwise_scores(unet, task, curv, x[:2], x, progress=False, checkpoint_dir=tmp_path, damping=1e-8)
    again = pairwise_scores(unet, task, curv, x[:2], x, progress=False, checkpoint_dir=tmp_path, damping=1e-8)
    assert torch.equal(first, again)  # a finished state is reused
    for change, what in ((dict(damping=1e3), "damping: "), (dict(queries=x[2:4]), "queries: "),
                         (dict(task=DiffusionTask(scheduler(), num_train_draws=1, num_query_draws=1, seed=9)),
                          "task: ")):
        kw = dict(task=task, queries=x[:2], damping=1e-8)
        kw.update(change)
        with pytest.raises(CheckpointMismatch, match=what):
            pairwise_scores(unet, kw["task"], curv, kw["queries"], x, progress=False, checkpoint_dir=tmp_path,
                            damping=kw["damping"])


def test_save_load_roundtrip_and_mismatch(tmp_path):
    unet, x = setup()
    task = DiffusionTask(scheduler(), num_train_draws=1, num_query_draws=1)
    curv = fit_curvature(unet, task, x, CurvatureConfig(dtype=F64), progress=False)
    curv.save(tmp_path / "c.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    back = load_curvature(tmp_path / "c.safetensors", unet)
    for n in curv.module_names:
        assert torch.equal(back.eigenvalues(n), curv.eigenvalues(n))
    torch.testing.assert_close(pairwise_scores(unet, task, back, x[:2], x, progress=False),
                               pairwise_scores(unet, task, curv, x[:2], x, progress=False))
    other = tiny_unet(size=4, channels=(8, 24))
    with pytest.raises(ValueError, match="tracked layers differ"):
        load_curvature(tmp_path / "c.safetensors", other)
    retrained = tiny_unet(size=4, seed=5)
    with pytest.raises(ValueError, match="weights differ"):
        load_curvature(tmp_path / "c.safetensors", retrained)
    with pytest.raises(FileNotFoundError):
        load_curvature(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable"):
        load_curvature(tmp_path / "junk.safetensors")


def test_nan_is_reported_with_the_layer_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    X, Y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    with pytest.raises(FloatingPointError, match="'2'.*layer outputs"):
        fit_curvature(model, RegressionTask(), (X, Y), CurvatureConfig(), progress=False)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X[1, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="'0'.*activations"):
        fit_curvature(model, RegressionTask(), (X, Y), CurvatureConfig(), progress=False)

    class Residual(nn.Module):  # l1's output feeds only an add: nothing but the diagnosis sees it
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x + self.l1(x) + self.l2(x))
    model = Residual().to(F64)
    with torch.no_grad():
        model.l1.weight[0, 0] = float("inf")
    X = torch.randn(5, 3, dtype=F64)
    with pytest.raises(FloatingPointError, match="'l1'.*layer outputs"):
        fit_curvature(model, RegressionTask(), (X, Y), CurvatureConfig(), progress=False)


def test_streamed_backward_refuses_a_replaced_forward():
    from kfac_influence.capture import LayerCapture, select_layers
    from kfac_influence.engine import draw_pass

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X, Y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    task = RegressionTask()
    capture = LayerCapture(select_layers(model))
    chunks = list(draw_pass(model, task, capture, (X, Y), "train", num_draws=1, seed=0, draws_per_forward=2))
    seen = []
    last = chunks[-1]
    last.backward(task.train_loss(last.outputs, last.draws), lambda name, calls: seen.append(name))
    assert sorted(seen) == ["0", "2"]
    with pytest.raises(RuntimeError, match="before the next chunk's forward"):
        chunks[0].backward(task.train_loss(chunks[0].outputs, chunks[0].draws), lambda name, calls: None)


def test_bad_inputs_give_clear_errors():
    unet, x = setup()
    task = DiffusionTask(scheduler(), num_train_draws=1)
    with pytest.raises(ValueError, match="empty"):
        fit_curvature(unet, task, x[:0], CurvatureConfig(), progress=False)
    with pytest.raises(ValueError, match="float images"):
        fit_curvature(unet, task, x.long(), CurvatureConfig(), progress=False)
    with pytest.raises(ValueError, match="predicts shape|expected input"):
        fit_curvature(unet, task, torch.rand(2, 3, 4, 4, dtype=F64), CurvatureConfig(), progress=False)
    model = nn.Linear(3, 2).to(F64)
    with pytest.raises(ValueError, match="differs from targets"):
        fit_curvature(model, RegressionTask(), (torch.randn(4, 3, dtype=F64), torch.randn(4, 5, dtype=F64)),
                      CurvatureConfig(), progress=False)
    with pytest.raises(ValueError, match="no Linear/Conv2d layer matches"):
        fit_curvature(model, RegressionTask(), (torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)),
                      CurvatureConfig(modules=("nothing*",)), progress=False)
    with pytest.raises(ValueError, match="method"):
        CurvatureConfig(method="foo")
    with pytest.raises(ValueError, match="damping"):
        Damping(float("nan"))
    with pytest.raises(ValueError, match="damping_mode"):
        Damping(1e-3, "proportional")
    with pytest.raises(TypeError):  # damping is a scoring setting now
        CurvatureConfig(damping=1e-3)
    with pytest.raises(ValueError, match="measurement"):
        DiffusionTask(scheduler(), measurement="likelihood")
    with pytest.raises(ValueError, match="loss_at_time needs timestep"):
        DiffusionTask(scheduler(), measurement="loss_at_time")


class SignallingTask(DiffusionTask):
    """Sends ``sig`` to this process from inside the ``at``-th call of ``draws`` (mid-pass, mid-group)."""

    def __init__(self, *args, sig=None, at=None, **kw):
        super().__init__(*args, **kw)
        self.sig, self.at, self.calls = sig, at, 0

    def draws(self, *args, **kw):
        self.calls += 1
        if self.sig is not None and self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return super().draws(*args, **kw)

    def fingerprint(self):
        return settings_fingerprint(self, exclude=("sig", "at", "calls"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("stage", ["fit", "score"])
def test_signal_checkpoints_then_stops_and_resumes_identically(tmp_path, sig, stage):
    unet, x = setup()
    cfg = CurvatureConfig(dtype=F64, num_draws=2)
    # group 3 of the pass asks to stop; no periodic checkpoint would come before the end (1 h interval)
    run = dict(draws_per_forward=4, progress=False, checkpoint_dir=tmp_path, checkpoint_seconds=3600)
    plain = SignallingTask(scheduler(), num_train_draws=2, num_query_draws=2)
    curv = fit_curvature(unet, plain, x, cfg, draws_per_forward=4, progress=False)
    full = pairwise_scores(unet, plain, curv, x[:2], x, draws_per_forward=4, progress=False)
    task = SignallingTask(scheduler(), num_train_draws=2, num_query_draws=2, sig=sig,
                          at=3 if stage == "fit" else 4)  # scoring: call 1 is the query pass
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name):
        if stage == "fit":
            fit_curvature(unet, task, x, cfg, **run)
        else:
            pairwise_scores(unet, task, curv, x[:2], x, **run)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored
    saved = load_tensors(tmp_path / ("fit_state.safetensors" if stage == "fit" else "score_state.safetensors"))[1]
    assert saved["next_group"] == 3  # the group in which the signal came was finished, then saved
    resumed = SignallingTask(scheduler(), num_train_draws=2, num_query_draws=2)
    if stage == "fit":
        again = fit_curvature(unet, resumed, x, cfg, **run)
        assert resumed.calls < 2 * 5  # both passes of 5 groups would be 10 calls
        for n in curv.module_names:
            for k in ("A", "G", "QA", "QG", "Lambda"):
                assert torch.equal(curv.factors[n][k], again.factors[n][k]), (n, k)
    else:
        assert torch.equal(pairwise_scores(unet, resumed, curv, x[:2], x, **run), full)


def test_task_fingerprint_is_the_same_in_every_process():
    """A diffusers scheduler's config holds a list made from a set (its order follows the process's hash seed):
    the task fingerprint of a checkpoint must not depend on it, or no checkpoint resumes in a new process."""
    import subprocess
    import sys

    code = ("from diffusers import DDPMScheduler; from kfac_influence.identity import task_fingerprint; "
            "from kfac_influence.tasks import DiffusionTask; "
            "print(task_fingerprint(DiffusionTask(DDPMScheduler(num_train_timesteps=100), num_train_draws=2)))")
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2, 3)}
    assert len(prints) == 1 and len(prints.pop()) == 16
