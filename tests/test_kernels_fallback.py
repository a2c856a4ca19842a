"""A user's GPU run never crashes because of a kernel: when the default (device-chosen) Triton path of an op fails,
the dispatcher runs the op's torch implementation, warns once and remembers the choice for (op, device).

CPU tensors default to torch, so these tests resolve for a CUDA device (``dispatch.resolve(op, cuda)`` returns the
guarded Triton path, whose kernels run in the interpreter on the CPU tensors given) and make a launch fail the way
it can on a GPU: the op module's ``launch`` (through which every kernel launch goes) raises Triton's
OutOfResources, a CompilationError, a RuntimeError from the driver, or the device is not a target at all."""
import ast
import warnings

import pytest
import torch

import kfac_kernels
from kernel_check import orthogonal, randn, requires_triton
from kfac_kernels import dispatch

pytestmark = requires_triton

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.reset_fallbacks()
    yield
    dispatch.reset_fallbacks()


def _failures():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from kfac_kernels.ops._triton_common import UnsupportedTarget

    return {
        "out_of_resources": lambda: OutOfResources(131072, 101376, "shared memory"),
        "compilation_error": lambda: CompilationError("def k(): ...", ast.parse("x").body[0], "bad dot layout"),
        "runtime_error": lambda: RuntimeError("CUDA error: an illegal instruction was encountered"),
        "unsupported_arch": lambda: UnsupportedTarget("sm_75 is older than sm_80"),
    }


def _op_cases():
    """(op, op module, args, kwargs) for every op, at small awkward sizes."""
    from kfac_kernels.ops import covariance as cov, eigen_correction as ec, lowrank as lr, pairwise as pw
    from kfac_kernels.ops import precondition as pc

    gen = torch.Generator().manual_seed(40)
    a, g = randn(3, 5, 7, gen=gen), randn(3, 5, 6, gen=gen)
    qa, qg = orthogonal(8, gen=gen), orthogonal(6, gen=gen)
    lam = torch.rand(6, 8, generator=gen) + 0.5
    p = randn(4, 6, 8, gen=gen)
    x = randn(2, 3, 6, 5, gen=gen)
    return [
        ("linear_covariance", cov, (a[:, 0],), dict(append_one=True)),
        ("conv_covariance", cov, (x, 3, 1, 1, 1), dict(append_one=True)),
        ("eigenvalue_correction", ec, (a, g, qa, qg), dict(append_one=True)),
        ("eigenbasis_self_scores", ec, (a, g, qa, qg, lam, 0.1), dict(append_one=True)),
        ("precondition", pc, (p, qa, qg, lam, 0.1), {}),
        ("pairwise_scores", pw, (a, g, p), dict(append_one=True)),
        ("lowrank_pairwise_scores", lr, (a, g, kfac_kernels.lowrank_queries(p, 2)), dict(append_one=True)),
    ]


def _failing_launch(exc_factory, calls):
    def launch(*args, **kwargs):
        calls.append(args[0])
        raise exc_factory()
    return launch


@pytest.mark.parametrize("kind", ["out_of_resources", "compilation_error", "runtime_error", "unsupported_arch"])
@pytest.mark.parametrize("case", range(7), ids=lambda i: ["linear_cov", "conv_cov", "eig_corr", "self_scores",
                                                          "precondition", "pairwise", "lowrank"][i])
def test_failed_kernel_falls_back_to_torch_once(monkeypatch, kind, case):
    op, module, args, kwargs = _op_cases()[case]
    calls = []
    if kind == "unsupported_arch":  # the launcher's target lookup refuses the device before any launch
        def no_target(device):
            calls.append(device)
            raise _failures()[kind]()
        monkeypatch.setattr(module, "device_target", no_target)
    else:
        monkeypatch.setattr(module, "launch", _failing_launch(_failures()[kind], calls))
    fn = dispatch.resolve(op, CUDA)
    assert fn is not dispatch._REGISTRY[op]["torch"]  # the guarded Triton path
    want = dispatch._REGISTRY[op]["torch"](*args, **kwargs)
    with pytest.warns(dispatch.KernelFallbackWarning, match=op) as record:
        got = fn(*args, **kwargs)
    assert len(record) == 1
    assert type(_failures()[kind]()).__name__ in str(record[0].message)  # the reason is named
    assert torch.equal(got, want)
    assert len(calls) == 1
    with warnings.catch_warnings():  # remembered: no second warning, no second kernel attempt
        warnings.simplefilter("error")
        again = fn(*args, **kwargs)
        assert dispatch.resolve(op, CUDA) is dispatch._REGISTRY[op]["torch"]
    assert torch.equal(again, want) and len(calls) == 1
    assert list(dispatch.fallbacks()) == [(op, "cuda")]


def test_public_api_falls_back_when_triton_is_the_default(monkeypatch):
    """The path a user's CUDA tensors take (device default = triton), on CPU tensors: the public op warns once."""
    from kfac_kernels.ops import covariance as cov
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(dispatch, "_default_backend", lambda device: "triton")
    calls = []
    monkeypatch.setattr(cov, "launch", _failing_launch(lambda: OutOfResources(131072, 101376, "shared memory"),
                                                       calls))
    a = randn(9, 5, gen=torch.Generator().manual_seed(41))
    with pytest.warns(dispatch.KernelFallbackWarning, match="out of resource") as record:
        out = kfac_kernels.linear_covariance(a, append_one=True)
    assert len(record) == 1
    assert torch.equal(out, cov.linear_covariance_reference(a, append_one=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfac_kernels.linear_covariance(a, append_one=True)
        gen = torch.Generator().manual_seed(42)  # another op: its own (working) kernels
        kfac_kernels.precondition(randn(2, 3, 4, gen=gen), orthogonal(4, gen=gen), orthogonal(3, gen=gen),
                                  torch.rand(3, 4, generator=gen), 0.1)
    assert len(calls) == 1 and dispatch.fallbacks().keys() == {("linear_covariance", "cpu")}


def test_forced_triton_still_raises(monkeypatch):
    from kfac_kernels.ops import covariance as cov
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(cov, "launch", _failing_launch(lambda: OutOfResources(1, 0, "shared memory"), []))
    a = randn(9, 5)
    with pytest.raises(OutOfResources):
        dispatch.resolve("linear_covariance", CUDA, backend="triton")(a)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(OutOfResources):
        dispatch.resolve("linear_covariance", CUDA)(a)
    assert not dispatch.fallbacks()


def test_callers_errors_are_raised_not_remembered():
    """Bad arguments fail in torch too: the torch error is raised and the op keeps its Triton path."""
    fn = dispatch.resolve("linear_covariance", CUDA)
    with pytest.raises(ValueError, match="dimensions"):
        fn(torch.randn(2, 3, 4))
    assert not dispatch.fallbacks()
    assert dispatch.resolve("linear_covariance", CUDA) is not dispatch._REGISTRY["linear_covariance"]["torch"]


def test_fallback_is_per_device(monkeypatch):
    from kfac_kernels.ops import covariance as cov

    monkeypatch.setattr(cov, "launch", _failing_launch(lambda: RuntimeError("no kernel image"), []))
    with pytest.warns(dispatch.KernelFallbackWarning):
        dispatch.resolve("linear_covariance", torch.device("cuda:1"))(randn(4, 3))
    assert dispatch.resolve("linear_covariance", torch.device("cuda:1")) is cov.linear_covariance_reference
    assert dispatch.resolve("linear_covariance", torch.device("cuda:0")) is not cov.linear_covariance_reference
