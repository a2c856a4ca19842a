"""Dispatch: CPU tensors default to torch, KFAC_KERNELS_BACKEND forces a backend, a missing one raises."""
import pytest
import torch

import kfac_kernels
from kernel_check import requires_triton
from kfac_kernels import dispatch
from kfac_kernels.ops import covariance as cov

OPS = ["linear_covariance", "conv_covariance", "eigenvalue_correction", "eigenbasis_self_scores", "precondition",
       "pairwise_scores", "lowrank_pairwise_scores"]


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    for op in OPS:
        assert dispatch.resolve(op, torch.device("cpu")) is dispatch._REGISTRY[op]["torch"]


@requires_triton
def test_every_op_has_a_triton_backend():
    for op in OPS:
        assert "triton" in dispatch.available(op)


@requires_triton
def test_env_var_forces_triton(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.resolve("linear_covariance", torch.device("cpu")) is cov.linear_covariance_triton
    a = torch.randn(9, 5)
    out = kfac_kernels.linear_covariance(a, append_one=True)
    assert torch.allclose(out, cov.linear_covariance_reference(a, append_one=True), atol=1e-5)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve("linear_covariance", torch.device("cpu")) is cov.linear_covariance_reference


def test_explicit_missing_backend_raises(monkeypatch):
    """An op with only a torch implementation: asking for Triton by argument or environment raises instead of
    silently running torch; the default still runs torch."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setitem(dispatch._REGISTRY, "test_torch_only", {})
    dispatch.register("test_torch_only", "torch")(lambda x: x + 1)
    assert dispatch.available("test_torch_only") == ("torch",)
    assert dispatch.resolve("test_torch_only", torch.device("cpu"))(1) == 2
    with pytest.raises(RuntimeError, match="no 'triton' backend"):
        dispatch.resolve("test_torch_only", torch.device("cpu"), backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="no 'triton' backend"):
        dispatch.resolve("test_torch_only", torch.device("cpu"))


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError):
        dispatch.resolve("linear_covariance", torch.device("cpu"))
