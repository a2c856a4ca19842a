"""The im2col-free torch paths against float64 loop definitions: shifted-Gram patch covariance, per-tap window
sums (reduce), grouped-convolution per-example gradients, and ``ConvPatches`` in place of unfolded rows in every
op (torch, and Triton in the interpreter)."""
import pytest
import torch

import kfac_kernels as kk
from kfac_kernels.ops import covariance as cov, per_example
from kfac_kernels.ops.im2col import ConvPatches, as_rows, pair

import bruteforce as bf
from kernel_check import ATOL, requires_triton

F64 = torch.float64
FP32_FLOOR = 1e-9  # additive slack of the float32 accuracy rule (errors here are ~1e-7: the 2x factor decides)

# (kernel, padding, dilation), all stride 1 (the shifted Gram's domain): same, valid, over-padded, asymmetric,
# dilated, even and 1x1 kernels.
GEOMETRIES = [(3, 1, 1), (3, 0, 1), (3, 2, 1), ((3, 2), (1, 0), 1), (3, 1, 2), ((2, 3), (0, 2), (2, 1)), (5, 2, 1),
              (1, 0, 1), (2, 1, 1)]


@pytest.fixture
def always_shifted(monkeypatch):
    """Use the shifted Gram at every size (by default small inputs take the unfolded path)."""
    monkeypatch.setattr(cov, "SHIFTED_GRAM_MIN_CHANNELS", 0)
    monkeypatch.setattr(cov, "SHIFTED_GRAM_MIN_POSITIONS", 0)


def loop_patches(x, k, s, p, d):
    """(R, C*kh*kw) patches of one example ``x: (C, H, W)``, float64, by explicit loops."""
    return bf.patches_by_loops(x.double(), pair(k), pair(s), pair(p), pair(d))


def loop_covariance(x, k, s, p, d, reduce, append_one):
    total = 0
    for n in range(x.shape[0]):
        pt = loop_patches(x[n], k, s, p, d)
        if append_one:
            pt = torch.cat([pt, torch.ones(pt.shape[0], 1, dtype=F64)], 1)
        if reduce:
            pt = pt.mean(0, keepdim=True)
        total = total + pt.T @ pt
    return total


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("append_one", [False, True])
def test_shifted_gram_equals_loop_patches(always_shifted, geometry, append_one):
    k, p, d = geometry
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 7, 6, dtype=F64, generator=gen)
    got = kk.conv_covariance(x, k, 1, p, d, append_one=append_one, backend="torch")
    torch.testing.assert_close(got, loop_covariance(x, k, 1, p, d, False, append_one), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
@pytest.mark.parametrize("stride", [1, 2, (2, 1)])
def test_reduce_window_sums_equal_loop_patches(geometry, stride):
    k, p, d = geometry
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 8, 7, dtype=F64, generator=gen)
    got = kk.conv_covariance(x, k, stride, p, d, reduce=True, append_one=True, backend="torch")
    torch.testing.assert_close(got, loop_covariance(x, k, stride, p, d, True, True), rtol=1e-12, atol=1e-12)


def test_torch_covariances_differentiate_like_the_references():
    """The torch path's covariances (shifted Gram, bias column from column sums) keep autograd working, with the
    gradients of the unfolded / concatenating references (float64)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 8, 8, 8, dtype=F64, generator=gen, requires_grad=True)
    w = torch.randn(8 * 9 + 1, 8 * 9 + 1, dtype=F64, generator=gen)
    got = torch.autograd.grad((cov.conv_covariance_torch(x, 3, 1, 1, append_one=True) * w).sum(), x)[0]
    ref = torch.autograd.grad((cov.conv_covariance_reference(x, 3, 1, 1, append_one=True) * w).sum(), x)[0]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    a = torch.randn(5, 4, dtype=F64, generator=gen, requires_grad=True)
    got = torch.autograd.grad((kk.linear_covariance(a, append_one=True, backend="torch") * w[:5, :5]).sum(), a)[0]
    ref = torch.autograd.grad((torch.cat([a, torch.ones(5, 1, dtype=F64)], 1).T
                               @ torch.cat([a, torch.ones(5, 1, dtype=F64)], 1) * w[:5, :5]).sum(), a)[0]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_shifted_gram_float32_error_no_worse_than_unfolded(always_shifted):
    """Flash-attention's rule against the unfolded float32 GEMM: the border subtractions cost no accuracy."""
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(4, 16, 12, 10, dtype=F64, generator=gen) + 0.5).float()  # a mean: large common terms
    ref = loop_covariance(x, 3, 1, 1, 1, False, True)
    fast = kk.conv_covariance(x, 3, 1, 1, append_one=True, backend="torch")
    unfolded = cov.conv_covariance_reference(x, 3, 1, 1, append_one=True)
    err = float((fast.double() - ref).norm() / ref.norm())
    base = float((unfolded.double() - ref).norm() / ref.norm())
    assert err <= 2 * base + FP32_FLOOR, (err, base)


def test_conv_covariance_torch_picks_paths_by_size_and_accumulates(monkeypatch):
    """Default thresholds: a wide input takes the shifted Gram, a narrow, small or strided one the unfolded GEMM;
    both add into ``out``."""
    calls = []
    shifted = cov._shifted_patch_gram
    monkeypatch.setattr(cov, "_shifted_patch_gram", lambda *a: calls.append(1) or shifted(*a))
    gen = torch.Generator().manual_seed(10)
    for shape, stride, used in [((2, 8, 9, 8), 1, 1), ((2, 3, 9, 8), 1, 0), ((2, 8, 9, 8), 2, 0),
                                ((2, 8, 3, 3), 1, 0)]:
        calls.clear()
        x = torch.randn(*shape, dtype=F64, generator=gen)
        out = torch.ones(9 * shape[1] + 1, 9 * shape[1] + 1, dtype=F64)
        kk.conv_covariance(x, 3, stride, 1, append_one=True, out=out, backend="torch")
        assert len(calls) == used, (shape, stride)
        torch.testing.assert_close(out, loop_covariance(x, 3, stride, 1, 1, False, True) + 1, rtol=1e-12,
                                   atol=1e-12)
    with pytest.raises(ValueError, match="no output positions"):
        kk.conv_covariance(torch.randn(1, 8, 1, 1), 10, append_one=True, backend="torch")
    with pytest.raises(ValueError, match="no output positions"):
        kk.conv_covariance(torch.randn(2, 1, 3, 3), 4, reduce=True, backend="torch")


CONVS = [(3, 1, 1, 1), ((3, 2), (2, 1), (1, 0), (1, 2)), (1, 1, 0, 1), (3, 2, 1, 1), (2, 1, 0, 2)]


def loop_per_example(x, g, k, s, p, d):
    """(B, D_out, C*kh*kw + 1) from explicit loop patches."""
    out = []
    for n in range(x.shape[0]):
        pt = loop_patches(x[n], k, s, p, d)
        pt = torch.cat([pt, torch.ones(pt.shape[0], 1, dtype=F64)], 1)
        out.append(g[n].double().T @ pt)
    return torch.stack(out)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("d_out, grouped", [(3, True), (5, False)])  # C_in = 4: grouped conv only if d_out <= 4
def test_per_example_gradients_from_conv_patches(conv, d_out, grouped):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 7, 6, dtype=F64, generator=gen)
    patches = ConvPatches(x, *conv)
    assert per_example.grouped_conv_wins(patches, d_out) == grouped
    g = torch.randn(3, patches.shape[1], d_out, dtype=F64, generator=gen)
    ref = loop_per_example(x, g, *conv)
    torch.testing.assert_close(kk.per_example_gradients(patches, g, append_one=True), ref, rtol=1e-12, atol=1e-12)
    # float32: no worse than the unfolded einsum in float32
    p32, g32 = ConvPatches(x.float(), *conv), g.float()
    fast = kk.per_example_gradients(p32, g32, append_one=True)
    unfolded = kk.per_example_gradients(p32.rows(), g32, append_one=True)
    err = float((fast.double() - ref).norm() / ref.norm())
    base = float((unfolded.double() - ref).norm() / ref.norm())
    assert err <= 2 * base + FP32_FLOOR, (err, base)


def _op_inputs(conv, gen, b=4, d_out=3, size=(6, 5)):
    x = torch.randn(b, 3, *size, dtype=F64, generator=gen)
    patches = ConvPatches(x, *conv)
    r, d_in = patches.shape[1:]
    g = torch.randn(b, r, d_out, dtype=F64, generator=gen)
    qa = torch.linalg.qr(torch.randn(d_in + 1, d_in + 1, dtype=F64, generator=gen))[0]
    qg = torch.linalg.qr(torch.randn(d_out, d_out, dtype=F64, generator=gen))[0]
    lam = torch.rand(d_out, d_in + 1, dtype=F64, generator=gen)
    queries = torch.randn(2, d_out, d_in + 1, dtype=F64, generator=gen)
    return patches, g, qa, qg, lam, queries


@pytest.mark.parametrize("conv, size, d_out, rotate_first",
                         [(c, (6, 5), 3, False) for c in CONVS] + [(c, (6, 5), 48, True) for c in CONVS if c != (1, 1, 0, 1)]
                         + [((1, 1, 0, 1), (2, 2), 6, True), ((2, 1, 0, 1), (2, 3), 6, True)])
def test_ops_take_conv_patches_torch(conv, size, d_out, rotate_first):
    """Every op given ConvPatches = the loop definition (float64), in both orders of ``rotated_gradients``
    (few positions and wide layers: rotate first, which is one convolution of the input with Q_A's columns as
    filters, for every geometry: strided, dilated, asymmetric, padded)."""
    gen = torch.Generator().manual_seed(12)
    patches, g, qa, qg, lam, queries = _op_inputs(conv, gen, d_out=d_out, size=size)
    r, d_in, d_out = patches.shape[1], qa.shape[0], qg.shape[0]
    assert (r * (d_in ** 2 + d_out ** 2) <= d_out * d_in * (d_in + d_out)) == rotate_first
    grads = loop_per_example(patches.x, g.transpose(1, 2).reshape(g.shape[0], g.shape[2], *patches.out_size)
                             .flatten(2).transpose(1, 2), *conv)
    z = qg.T @ grads @ qa
    for chunk in (None, 1, 3):
        torch.testing.assert_close(ec_ref(patches, g, qa, qg, chunk), (z ** 2).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kk.eigenbasis_self_scores(patches, g, qa, qg, lam, 0.3, append_one=True,
                                                         backend="torch"),
                               (z ** 2 / (lam + 0.3)).sum((1, 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kk.pairwise_scores(patches, g, queries, append_one=True, backend="torch"),
                               queries.flatten(1) @ grads.flatten(1).T, rtol=1e-12, atol=1e-12)


def ec_ref(patches, g, qa, qg, chunk):
    from kfac_kernels.ops.eigen_correction import eigenvalue_correction_reference
    return eigenvalue_correction_reference(patches, g, qa, qg, append_one=True, chunk_size=chunk)


@requires_triton
@pytest.mark.parametrize("conv", CONVS[:2])
def test_ops_take_conv_patches_triton(conv):
    """The Triton ops take ConvPatches (float32 in the interpreter) and match the float64 torch results."""
    gen = torch.Generator().manual_seed(13)
    inputs = _op_inputs(conv, gen)
    patches, g, qa, qg, lam, queries = (t.float() if isinstance(t, torch.Tensor) else t.to(torch.float32)
                                        for t in inputs)
    for op, args, args64 in [("eigenvalue_correction", (qa, qg), inputs[2:4]),
                             ("eigenbasis_self_scores", (qa, qg, lam, 0.3), inputs[2:5] + (0.3,)),
                             ("pairwise_scores", (queries,), inputs[5:])]:
        fn = getattr(kk, op)
        want = fn(inputs[0], inputs[1], *args64, append_one=True, backend="torch")
        got = fn(patches, g, *args, append_one=True, backend="triton")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_conv_patches_shape_slicing_and_errors():
    x = torch.randn(5, 2, 7, 6)
    p = ConvPatches(x, (3, 2), (2, 1), (1, 0), (1, 2))
    assert p.shape == p.rows().shape == (5, 4 * 4, 12)
    assert p[1:3].shape == (2, 16, 12) and torch.equal(p[1:3].rows(), p.rows()[1:3])
    assert p.to(torch.float64).dtype == F64 and p.to(torch.float32) is p
    assert as_rows(x) is x
    with pytest.raises(TypeError, match="sliced along the batch"):
        p[0]
    with pytest.raises(ValueError, match="must be a \\(B, C, H, W\\)"):
        ConvPatches(torch.randn(2, 3, 4), 3)
    with pytest.raises(ValueError, match="no output positions"):
        ConvPatches(torch.randn(1, 1, 2, 2), 5)
    with pytest.raises(ValueError, match="must agree"):
        kk.per_example_gradients(p, torch.randn(5, 15, 3))
