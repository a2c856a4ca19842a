"""Drop-in adapters: kronfluence with ``use_kfac_kernels()`` and dattri's ``EKFACAttributor`` give the same factors
and scores as the libraries' own code (float64), on a diffusers UNet (kronfluence) and an MLP (dattri)."""
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_unet  # noqa: E402

F64 = torch.float64


def unet_data(n=6, q=3, size=4):
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(n + q, 1, size, size, generator=gen, dtype=F64)
    t = torch.randint(0, 1000, (n + q,), generator=gen)
    eps = torch.randn(n + q, 1, size, size, generator=gen, dtype=F64)
    train = torch.utils.data.TensorDataset(x_t[:n], t[:n], eps[:n])
    query = torch.utils.data.TensorDataset(x_t[n:], t[n:], eps[n:])
    return train, query


def run_kronfluence(tmp_path, adapter: bool):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Loss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x_t, t, eps = batch
            return (model(x_t, t).sample - eps).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    model = prepare_model(tiny_unet(size=4, channels=(4, 8)), Loss())
    train, query = unet_data()
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=F64,
                            gradient_covariance_dtype=F64, per_sample_gradient_dtype=F64, lambda_dtype=F64)
    sargs = ScoreArguments(damping_factor=1e-4, per_sample_gradient_dtype=F64, precondition_dtype=F64,
                           score_dtype=F64)
    analyzer = Analyzer("t", model, Loss(), cpu=True, disable_tqdm=True, log_level=logging.ERROR,
                        output_dir=str(tmp_path / ("kk" if adapter else "kf")))
    from contextlib import nullcontext
    ctx = nullcontext()
    if adapter:
        from kfac_kernels.integrations.kronfluence import use_kfac_kernels
        ctx = use_kfac_kernels()
    with ctx:
        analyzer.fit_all_factors("f", train, per_device_batch_size=4, factor_args=fargs, overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("s", "f", query, train, per_device_query_batch_size=3,
                                         per_device_train_batch_size=4, score_args=sargs, overwrite_output_dir=True)
    factors = {**analyzer.load_covariance_matrices("f"), **analyzer.load_all_factors("f")}
    return factors, analyzer.load_pairwise_scores("s")["all_modules"]


def test_kronfluence_adapter_same_factors_and_scores(tmp_path, monkeypatch):
    pytest.importorskip("kronfluence")
    import kfac_kernels

    calls = {}
    for op in ("conv_covariance", "linear_covariance", "eigenvalue_correction", "pairwise_scores"):
        def counted(*args, _f=getattr(kfac_kernels, op), _op=op, **kw):
            calls[_op] = calls.get(_op, 0) + 1
            return _f(*args, **kw)
        monkeypatch.setattr(kfac_kernels, op, counted)
    from kronfluence.module.conv2d import TrackedConv2d
    from kronfluence.module.tracker.factor import CovarianceTracker
    from kronfluence.utils.constants import ACTIVATION_COVARIANCE_MATRIX_NAME, LAMBDA_MATRIX_NAME

    before = (CovarianceTracker.register_hooks, TrackedConv2d.compute_pairwise_score)
    f_ref, s_ref = run_kronfluence(tmp_path, adapter=False)
    f_kk, s_kk = run_kronfluence(tmp_path, adapter=True)
    assert (CovarianceTracker.register_hooks, TrackedConv2d.compute_pairwise_score) == before  # restored
    assert all(calls.get(op, 0) > 0 for op in ("conv_covariance", "linear_covariance", "eigenvalue_correction",
                                                "pairwise_scores")), calls  # the adapter ran our ops
    assert s_ref.shape == (3, 6) and s_ref.abs().min() > 0
    torch.testing.assert_close(s_kk, s_ref, rtol=1e-8, atol=1e-10)
    for kind in (ACTIVATION_COVARIANCE_MATRIX_NAME, LAMBDA_MATRIX_NAME):
        assert len(f_ref[kind]) > 20  # convs, time MLP, attention projections
        for name, ref in f_ref[kind].items():
            torch.testing.assert_close(f_kk[kind][name], ref, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{kind} {name}: {m}")


def test_dattri_attributor_same_scores():
    pytest.importorskip("dattri")
    from dattri.algorithm.influence_function import IFAttributorEKFAC
    from dattri.task import AttributionTask
    from torch.func import functional_call

    from kfac_kernels.integrations.dattri import EKFACAttributor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x, y = torch.randn(40, 6, dtype=F64), torch.randn(40, 3, dtype=F64)

    def loss(params, data):
        xb, yb = data
        out = functional_call(model, params, (xb,))
        return (out - yb).pow(2).mean()

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32], y[:32]), batch_size=8)
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[32:], y[32:]), batch_size=8)
    scores = []
    for cls in (IFAttributorEKFAC, EKFACAttributor):
        attributor = cls(task=task, module_name=["0", "2"], device="cpu", damping=1e-3)
        torch.manual_seed(1)  # dattri samples from the model's predictive distribution for the FIM
        attributor.cache(train)
        scores.append(attributor.attribute(train, test))
    assert scores[0].shape == (32, 8) and scores[0].abs().max() > 0
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-9, atol=1e-12)
