"""The torch references of kfac_kernels against float64 brute force (loops, dense Kronecker algebra)."""
import pytest
import torch

import kfac_kernels as kk
from kfac_kernels.ops import eigen_correction as ec

import bruteforce as bf

F64 = torch.float64


def rand_orth(n, gen):
    return torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))[0]


@pytest.mark.parametrize("reduce", [False, True])
def test_conv_covariance_equals_loop_patches(reduce):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 7, 5, dtype=F64, generator=gen)
    k, s, p, d = (3, 2), (2, 1), (1, 2), (2, 1)
    got = kk.conv_covariance(x, k, s, p, d, reduce=reduce, append_one=True, backend="torch")
    ref = 0
    for n in range(3):
        pt = bf.patches_by_loops(x[n], k, s, p, d)
        pt = torch.cat([pt, torch.ones(pt.shape[0], 1, dtype=F64)], 1)
        if reduce:
            pt = pt.mean(0, keepdim=True)
        ref = ref + pt.T @ pt
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("r", [1, 3, 40])  # R = 1 (GEMM of squares), rotate-first, contract-first
def test_eigenvalue_correction_and_self_scores_equal_loops(r):
    gen = torch.Generator().manual_seed(r)
    b, d_in, d_out = 5, 4, 3
    a = torch.randn(b, r, d_in, dtype=F64, generator=gen)
    g = torch.randn(b, r, d_out, dtype=F64, generator=gen)
    qa, qg = rand_orth(d_in + 1, gen), rand_orth(d_out, gen)
    lam = torch.rand(d_out, d_in + 1, dtype=F64, generator=gen)
    zs = []
    for n in range(b):
        dw = sum(torch.outer(g[n, i], torch.cat([a[n, i], torch.ones(1, dtype=F64)])) for i in range(r))
        zs.append(qg.T @ dw @ qa)
    zs = torch.stack(zs)
    torch.testing.assert_close(kk.eigenvalue_correction(a, g, qa, qg, append_one=True, backend="torch"),
                               (zs ** 2).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kk.eigenbasis_self_scores(a, g, qa, qg, lam, 0.1, append_one=True, backend="torch"),
                               ((zs ** 2) / (lam + 0.1)).sum((1, 2)), rtol=1e-12, atol=1e-12)
    both = [torch.cat(list(ec.rotated_gradients(a, g, qa, qg, append_one=True, chunk_size=c))) for c in (1, 2, 5)]
    for z in both:
        torch.testing.assert_close(z, zs, rtol=1e-12, atol=1e-12)


def test_precondition_equals_dense_kronecker_solve():
    gen = torch.Generator().manual_seed(1)
    d_in, d_out = 4, 3
    qa, qg = rand_orth(d_in, gen), rand_orth(d_out, gen)
    lam = torch.rand(d_out, d_in, dtype=F64, generator=gen)
    v = torch.randn(2, d_out, d_in, dtype=F64, generator=gen)
    q = torch.kron(qa, qg)  # acts on column-major vec
    dense = q @ torch.diag(lam.T.reshape(-1) + 0.05) @ q.T
    ref = torch.linalg.solve(dense, v.transpose(1, 2).reshape(2, -1).T).T.reshape(2, d_in, d_out).transpose(1, 2)
    torch.testing.assert_close(kk.precondition(v, qa, qg, lam, 0.05, backend="torch"), ref, rtol=1e-12, atol=1e-12)


def test_pairwise_equals_per_example_gradient_loops():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 5, 3, dtype=F64, generator=gen)
    g = torch.randn(6, 5, 2, dtype=F64, generator=gen)
    p = torch.randn(4, 2, 4, dtype=F64, generator=gen)
    ref = torch.zeros(4, 6, dtype=F64)
    for n in range(6):
        dw = sum(torch.outer(g[n, i], torch.cat([a[n, i], torch.ones(1, dtype=F64)])) for i in range(5))
        ref[:, n] = (p * dw).sum((1, 2))
    from kfac_kernels.ops.pairwise import pairwise_scores_reference
    for chunk in (1, 4, None):
        torch.testing.assert_close(pairwise_scores_reference(a, g, p, append_one=True, chunk_size=chunk), ref,
                                   rtol=1e-12, atol=1e-12)


def test_int8_queries_roundtrip():
    x = torch.randn(3, 5, 7) * torch.tensor([1.0, 10.0, 0.01])[:, None, None]
    q = kk.quantize_int8(x)
    assert q.q.dtype == torch.int8
    err = (q.dequantize() - x).abs().amax(dim=(1, 2))
    assert (err <= q.scale * 0.5001).all()
