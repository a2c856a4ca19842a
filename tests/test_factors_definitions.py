"""K-FAC factors and EK-FAC eigenvalues against their definitions, computed the slow way (tests/bruteforce.py):
Linear, Linear over tokens, Conv2d with stride, padding and dilation; expand and reduce; type2, mc, empirical."""
import pytest
import torch
import torch.nn as nn

from kfac_influence import CurvatureConfig, fit_curvature
from kfac_influence.tasks import RegressionTask

import bruteforce as bf

F64 = torch.float64


class TokenModel(nn.Module):
    """(B, T, 4) -> Linear over tokens -> tanh -> Linear -> (B, T, 3)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class ConvModel(nn.Module):
    """(B, 2, 7, 6) -> strided dilated padded conv -> tanh -> 1x1 conv without bias -> (B, 2, 3, 3)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=2)
        self.c2 = nn.Conv2d(3, 2, kernel_size=(2, 1), stride=1, padding=(1, 0), bias=False)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


def make(kind):
    torch.manual_seed(1)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
        X = torch.randn(9, 5, dtype=F64)
    elif kind == "tokens":
        model = TokenModel().to(F64)
        X = torch.randn(9, 6, 4, dtype=F64)
    else:
        model = ConvModel().to(F64)
        X = torch.randn(9, 2, 7, 6, dtype=F64)
    with torch.no_grad():
        Y = torch.randn_like(model(X))
    return model, X, Y


@pytest.mark.parametrize("kind", ["linear", "tokens", "conv"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
def test_factors_equal_definitions(kind, approx, fisher):
    model, X, Y = make(kind)
    task = RegressionTask()
    cfg = CurvatureConfig(method="kfac", approx=approx, fisher=fisher, dtype=F64, seed=5)
    curv = fit_curvature(model, task, (X, Y), cfg, draws_per_forward=4, progress=False)
    XI = task.draws((X, Y), torch.arange(9), "fit", num_draws=1, seed=5).data["xi"] if fisher == "mc" else None
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert sorted(curv.module_names) == sorted(layers)
    for name, layer in layers.items():
        A, G = bf.factors_by_definition(model, layer, X, Y, XI, fisher, approx)
        torch.testing.assert_close(curv.A(name), A, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(curv.G(name), G, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["tokens", "conv"])
@pytest.mark.parametrize("fisher", ["type2", "mc"])
def test_ekfac_eigenvalues_equal_rotated_squared_gradients(kind, fisher):
    model, X, Y = make(kind)
    task = RegressionTask()
    cfg = CurvatureConfig(method="ekfac", fisher=fisher, dtype=F64, seed=2, num_draws=2 if fisher == "mc" else None)
    curv = fit_curvature(model, task, (X, Y), cfg, draws_per_forward=3, progress=False)
    m = 2 if fisher == "mc" else 1
    rows = task.draws((X, Y), torch.arange(9), "fit", num_draws=m, seed=2)
    layers = {n: l for n, l in model.named_modules() if isinstance(l, (nn.Linear, nn.Conv2d))}
    sums = {n: 0 for n in layers}
    for i in range(len(rows)):
        f = model(rows.data["inputs"][i:i + 1])[0]
        xi = rows.data["xi"][i] if fisher == "mc" else None
        for v in bf.vectors(fisher, f, rows.data["target"][i], xi):
            grads = bf.param_grads(model, layers, (f * v).sum())
            f = model(rows.data["inputs"][i:i + 1])[0]
            for n, dw in grads.items():
                qa, qg = curv.eigenbases(n)
                sums[n] = sums[n] + (qg.T @ dw @ qa) ** 2
    for n in layers:
        torch.testing.assert_close(curv.eigenvalues(n), sums[n] / len(rows), rtol=1e-10, atol=1e-14)


def test_kfac_eigenvalues_are_products():
    model, X, Y = make("conv")
    curv = fit_curvature(model, RegressionTask(), (X, Y), CurvatureConfig(method="kfac", dtype=F64), progress=False)
    for n in curv.module_names:
        sA = torch.linalg.eigvalsh(curv.A(n)).clamp_min(0)
        sG = torch.linalg.eigvalsh(curv.G(n)).clamp_min(0)
        lam = curv.eigenvalues(n)
        torch.testing.assert_close(torch.sort(lam.flatten()).values, torch.sort(torch.outer(sG, sA).flatten()).values,
                                   rtol=1e-9, atol=1e-14)
