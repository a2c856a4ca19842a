"""The whole pipeline through the dispatcher: KFAC_KERNELS_BACKEND=triton (interpreter on CPU) gives the same
curvature and scores as the torch backend."""
import torch

from kfac_influence import CurvatureConfig, fit_curvature, pairwise_scores, self_scores
from kfac_influence.tasks import DiffusionTask

from helpers import scheduler


class TinyEps(torch.nn.Module):
    """conv -> + time MLP -> tanh -> conv: every kind of tracked layer, few enough for the Triton interpreter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(1, 5, 3, padding=1)
        self.time = torch.nn.Linear(1, 5)
        self.conv_out = torch.nn.Conv2d(5, 1, 3, padding=1, bias=False)

    def forward(self, x, t):
        h = self.conv_in(x) + self.time(t.float()[:, None] / 1000.0)[:, :, None, None]
        return self.conv_out(torch.tanh(h))


def run(monkeypatch, backend):
    monkeypatch.setenv("KFAC_KERNELS_BACKEND", backend)
    unet = TinyEps()
    task = DiffusionTask(scheduler(), num_train_draws=2, num_query_draws=2, seed=3)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    curv = fit_curvature(unet, task, x, CurvatureConfig(), draws_per_forward=4, progress=False)
    damp = dict(damping=1e-2, damping_mode="relative")
    return curv, pairwise_scores(unet, task, curv, x[:2], x, draws_per_forward=4, progress=False, **damp), \
        self_scores(unet, task, curv, x, draws_per_forward=4, progress=False, **damp)


def test_triton_backend_matches_torch_backend(monkeypatch):
    c_t, s_t, ss_t = run(monkeypatch, "torch")
    c_k, s_k, ss_k = run(monkeypatch, "triton")
    for n in c_t.module_names:
        torch.testing.assert_close(c_k.A(n), c_t.A(n), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c_k.G(n), c_t.G(n), rtol=1e-4, atol=1e-6 * float(c_t.G(n).abs().max()))
        lam = c_t.eigenvalues(n)
        torch.testing.assert_close(c_k.eigenvalues(n), lam, rtol=1e-3, atol=1e-5 * float(lam.abs().max()))
    torch.testing.assert_close(s_k, s_t, rtol=1e-3, atol=1e-3 * float(s_t.abs().max()))
    torch.testing.assert_close(ss_k, ss_t, rtol=1e-3, atol=1e-3 * float(ss_t.abs().max()))
