"""pytest-benchmark microbenchmarks of every op at representative layers of the digits-tiny and cifar-ddpm models.

CPU: the torch reference. CUDA: every registered backend (torch and triton). Run with
``make bench`` or ``pytest bench --benchmark-only``; the GPU check (bench/gpu_check.sh) is the place for
kernel-vs-composition speed-ups, memory and roofline.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kfac_kernels import ConvPatches, dispatch, lowrank_queries  # noqa: E402
from kfac_kernels.ops import covariance as cov, eigen_correction as ec, pairwise as pw  # noqa: E402,F401
from kfac_kernels.ops import precondition as pc  # noqa: E402,F401
from shapes import CIFAR, DIGITS, QUERIES, layer_dims  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_BATCH_CAP = 8  # examples per call on CPU: keeps the cifar layers to about a second per round


def _backends(op):
    have = dispatch.available(op)
    return list(have) if DEV == "cuda" else [b for b in ("torch",) if b in have]


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _inputs(s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r, d_in, d_out = layer_dims(s)
    b = s["batch"] if DEV == "cuda" else min(s["batch"], CPU_BATCH_CAP if r > 1 else s["batch"])
    dp = d_in + 1
    a = torch.randn(b, r, d_in, generator=gen).to(DEV)
    g = (torch.randn(b, r, d_out, generator=gen) / math.sqrt(r)).to(DEV)
    qa = torch.linalg.qr(torch.randn(dp, dp, generator=gen))[0].to(DEV)
    qg = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen))[0].to(DEV)
    lam = (torch.rand(d_out, dp, generator=gen) + 0.1).to(DEV)
    p = torch.randn(QUERIES, d_out, dp, generator=gen).to(DEV)
    return a, g, qa, qg, lam, p


LAYERS = [pytest.param(s, id=s["name"].replace(" ", "_")) for s in DIGITS + CIFAR]


def _run(benchmark, fn):
    def call():
        out = fn()
        _sync()
        return out
    benchmark.pedantic(call, rounds=3 if DEV == "cpu" else 20, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_covariance(benchmark, layer, backend):
    if backend not in _backends("linear_covariance"):
        pytest.skip(f"{backend} is not benchmarked on {DEV}")
    if layer["kind"] == "conv":
        b = layer["batch"] if DEV == "cuda" else min(layer["batch"], CPU_BATCH_CAP)
        x = torch.randn(b, layer["c_in"], layer["hw"], layer["hw"], device=DEV)
        fn = dispatch.resolve("conv_covariance", x.device, backend)
        _run(benchmark, lambda: fn(x, layer["k"], 1, layer["k"] // 2, 1, append_one=True))
    else:
        a = _inputs(layer)[0]
        fn = dispatch.resolve("linear_covariance", a.device, backend)
        _run(benchmark, lambda: fn(a.reshape(-1, a.shape[-1]), append_one=True))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eigenvalue_correction(benchmark, layer, backend):
    if backend not in _backends("eigenvalue_correction"):
        pytest.skip(f"{backend} is not benchmarked on {DEV}")
    a, g, qa, qg, _, _ = _inputs(layer)
    fn = dispatch.resolve("eigenvalue_correction", a.device, backend)
    _run(benchmark, lambda: fn(a, g, qa, qg, append_one=True))


@pytest.mark.parametrize("layer", [p for p in LAYERS if layer_dims(p.values[0])[0] > 1])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_self_scores(benchmark, layer, backend):
    if backend not in _backends("eigenbasis_self_scores"):
        pytest.skip(f"{backend} is not benchmarked on {DEV}")
    a, g, qa, qg, lam, _ = _inputs(layer)
    fn = dispatch.resolve("eigenbasis_self_scores", a.device, backend)
    _run(benchmark, lambda: fn(a, g, qa, qg, lam, 1e-3, append_one=True))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_precondition(benchmark, layer, backend):
    if backend not in _backends("precondition"):
        pytest.skip(f"{backend} is not benchmarked on {DEV}")
    _, _, qa, qg, lam, p = _inputs(layer)
    p = p[:16]
    fn = dispatch.resolve("precondition", p.device, backend)
    _run(benchmark, lambda: fn(p, qa, qg, lam, 1e-3))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32-queries", "int8-queries"])
def test_pairwise_scores(benchmark, layer, backend, int8):
    if backend not in _backends("pairwise_scores"):
        pytest.skip(f"{backend} is not benchmarked on {DEV}")
    a, g, _, _, _, p = _inputs(layer)
    q = pw.quantize_int8(p) if int8 else p
    fn = dispatch.resolve("pairwise_scores", a.device, backend)
    _run(benchmark, lambda: fn(a, g, q, append_one=True))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lowrank_pairwise_scores(benchmark, layer, backend):
    """Rank-32 queries (the middle of bench/precision_rank.py's ranks); a conv layer's input as ConvPatches, as the
    pipeline hands it."""
    if backend not in _backends("lowrank_pairwise_scores"):
        pytest.skip(f"{backend} is not benchmarked on {DEV}")
    a, g, _, _, _, p = _inputs(layer)
    if layer["kind"] == "conv":
        x = torch.randn(a.shape[0], layer["c_in"], layer["hw"], layer["hw"], device=DEV)
        a = ConvPatches(x, layer["k"], 1, layer["k"] // 2)
    q = lowrank_queries(p, 32)
    fn = dispatch.resolve("lowrank_pairwise_scores", g.device, backend)
    _run(benchmark, lambda: fn(a, g, q, append_one=True))
