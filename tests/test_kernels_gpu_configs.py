"""The kernels at the configurations their launchers pick for real GPUs (sm_80 / sm_86 / sm_90), run in the
interpreter against float64 at awkward sizes: the block shapes, warps-independent tilings, splits and half-precision
product paths that bench/compile_check.py compiles are also numerically right. (The plain interpreter tests run
the small interpreter configuration.)"""
import pytest
import torch

from kernel_check import (DTYPES, assert_flash_rule, lowp_conv_covariance, lowp_eigenvalue_correction,
                          lowp_linear_covariance, lowp_pairwise, lowp_precondition, lowp_self_scores, orthogonal,
                          randn, requires_triton)

pytestmark = requires_triton

CAPS = [80, 90]  # sm_86 / sm_89 pick the same shapes as sm_80 below 99 KB (compile_check shows each target's)


@pytest.fixture(params=CAPS, ids=lambda c: f"sm_{c}")
def gpu_target(request):
    from kfac_kernels.ops._triton_common import Target, target_override

    with target_override(Target.of(request.param, sms=2)) as t:  # 2 SMs: splits stay small in the interpreter
        yield t


@pytest.mark.parametrize("dtype", DTYPES)
def test_covariances_at_gpu_configs(gpu_target, dtype):
    from kfac_kernels.ops import covariance as cov

    gen = torch.Generator().manual_seed(50)
    a = randn(45, 131, dtype=dtype, gen=gen)  # 3 tiles of 64 (and one of 128 for half operands when wide)
    ref = cov.linear_covariance_reference(a.double(), append_one=True)
    assert_flash_rule(cov.linear_covariance_triton(a, append_one=True), lowp_linear_covariance(a, True), ref, dtype)
    x = randn(2, 9, 7, 6, dtype=dtype, gen=gen)  # D = 81: two 64-wide tiles of patches
    for reduce in (False, True):
        ref = cov.conv_covariance_reference(x.double(), 3, padding=1, reduce=reduce, append_one=True)
        out = cov.conv_covariance_triton(x, 3, padding=1, reduce=reduce, append_one=True)
        assert_flash_rule(out, lowp_conv_covariance(x, reduce, True, kernel_size=3, padding=1), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_half_gram_tile(gpu_target, dtype):
    """dp >= 512 with half operands and no split: the 128-wide, non-atomic configuration."""
    from kfac_kernels.ops import covariance as cov

    a = randn(37, 600, dtype=dtype, gen=torch.Generator().manual_seed(51))
    config, split = cov.gram_plan(601, 37, dtype, gpu_target)
    assert (config.block_d == 128) == (dtype != torch.float32) and split == 1
    ref = cov.linear_covariance_reference(a.double(), append_one=True)
    assert_flash_rule(cov.linear_covariance_triton(a, append_one=True), lowp_linear_covariance(a, True), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 6])
def test_eigen_ops_at_gpu_configs(gpu_target, dtype, r):
    from kfac_kernels.ops import eigen_correction as ec

    gen = torch.Generator().manual_seed(52)
    b, d_in, d_out = (37 if r == 1 else 5), 70, 66
    a, g = randn(b, r, d_in, dtype=dtype, gen=gen), randn(b, r, d_out, dtype=dtype, gen=gen)
    qa, qg = orthogonal(d_in + 1, dtype, gen), orthogonal(d_out, dtype, gen)
    f64 = [t.double() for t in (a, g, qa, qg)]
    ref = ec.eigenvalue_correction_reference(*f64, append_one=True)
    out = ec.eigenvalue_correction_triton(a, g, qa, qg, append_one=True)
    assert_flash_rule(out, lowp_eigenvalue_correction(a, g, qa, qg, True), ref, dtype)
    if r > 1:
        lam = (torch.rand(d_out, d_in + 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        ref = ec.eigenbasis_self_scores_reference(*f64, lam.double(), 0.1, append_one=True)
        out = ec.eigenbasis_self_scores_triton(a, g, qa, qg, lam, 0.1, append_one=True)
        assert_flash_rule(out, lowp_self_scores(a, g, qa, qg, lam, 0.1, True), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_precondition_at_gpu_configs(gpu_target, dtype):
    from kfac_kernels.ops import precondition as pc

    gen = torch.Generator().manual_seed(53)
    v = randn(3, 67, 70, dtype=dtype, gen=gen)
    qa, qg = orthogonal(70, dtype, gen), orthogonal(67, dtype, gen)
    lam = (torch.rand(67, 70, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    ref = pc.precondition_reference(v.double(), qa.double(), qg.double(), lam.double(), 0.05)
    assert_flash_rule(pc.precondition_triton(v, qa, qg, lam, 0.05), lowp_precondition(v, qa, qg, lam, 0.05), ref,
                      dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 5])  # R = 1: _pairwise_r1_kernel (no per-example gradient product)
def test_pairwise_at_gpu_configs(gpu_target, dtype, r):
    from kfac_kernels.ops import pairwise as pw

    gen = torch.Generator().manual_seed(54)
    b = 37 if r == 1 else 18
    a, g = randn(b, r, 19, dtype=dtype, gen=gen), randn(b, r, 21, dtype=dtype, gen=gen)
    p = randn(67, 21, 20, dtype=dtype, gen=gen)  # 67 queries: two query blocks at either BLOCK_Q
    ref = pw.pairwise_scores_reference(a.double(), g.double(), p.double(), append_one=True)
    assert_flash_rule(pw.pairwise_scores_triton(a, g, p, append_one=True), lowp_pairwise(a, g, p, True), ref, dtype)
    q = pw.quantize_int8(p.float())
    ref = pw.pairwise_scores_reference(a.double(), g.double(), q, append_one=True)
    assert_flash_rule(pw.pairwise_scores_triton(a, g, q, append_one=True),
                      lowp_pairwise(a, g, q.dequantize(dtype), True), ref, dtype)
