"""Triton fused pairwise scores (per-example gradient tiles on chip, float and int8 queries) against float64."""
import pytest
import torch

from kernel_check import DTYPES, assert_flash_rule, lowp_pairwise, randn, requires_triton
from kfac_kernels.ops import pairwise as pw

pytestmark = requires_triton

SHAPES = [(3, 5, 19, 13, 5), (17, 1, 9, 21, 18), (18, 17, 7, 5, 3)]  # (B, R, D_in, D_out, Q)


def _inputs(shape, append_one, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    b, r, d_in, d_out, nq = shape
    return (randn(b, r, d_in, dtype=dtype, gen=gen), randn(b, r, d_out, dtype=dtype, gen=gen),
            randn(nq, d_out, d_in + append_one, dtype=dtype, gen=gen))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("append_one", [False, True])
def test_pairwise_scores(dtype, shape, append_one):
    a, g, p = _inputs(shape, append_one, dtype, seed=30)
    ref = pw.pairwise_scores_reference(a.double(), g.double(), p.double(), append_one=append_one)
    out = pw.pairwise_scores_triton(a, g, p, append_one=append_one)
    assert out.shape == (shape[4], shape[0])
    assert_flash_rule(out, lowp_pairwise(a, g, p, append_one), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [None, 4])
def test_pairwise_scores_int8_queries(dtype, split):
    a, g, p = _inputs(SHAPES[0], True, torch.float32, seed=31)
    q = pw.quantize_int8(p)
    a, g = a.to(dtype), g.to(dtype)
    ref = pw.pairwise_scores_reference(a.double(), g.double(), q, append_one=True)  # dequantised in float64
    out = torch.ones(ref.shape, device=a.device)
    pw.pairwise_scores_triton(a, g, q, append_one=True, out=out, split=split)
    same = lowp_pairwise(a, g, q.dequantize(dtype), True)
    assert_flash_rule(out - 1, same, ref, dtype)


def test_quantize_int8_round_trip():
    p = randn(4, 6, 7, gen=torch.Generator().manual_seed(32))
    q = pw.quantize_int8(p)
    assert q.q.dtype == torch.int8 and q.scale.shape == (4,)
    err = (q.dequantize() - p).abs().amax(dim=(1, 2))
    assert bool((err <= 0.51 * q.scale + 1e-6).all())
