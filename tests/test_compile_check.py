"""bench/compile_check.py: the Triton kernels compile ahead of time for real GPUs (on this CPU) within shared memory,
without spills and on tensor cores; and the launchers' configurations are pure functions of (shape, dtype, target)
that respect the target's shared-memory limit."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_check import requires_triton

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["_bmm_kernel", "_ekfac_tile_kernel", "_gram_kernel", "_lowrank_kernel", "_pairwise_kernel",
           "_pairwise_r1_kernel", "_patch_mean_kernel", "_square_gemm_kernel"]


@requires_triton
def test_compile_check_fast_subset_is_clean(tmp_path):
    """One configuration per kernel compiled for sm_86 and sm_90a (the full matrix runs in make bench)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py"), "--fast"], capture_output=True,
                       text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| kernel / variant |"))
    assert header.split("|")[2:4] == [" sm_86 ", " sm_90a "]
    rows = [line for line in lines if line.startswith("| _")]
    assert {row.split("|")[1].split()[0] for row in rows} == set(KERNELS)
    assert all("wgmma" in row.split("|")[3] for row in rows if "_patch_mean" not in row)  # tensor cores on sm_90a
    assert "0 with violations" in lines[-1]


def _recorded(fn, target):
    from kfac_kernels.ops._triton_common import recording, target_override

    with target_override(target), recording() as calls:
        fn()
    return calls


@requires_triton
@pytest.mark.parametrize("cc", [80, 86, 89, 90])
def test_launchers_pick_configs_that_fit_the_target(cc):
    """What a launcher launches (recorded on meta tensors) is what its config function returns for the target,
    and the config's shared-memory estimate fits the target's per-block limit."""
    from kfac_kernels.ops import covariance as cov, pairwise as pw, precondition as pc
    from kfac_kernels.ops._triton_common import Target

    target = Target.of(cc)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.empty(4, 256, 16, 16, dtype=dtype, device="meta")
        (kernel, grid, args, kw), = _recorded(lambda: cov.conv_covariance_triton(x, 3, padding=1, append_one=True),
                                              target)
        c, _ = cov.gram_plan(256 * 9 + 1, 4 * 256, dtype, target)
        assert (kw["BLOCK_D"], kw["BLOCK_M"], kw["num_warps"], kw["num_stages"]) == tuple(c)
        assert cov._gram_smem(c, x.element_size()) <= target.smem
        a = torch.empty(8, 5, 64, dtype=dtype, device="meta")
        g = torch.empty(8, 5, 32, dtype=dtype, device="meta")
        p = torch.empty(64, 32, 65, dtype=dtype, device="meta")
        (kernel, grid, args, kw), = _recorded(lambda: pw.pairwise_scores_triton(a, g, p, append_one=True), target)
        assert (kw["BLOCK_B"], kw["BLOCK_Q"], kw["BLOCK_O"], kw["BLOCK_I"]) == tuple(pw.pairwise_config(
            dtype, False, target))[:4]
        v = torch.empty(4, 32, 65, dtype=dtype, device="meta")
        q = torch.empty(65, 65, dtype=dtype, device="meta")
        calls = _recorded(lambda: pc.precondition_triton(v, q, torch.empty(32, 32, device="meta"),
                                                         torch.empty(32, 65, device="meta"), 0.1), target)
        assert [kw["LOW"] for _, _, _, kw in calls] == [dtype == torch.bfloat16, False, False, False]


@requires_triton
def test_gram_config_shrinks_for_a_small_shared_memory():
    from kfac_kernels.ops import covariance as cov
    from kfac_kernels.ops._triton_common import Target

    big, _ = cov.gram_plan(4097, 1 << 20, torch.bfloat16, Target.of(90))
    small, _ = cov.gram_plan(4097, 1 << 20, torch.bfloat16, Target(86, 48 * 1024))
    assert big.block_d == 128 and small.block_d == 64 and cov._gram_smem(small, 2) <= 48 * 1024
