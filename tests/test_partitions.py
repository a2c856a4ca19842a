"""Budgeted execution: a fit split into partitions of layers equals the unpartitioned fit (bitwise in float64), its
result is streamed from the partition files, a streamed curvature scores and saves like an in-memory one, and the
memory budget picks the partitions."""
import pytest
import torch

from kfac_influence import CurvatureConfig, fit_curvature, load_curvature, pairwise_scores
from kfac_influence.capture import select_layers
from kfac_influence.curvature.curvature import FACTOR_NAMES
from kfac_influence.engine import CheckpointMismatch
from kfac_influence.memory import measure_footprint, partition_state_peak, plan_fit
from kfac_influence.tasks import DiffusionTask

from helpers import scheduler, tiny_unet

F64 = torch.float64


def setup(method="ekfac"):
    unet = tiny_unet(size=4)
    task = DiffusionTask(scheduler(), num_train_draws=2, num_query_draws=2, seed=3)
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * 2 - 1
    return unet, task, x, CurvatureConfig(method=method, dtype=F64, num_draws=2)


@pytest.fixture(scope="module")
def reference():
    unet, task, x, cfg = setup()
    return fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_partitioned_fit_equals_unpartitioned_bitwise(tmp_path, reference, parts):
    unet, task, x, cfg = setup()
    curv = fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False, partitions=parts,
                         checkpoint_dir=tmp_path)
    assert curv.streamed == (parts > 1)
    if parts > 1:
        assert sorted(p.name for p in tmp_path.glob("partition-*")) == \
            [f"partition-{k}-of-{parts}.safetensors" for k in range(1, parts + 1)]
        assert not list(tmp_path.glob("fit_state-*"))  # a finished partition's pass state is not kept beside it
    for name in reference.module_names:
        got = curv.factors[name]
        for k in FACTOR_NAMES:
            assert torch.equal(got[k], reference.factors[name][k]), (parts, name, k)
    # streamed scoring reads each layer from the files: the same scores
    q = x[:2]
    want = pairwise_scores(unet, task, reference, q, x, draws_per_forward=4, progress=False, damping=1e-3)
    assert torch.equal(pairwise_scores(unet, task, curv, q, x, draws_per_forward=4, progress=False, damping=1e-3),
                       want)
    # a streamed curvature saves to one file, a layer at a time; it loads eagerly or streamed, unchanged
    curv.save(tmp_path / "curvature.safetensors")
    for stream in (False, True):
        back = load_curvature(tmp_path / "curvature.safetensors", unet, stream=stream)
        assert back.streamed == stream
        for name in reference.module_names:
            for k in FACTOR_NAMES:
                assert torch.equal(back.factors[name][k], reference.factors[name][k])


def test_kfac_partitions_and_explicit_lists(tmp_path):
    unet, task, x, cfg = setup("kfac")
    want = fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False)
    names = want.module_names
    lists = [names[1::2], names[0::2]]  # not in module order: any grouping works
    curv = fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False, partitions=lists,
                         checkpoint_dir=tmp_path)
    for name in names:
        for k in FACTOR_NAMES:
            assert torch.equal(curv.factors[name][k], want.factors[name][k])
    with pytest.raises(ValueError, match="every tracked layer exactly once"):
        fit_curvature(unet, task, x, cfg, progress=False, partitions=[names[:2]], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit_curvature(unet, task, x, cfg, progress=False, partitions=2)
    with pytest.raises(ValueError, match="between 1 and"):
        fit_curvature(unet, task, x, cfg, progress=False, partitions=len(names) + 1, checkpoint_dir=tmp_path)


def test_finished_partitions_are_reused_and_checked(tmp_path):
    unet, task, x, cfg = setup()
    fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False, partitions=2, checkpoint_dir=tmp_path)
    first = tmp_path / "partition-1-of-2.safetensors"
    stamp = first.stat().st_mtime_ns
    fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False, partitions=2, checkpoint_dir=tmp_path)
    assert first.stat().st_mtime_ns == stamp  # a finished partition is not refitted
    with pytest.raises(CheckpointMismatch, match="data: "):  # other data of the same size: refused
        fit_curvature(unet, task, x.flip(0), cfg, draws_per_forward=4, progress=False, partitions=2,
                      checkpoint_dir=tmp_path)


def test_memory_budget_picks_partitions(tmp_path, reference):
    unet, task, x, cfg = setup()
    fp = measure_footprint(unet, task, x, config=cfg)
    specs = select_layers(unet)
    layers = list(reference.specs.values())
    whole = partition_state_peak(layers, cfg, F64)
    alone = max(partition_state_peak([s], cfg, F64) for s in layers)
    roomy = plan_fit(unet, task, x, 64 * 2 ** 20 + fp.param_bytes, config=cfg, footprint=fp)
    assert len(roomy.partitions) == 1 and roomy.partitions[0] == tuple(specs)
    # room for about a third of the whole fit's state (and a few draws): several partitions, each within the
    # budget, covering every layer in module order
    draws = fp.act_bytes_per_row + fp.out_bytes_per_row + 2 * fp.output_numel * 8 + fp.unfold_bytes_per_row
    budget = fp.param_bytes + max(whole // 3, alone) + 4 * draws
    tight = plan_fit(unet, task, x, budget / 0.9, config=cfg, footprint=fp)
    assert len(tight.partitions) >= 2
    assert [nm for p in tight.partitions for nm in p] == list(specs)
    assert tight.peak <= budget
    curv = fit_curvature(unet, task, x, cfg, progress=False, checkpoint_dir=tmp_path, max_memory=int(budget / 0.9))
    assert curv.streamed
    for name in reference.module_names:  # another number of draws per forward: other summation order only
        want = reference.factors[name]["A"]
        torch.testing.assert_close(curv.factors[name]["A"], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    with pytest.raises(MemoryError, match="alone needs"):  # room for the parameters, not for the largest layer
        plan_fit(unet, task, x, (fp.param_bytes + alone // 2) / 0.9, config=cfg, footprint=fp)
    with pytest.raises(MemoryError, match="parameters alone"):
        plan_fit(unet, task, x, fp.param_bytes // 2, config=cfg, footprint=fp)


def test_partition_state_peak_follows_the_fit_timeline():
    """The state model by hand for one linear layer (a = 4, g = 3), float32 factors of a float64 model."""
    from kfac_influence.capture import LayerSpec

    spec = LayerSpec("l", "linear", 3, 3, True)  # d_in' = 4, d_out = 3
    cfg = CurvatureConfig(method="ekfac", dtype=torch.float32)
    sums, res_a = 8 * (16 + 9), (2 * 4 + 8) * 16 + 8 * 4
    results = (2 * 4 + 8) * (16 + 9) + 16 * 7
    # beside the state, per factor: its float32 copy (4 n^2) and the eigendecomposition's transient (CPU, in place:
    # the eigenvectors and O(n) workspace; CUDA: torch.linalg.eigh's 24 n^2), or the converted bases (16 n^2 + 8 n)
    cpu = {n: max(4 * n * n + 8 * n * n + 64 * n, 16 * n * n + 8 * n) for n in (3, 4)}
    # the passes: a chunk's term (float64 for a float64 model, so added without conversion) and the op's scratch
    # beside the sums: A's 4 x 4 covariance in pass 1, the 3 x 4 eigenvalue term beside 8 * 12 of sums in pass 2
    pass1, pass2 = sums + 2 * 8 * 16, results + 8 * 12 + 2 * 8 * 12
    want = max(pass1, sums + cpu[4], sums - 8 * 16 + res_a + cpu[3], pass2)
    assert partition_state_peak([spec], cfg, F64) == want
    cuda = {n: max(4 * n * n + 24 * n * n, 16 * n * n + 8 * n) for n in (3, 4)}
    want = max(pass1, sums + cuda[4], sums - 8 * 16 + res_a + cuda[3], pass2)
    assert partition_state_peak([spec], cfg, F64, device="cuda") == want
    # K-FAC (no pass 2) with many draws: pass 1 is the peak; its chunk term is A's 4 x 4 covariance, twice, and
    # for a float32 model one row block of it converted to float64 (the whole of it here: 8 * 16 bytes)
    kfac = CurvatureConfig(method="kfac", dtype=torch.float32)
    assert partition_state_peak([spec], kfac, F64, draws_bytes=10 ** 4) == sums + 10 ** 4 + 2 * 8 * 16
    assert partition_state_peak([spec], kfac, torch.float32, draws_bytes=10 ** 4) == \
        sums + 10 ** 4 + 2 * 4 * 16 + 8 * 16


def _allocated_peak(fn):
    """Peak bytes the CPU allocator holds over ``fn()`` beyond what it held before (the profiler's allocation
    trace: every allocation and free, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def test_float32_terms_enter_float64_sums_without_a_whole_float64_copy():
    """``total += value`` converts the whole float32 operand to float64 first (8 n^2 bytes for a covariance);
    ``add_into`` adds the same values a row block at a time."""
    from kfac_influence.curvature.fit import add_into
    from kfac_influence.memory import ADD_BLOCK_BYTES

    g = torch.Generator().manual_seed(0)
    value = torch.randn(1500, 1500, generator=g)  # 18 MB as float64: over one block
    total, want = torch.randn(1500, 1500, generator=g, dtype=F64), None
    want = total.clone()
    assert _allocated_peak(lambda: want.add_(value)) >= 8 * value.numel()  # what add_into avoids
    assert _allocated_peak(lambda: add_into(total, value)) <= ADD_BLOCK_BYTES
    assert torch.equal(total, want)  # the same roundings
    lam = torch.zeros(7, dtype=F64)
    add_into(lam, torch.arange(7.0))
    assert torch.equal(lam, torch.arange(7.0, dtype=F64))
    with pytest.raises(ValueError, match="shape"):  # no silent broadcast into the first block only
        add_into(total, value[:1])


@pytest.mark.parametrize("op", ["linear", "conv-unfold", "conv-shifted", "eigenvalue-correction"])
def test_the_fits_ops_allocate_at_most_twice_their_output(op):
    """memory.partition_state_peak counts a chunk's covariance or eigenvalue term twice (its output and the op's
    scratch); eigenvalue_correction's per-example tiles are the per-draw scratch (memory.estimate), here one
    draw's worth of them, and the unfolding conv path's patches are per-draw terms too."""
    import kfac_kernels as kk

    g = torch.Generator().manual_seed(0)
    scratch = 0
    if op == "linear":
        rows = torch.randn(300, 257, generator=g)
        run = lambda: kk.linear_covariance(rows, append_one=True)  # noqa: E731
    elif op.startswith("conv"):
        size = 4 if op == "conv-unfold" else 12  # below / above the shifted-Gram path's 64 output positions
        x = torch.randn(2, 40, size, size, generator=g)
        run = lambda: kk.conv_covariance(x, (3, 3), 1, 1, 1, append_one=True)  # noqa: E731
        if op == "conv-unfold":  # and the unfolded patches (n R d: memory.estimate's per-draw terms), twice
            scratch = 2 * 4 * 2 * size * size * 40 * 9
    else:
        a, gr = torch.randn(1, 5, 301, generator=g), torch.randn(1, 5, 97, generator=g)
        qa, qg = torch.randn(302, 302, generator=g), torch.randn(97, 97, generator=g)
        run = lambda: kk.eigenvalue_correction(a, gr, qa, qg, append_one=True)  # noqa: E731
        scratch = 4 * 302 * 97 + 4 * 5 * (302 + 97)  # one per-example tile, and the rotated a and g
    out = run()
    assert _allocated_peak(run) <= 2 * out.numel() * out.element_size() + scratch


@pytest.mark.parametrize("overwrite", [False, True])
def test_eigendecomposition_matches_torch_and_may_overwrite_its_input(overwrite):
    from kfac_influence.curvature.eigen import eigh_psd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 50, dtype=F64, generator=g)
    a = x @ x.T
    a[:, -1] = a[-1, :] = 0  # a zero eigenvalue: rounding may make it negative, and it is clamped
    work = a.clone()
    s, q = eigh_psd(work, overwrite=overwrite)
    ref_s, _ = torch.linalg.eigh(a)
    torch.testing.assert_close(s, ref_s.clamp_min(0), rtol=0, atol=1e-12 * float(ref_s.max()))
    assert (s >= 0).all() and bool((s[1:] >= s[:-1]).all())
    torch.testing.assert_close(q @ torch.diag(s) @ q.T, a, rtol=0, atol=1e-12 * float(a.abs().max()))
    torch.testing.assert_close(q.T @ q, torch.eye(37, dtype=F64), rtol=0, atol=1e-13)
    assert torch.equal(work, a) != overwrite  # overwrite: LAPACK worked in the input's memory
    with pytest.raises(TypeError, match="float64"):
        eigh_psd(a.float())


def test_values_fingerprint_of_a_streamed_curvature_reads_a_layer_at_a_time(tmp_path, reference):
    """The streamed curvature's fingerprint equals the in-memory one, and no two layers' factors are alive at once
    while it is computed (a list of every layer held the whole file: 6.4 GB at SD-1.5 scale)."""
    import gc
    import weakref

    from kfac_influence.curvature.curvature import LayerFiles

    unet, task, x, cfg = setup()
    curv = fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False, partitions=2,
                         checkpoint_dir=tmp_path)
    assert curv.streamed
    alive, most = [], [0]
    real = LayerFiles.__getitem__

    def tracked(self, name):
        out = real(self, name)
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        most[0] = max(most[0], len(alive) + 1)
        alive.extend(weakref.ref(t) for t in out.values())
        return out

    LayerFiles.__getitem__ = tracked
    try:
        fp = curv.values_fingerprint()
    finally:
        LayerFiles.__getitem__ = real
    assert fp == reference.values_fingerprint()
    assert most[0] == 1, most  # when a layer is read, the previous layer's tensors are gone


def test_a_loaded_streamed_curvature_reads_ahead_in_module_order(tmp_path):
    """The file's header sorts its layers by name; a loaded curvature keeps the module order, so each layer's
    read-ahead is the next one preconditioned, and after preconditioning only the last layer stays cached."""
    from kfac_influence.curvature.curvature import Curvature
    from kfac_influence.scoring.pairwise import preconditioned_query_gradients

    unet, task, x, cfg = setup()
    curv = fit_curvature(unet, task, x, cfg, draws_per_forward=4, progress=False)
    curv.save(tmp_path / "c.safetensors")
    order = list(select_layers(unet))
    assert order != sorted(order)  # the check below means something
    loaded = load_curvature(tmp_path / "c.safetensors", unet, stream=True)
    assert loaded.module_names == order
    assert load_curvature(tmp_path / "c.safetensors", stream=True).module_names == order  # from the header
    reads, real = [], Curvature._read_layer

    def spy(self, name):
        reads.append((name, self._ahead[0] if self._ahead else None))
        return real(self, name)

    Curvature._read_layer = spy
    try:
        preconditioned_query_gradients(unet, task, loaded, x[:2], draws_per_forward=4, damping=1e-3)
    finally:
        Curvature._read_layer = real
    assert [n for n, _ in reads] == order
    assert all(ahead == name for name, ahead in reads[1:])  # every read after the first was read ahead
    assert loaded._ahead is None and [k[0] for k in loaded._device_cache] == [order[-1]]
