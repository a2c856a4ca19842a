"""Low-rank query gradients: the truncated SVD is the best rank-k approximation, and scores from the projections
equal the definition (explicit per-example gradients against the dense rank-k matrices) in float64, for rows and
for conv patches."""
import pytest
import torch

import kfac_kernels as kk
from kfac_kernels.ops.lowrank import lowrank_pairwise_scores_reference

F64 = torch.float64


def _explicit_scores(a_rows, g, p, append_one):
    """S[q, b] = <p_q, sum_r g_br [a_br, 1]^T>, per-example gradients formed one by one."""
    if append_one:
        a_rows = torch.cat([a_rows, torch.ones(*a_rows.shape[:2], 1, dtype=a_rows.dtype)], dim=-1)
    grads = torch.stack([g[b].T @ a_rows[b] for b in range(g.shape[0])])  # (B, D_out, D_in')
    return torch.einsum("qoi,boi->qb", p, grads)


@pytest.mark.parametrize("shape", [(5, 3, 7, 4, 3, 2), (2, 9, 5, 11, 4, 3), (6, 1, 13, 6, 2, 5)])  # B R Di Do Q k
@pytest.mark.parametrize("append_one", [False, True])
def test_lowrank_scores_equal_the_definition(shape, append_one):
    b, r, d_in, d_out, nq, k = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(b, r, d_in, generator=gen, dtype=F64)
    g = torch.randn(b, r, d_out, generator=gen, dtype=F64)
    p = torch.randn(nq, d_out, d_in + append_one, generator=gen, dtype=F64)
    lr = kk.lowrank_queries(p, k)
    want = _explicit_scores(a, g, lr.dense(), append_one)
    got = kk.lowrank_pairwise_scores(a, g, lr, append_one=append_one)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # chunks of examples: the same
    torch.testing.assert_close(lowrank_pairwise_scores_reference(a, g, lr, append_one=append_one, chunk_size=2),
                               want, rtol=1e-12, atol=1e-12)
    # full rank: the full-rank scores
    full = kk.lowrank_queries(p, min(p.shape[1:]))
    torch.testing.assert_close(kk.lowrank_pairwise_scores(a, g, full, append_one=append_one),
                               kk.pairwise_scores(a, g, p, append_one=append_one), rtol=1e-10, atol=1e-10)


def test_truncated_svd_is_the_best_rank_k_approximation():
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(4, 9, 6, generator=gen, dtype=F64)
    s = torch.linalg.svdvals(p)
    for k in (1, 3, 6, 10):
        lr = kk.lowrank_queries(p, k)
        assert lr.rank == min(k, 6)
        err = torch.linalg.matrix_norm(p - lr.dense())  # Frobenius
        torch.testing.assert_close(err, s[:, min(k, 6):].pow(2).sum(-1).sqrt(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="rank must be"):
        kk.lowrank_queries(p, 0)


@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (2, 1, 0, 2)])  # kernel, stride, padding, dil.
def test_lowrank_scores_on_conv_patches(geometry):
    k, stride, pad, dil = geometry
    gen = torch.Generator().manual_seed(k + stride)
    x = torch.randn(3, 4, 7, 6, generator=gen, dtype=F64)
    patches = kk.ConvPatches(x, k, stride, pad, dil)
    rows = patches.rows()
    g = torch.randn(3, rows.shape[1], 5, generator=gen, dtype=F64)
    p = torch.randn(2, 5, rows.shape[-1] + 1, generator=gen, dtype=F64)
    lr = kk.lowrank_queries(p, 3)
    torch.testing.assert_close(kk.lowrank_pairwise_scores(patches, g, lr, append_one=True),
                               _explicit_scores(rows, g, lr.dense(), True), rtol=1e-12, atol=1e-12)


def test_lowrank_shapes_are_checked():
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    lr = kk.lowrank_queries(torch.randn(2, 5, 4), 2)
    with pytest.raises(ValueError, match="do not fit"):
        kk.lowrank_pairwise_scores(a, g, lr, append_one=True)
