"""kfac_influence.distributed: 2 gloo processes launched by torchrun give the factors, scores and self-scores of
one process (float64, tight tolerance), and an interrupted distributed fit + scoring resumes from per-rank
checkpoints.

The workers are this file run as a script under ``python -m torch.distributed.run --nproc_per_node 2``.
Data: 7 examples, 2 draws each, 4 draws per forward -> groups of 2 examples -> 4 groups (rank 0: 2, rank 1: 2;
the last group is a single example), so shards, chunks and partial groups are all exercised.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
N, M, BATCH = 7, 2, 4
DAMP = dict(damping=1e-3, damping_mode="relative")  # scoring-time damping


def setup():
    sys.path.insert(0, str(HERE))
    from helpers import scheduler, tiny_unet
    from kfac_influence import CurvatureConfig
    from kfac_influence.tasks import DiffusionTask

    model = tiny_unet(size=4, channels=(4, 8))
    task = DiffusionTask(scheduler(), num_train_draws=M, num_query_draws=M, seed=5)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    q = torch.rand(3, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    cfg = CurvatureConfig(method="ekfac", fisher="mc", dtype=torch.float64, seed=2)
    return model, task, x, q, cfg


class Interrupting(torch.utils.data.Dataset):
    """Raises after ``limit`` example reads in this process (a crash mid-pass, before any collective)."""

    def __init__(self, x, limit):
        self.x, self.limit, self.reads = x, limit, 0

    def __len__(self):
        return len(self.x)

    def fingerprint(self):  # describes itself (the identity of checkpoints), so it is not read to be hashed
        from kfac_influence.identity import tensors_fingerprint
        return tensors_fingerprint([self.x])

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise KeyboardInterrupt("simulated crash")
        return self.x[i]


def worker(out: str, ckpt: str) -> None:
    """Rank body: a plain distributed fit + scoring; then, with checkpoints, a fit that crashes on both ranks in
    pass 1, a scoring run that crashes on rank 1, and a resumed fit + scoring. Crashes are caught exceptions: only
    the per-rank checkpoint files carry state from one attempt to the next (the functions re-read them)."""
    from kfac_influence import distributed as kd

    rank, size = kd.init_from_env("gloo")
    assert size == 2
    model, task, x, q, cfg = setup()
    results = {}
    curv = kd.fit_curvature(model, task, x, cfg, draws_per_forward=BATCH, progress=False)
    results["plain"] = {"factors": curv.factors,
                        "scores": kd.pairwise_scores(model, task, curv, q, x, draws_per_forward=BATCH, progress=False,
                                                     **DAMP),
                        # batch 1 < M draws: a group's draws span chunks (the accumulate-then-rotate path)
                        "self": [kd.self_scores(model, task, curv, x, draws_per_forward=b, progress=False, **DAMP)
                                 for b in (BATCH, 1)],
                        # queries sharded instead of training data: 2 query groups at BATCH; 1 at 8 (rank 1 empty)
                        "query_shard": [kd.pairwise_scores(model, task, curv, q, x, draws_per_forward=b, progress=False, **DAMP,
                                                           shard="queries") for b in (BATCH, 8)]}

    run = dict(draws_per_forward=BATCH, progress=False, checkpoint_dir=ckpt, checkpoint_every=1)
    try:  # both ranks die in pass 1 after their first group (checkpointed), before the reduction
        kd.fit_curvature(model, task, Interrupting(x, 2), cfg, **run)
        raise AssertionError("the simulated crash did not happen")
    except KeyboardInterrupt:
        pass
    state = Path(ckpt) / f"rank{rank}-of-{size}" / "fit_state.safetensors"
    early = state.read_bytes()  # this rank's state in pass 1 (partial sums of A and G)
    curv = kd.fit_curvature(model, task, x, cfg, **run)
    # ranks at different stages: rank 1 back in pass 1 with its partial sums, rank 0 done (its partial sums of
    # pass 1 are gone): rank 1 must take the factors from rank 0, not reduce sums that no longer exist
    if rank == 1:
        state.write_bytes(early)
    torch.distributed.barrier()
    results["mixed"] = {"factors": kd.fit_curvature(model, task, x, cfg, **run).factors}
    try:  # both ranks die in scoring after their first group (no rank may reach the final gather)
        kd.pairwise_scores(model, task, curv, q, Interrupting(x, 2), **run, **DAMP)
        raise AssertionError("the simulated crash did not happen")
    except KeyboardInterrupt:
        pass
    curv = kd.fit_curvature(model, task, x, cfg, **run)
    results["resumed"] = {"factors": curv.factors, "scores": kd.pairwise_scores(model, task, curv, q, x, **run, **DAMP)}
    if rank == 0:
        torch.save(results, out)


def torchrun(out, ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(out), str(ckpt)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def single_process():
    from kfac_influence import fit_curvature, pairwise_scores, self_scores

    model, task, x, q, cfg = setup()
    curv = fit_curvature(model, task, x, cfg, draws_per_forward=BATCH, progress=False)
    selfs = [self_scores(model, task, curv, x, draws_per_forward=b, progress=False, **DAMP) for b in (BATCH, 1)]
    by_batch = [pairwise_scores(model, task, curv, q, x, draws_per_forward=b, progress=False, **DAMP)
                for b in (BATCH, 8)]
    return curv, by_batch[0], selfs, by_batch


def check_same(result, curv, scores=None):
    for name, f in curv.factors.items():
        for key in ("A", "G", "Lambda", "sA", "sG"):
            torch.testing.assert_close(result["factors"][name][key], f[key], rtol=1e-10, atol=1e-14,
                                       msg=lambda m: f"{name} {key}: {m}")
        # eigenvectors up to sign: |Q1^T Q2| = I for well separated eigenvalues
        for key, s in (("QA", "sA"), ("QG", "sG")):
            ev = f[s]
            if len(ev) == 1 or torch.diff(ev).abs().min() > 1e-8 * ev.abs().max():
                ov = (result["factors"][name][key].T @ f[key]).abs()
                torch.testing.assert_close(ov, torch.eye(len(ev), dtype=ov.dtype), atol=1e-6, rtol=0)
    if scores is not None:
        torch.testing.assert_close(result["scores"], scores, rtol=1e-9, atol=1e-12)


def test_two_gloo_ranks_match_one_process_and_resume(tmp_path):
    curv, scores, selfs, by_batch = single_process()
    assert scores.shape == (3, N) and scores.abs().min() > 0
    ckpt = tmp_path / "ckpt"
    torchrun(tmp_path / "out.pt", ckpt)
    out = torch.load(tmp_path / "out.pt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["rank0-of-2", "rank1-of-2"]
    check_same(out["plain"], curv, scores)
    check_same(out["resumed"], curv, scores)
    check_same(out["mixed"], curv)
    for got, want in zip(out["plain"]["self"], selfs):  # every example scored by exactly one rank
        assert want.shape == (N,) and want.min() > 0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14)
    for got, want in zip(out["plain"]["query_shard"], by_batch):  # each query's row from exactly one rank
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_shard_groups_cover_in_order():
    from kfac_influence.distributed import shard_groups

    for total in range(0, 9):
        for size in range(1, 5):
            parts = [shard_groups(total, size, r) for r in range(size)]
            assert [g for p in parts for g in p] == list(range(total))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
