"""Triton EK-FAC eigenvalue correction and eigenbasis self-scores against float64 references (interpreter)."""
import pytest
import torch

from kernel_check import (DTYPES, assert_flash_rule, lowp_eigenvalue_correction, lowp_self_scores, orthogonal,
                          randn, requires_triton)
from kfac_kernels.ops import eigen_correction as ec

pytestmark = requires_triton

# (B, R, D_in, D_out): R = 1 takes the GEMM-of-squares kernel; none of the sizes is a multiple of the block (16).
SHAPES = [(3, 5, 19, 13), (5, 21, 9, 17), (37, 1, 19, 21)]


def _inputs(shape, append_one, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    b, r, d_in, d_out = shape
    return (randn(b, r, d_in, dtype=dtype, gen=gen), randn(b, r, d_out, dtype=dtype, gen=gen),
            orthogonal(d_in + append_one, dtype, gen), orthogonal(d_out, dtype, gen))


def _f64(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("append_one", [False, True])
def test_eigenvalue_correction(dtype, shape, append_one):
    a, g, qa, qg = _inputs(shape, append_one, dtype, seed=10)
    ref = ec.eigenvalue_correction_reference(*_f64(a, g, qa, qg), append_one=append_one)
    out = ec.eigenvalue_correction_triton(a, g, qa, qg, append_one=append_one)
    assert out.shape == ref.shape
    assert_flash_rule(out, lowp_eigenvalue_correction(a, g, qa, qg, append_one), ref, dtype)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_eigenvalue_correction_split_accumulates(shape):
    a, g, qa, qg = _inputs(shape, True, torch.float32, seed=11)
    ref = ec.eigenvalue_correction_reference(*_f64(a, g, qa, qg), append_one=True)
    out = torch.full(ref.shape, 2.0, device=a.device)
    ec.eigenvalue_correction_triton(a, g, qa, qg, append_one=True, out=out, split=3)
    assert_flash_rule(out - 2.0, ec.eigenvalue_correction_reference(a, g, qa, qg, append_one=True), ref,
                      torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[::2])
@pytest.mark.parametrize("append_one", [False, True])
def test_eigenbasis_self_scores(dtype, shape, append_one):
    a, g, qa, qg = _inputs(shape, append_one, dtype, seed=12)
    gen = torch.Generator().manual_seed(13)
    lam = (torch.rand(shape[3], shape[2] + append_one, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    lam = lam.to(a.device)
    ref = ec.eigenbasis_self_scores_reference(*_f64(a, g, qa, qg, lam), 0.1, append_one=append_one)
    out = ec.eigenbasis_self_scores_triton(a, g, qa, qg, lam, 0.1, append_one=append_one)
    assert out.shape == (shape[0],)
    assert_flash_rule(out, lowp_self_scores(a, g, qa, qg, lam, 0.1, append_one), ref, dtype)
