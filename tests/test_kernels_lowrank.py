"""Triton low-rank pairwise scores (both projections fused on chip, implicit im2col for conv inputs) against
float64, on sizes that are no multiple of any block: tiles of several examples (R > 1), of one example's positions
and of many one-position examples (R = 1), position splits meeting through atomics."""
import pytest
import torch

import kfac_kernels as kk
from kernel_check import DTYPES, assert_flash_rule, lowp_lowrank, randn, requires_triton
from kfac_kernels.ops import lowrank as lr

pytestmark = requires_triton

SHAPES = [(3, 5, 19, 13, 7, 3), (17, 1, 9, 21, 6, 4), (2, 37, 18, 17, 4, 5)]  # (B, R, D_in, D_out, Q, k)


def _queries(nq, d_out, d_in_p, k, dtype, gen):
    """Rank-k queries of random matrices, rounded to ``dtype`` (the float64 reference sees the rounded values)."""
    q = kk.lowrank_queries(torch.randn(nq, d_out, d_in_p, generator=gen, dtype=torch.float64), k)
    return lr.LowRankQueries(q.left.to(dtype), q.right.to(dtype))


def _f64(q):
    return lr.LowRankQueries(q.left.double(), q.right.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("append_one", [False, True])
def test_lowrank_scores(dtype, shape, append_one):
    b, r, d_in, d_out, nq, k = shape
    gen = torch.Generator().manual_seed(50)
    a, g = randn(b, r, d_in, dtype=dtype, gen=gen), randn(b, r, d_out, dtype=dtype, gen=gen)
    q = _queries(nq, d_out, d_in + append_one, k, dtype, gen)
    ref = lr.lowrank_pairwise_scores_reference(a.double(), g.double(), _f64(q), append_one=append_one)
    out = lr.lowrank_pairwise_scores_triton(a, g, q, append_one=append_one)
    assert out.shape == (nq, b) and out.dtype == torch.float32
    assert_flash_rule(out, lowp_lowrank(a, g, q.left, q.right, append_one), ref, dtype)


@pytest.mark.parametrize("split", [1, 3])
def test_lowrank_scores_split_positions_accumulate(split):
    """Position shares meet through atomics (split 3) or one program stores (split 1); ``out`` is added to."""
    b, r, d_in, d_out, nq, k = SHAPES[2]
    gen = torch.Generator().manual_seed(51)
    a, g = randn(b, r, d_in, gen=gen), randn(b, r, d_out, gen=gen)
    q = _queries(nq, d_out, d_in + 1, k, torch.float32, gen)
    ref = lr.lowrank_pairwise_scores_reference(a.double(), g.double(), _f64(q), append_one=True)
    out = torch.ones(nq, b)
    lr.lowrank_pairwise_scores_triton(a, g, q, append_one=True, out=out, split=split)
    assert_flash_rule(out - 1, lowp_lowrank(a, g, q.left, q.right, True), ref, torch.float32)


def test_lowrank_half_operands_float32_queries():
    """float16 (a, g) with float32 queries: the products are taken in float32 (no rounding of the queries)."""
    b, r, d_in, d_out, nq, k = SHAPES[0]
    gen = torch.Generator().manual_seed(52)
    a, g = randn(b, r, d_in, dtype=torch.float16, gen=gen), randn(b, r, d_out, dtype=torch.float16, gen=gen)
    q = _queries(nq, d_out, d_in + 1, k, torch.float32, gen)
    ref = lr.lowrank_pairwise_scores_reference(a.double(), g.double(), _f64(q), append_one=True)
    out = lr.lowrank_pairwise_scores_triton(a, g, q, append_one=True)
    assert_flash_rule(out, lowp_lowrank(a.float(), g.float(), q.left, q.right, True), ref, torch.float32)


@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (2, 1, 0, 2)])  # kernel, stride, padding, dil.
@pytest.mark.parametrize("append_one", [False, True])
def test_lowrank_scores_conv_patches(geometry, append_one):
    """A conv input read by implicit im2col, its output gradient as the NCHW tensor's (B, R, C) view."""
    kernel, stride, pad, dil = geometry
    gen = torch.Generator().manual_seed(53 + kernel + stride)
    x = randn(3, 4, 7, 6, gen=gen)
    patches = kk.ConvPatches(x, kernel, stride, pad, dil)
    rows = patches.rows()
    g = randn(3, 5, rows.shape[1], gen=gen).transpose(1, 2)
    q = _queries(2, 5, rows.shape[-1] + append_one, 3, torch.float32, gen)
    ref = lr.lowrank_pairwise_scores_reference(rows.double(), g.double(), _f64(q), append_one=append_one)
    out = lr.lowrank_pairwise_scores_triton(patches, g, q, append_one=append_one)
    assert_flash_rule(out, lowp_lowrank(rows, g, q.left, q.right, append_one), ref, torch.float32)


def test_lowrank_dispatch_and_float64():
    """The public op reaches the kernel by backend; float64 inputs take the reference (bit for bit)."""
    b, r, d_in, d_out, nq, k = SHAPES[0]
    gen = torch.Generator().manual_seed(54)
    a, g = randn(b, r, d_in, gen=gen), randn(b, r, d_out, gen=gen)
    q = _queries(nq, d_out, d_in, k, torch.float32, gen)
    torch.testing.assert_close(kk.lowrank_pairwise_scores(a, g, q, backend="triton"),
                               lr.lowrank_pairwise_scores_triton(a, g, q), rtol=0, atol=0)
    want = lr.lowrank_pairwise_scores_reference(a.double(), g.double(), _f64(q))
    assert torch.equal(lr.lowrank_pairwise_scores_triton(a.double(), g.double(), _f64(q)), want)


def test_row_split_wastes_least():
    """A tile's rows: one example's positions for wide layers, many examples at R = 1, in between for R = 77."""
    assert lr.row_split(4, 4096, 64) == (1, 64)
    assert lr.row_split(64, 1, 64) == (64, 1)
    assert lr.row_split(4, 77, 64) == (4, 16)
    assert lr.row_split(64, 16, 64) == (4, 16)
