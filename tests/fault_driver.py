"""Test-only driver for tests/test_safety.py: fits a curvature or scores a tiny epsilon model with a checkpoint saved after
every group, and interrupts itself at a chosen checkpoint write, to be resumed by the test.

    python fault_driver.py fit|score CHECKPOINT_DIR ACTION K

ACTION, at the K-th checkpoint write of the pass:
  kill-inside  write half of the checkpoint's bytes to a temporary file beside it (as ``storage.save_tensors``
               names them), then SIGKILL itself: a kill in the middle of the write;
  stall        finish the write, print "saved K" and wait to be killed from outside (the test sends SIGKILL);
  sigint       finish the write, then send itself SIGINT (the library saves at the end of the current group and
               stops with KeyboardInterrupt).
The wrapper around ``storage.save_tensors`` lives here, in the test, never in the library.
"""
import os
import signal
import sys
import tempfile
import time

import torch

F64 = torch.float64


class TinyEps(torch.nn.Module):
    """A small epsilon predictor (two convolutions, a time-embedding linear layer) in plain torch: no diffusers
    import, so the driver starts in about two seconds."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.time = torch.nn.Linear(16, 8)
        self.conv_out = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        freqs = torch.exp(-torch.arange(8, dtype=x.dtype, device=x.device) * (9.2 / 8))
        a = t.to(x.dtype)[:, None] * freqs
        h = self.conv_in(x) + self.time(torch.cat([a.sin(), a.cos()], 1))[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


def inputs():
    """The model, task, data and queries shared by the driver and the test (deterministic, in any process)."""
    from kfac_influence.tasks import DiffusionTask

    torch.manual_seed(0)
    model = TinyEps().to(F64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(9, 1, 4, 4, dtype=F64, generator=g) * 2 - 1
    task = DiffusionTask(torch.linspace(1e-4, 0.02, 1000, dtype=F64), num_train_draws=2, num_query_draws=2)
    return model, task, x, x[:2].clone()


def fit(checkpoint_dir=None):
    from kfac_influence import CurvatureConfig, fit_curvature

    unet, task, x, _ = inputs()
    return fit_curvature(unet, task, x, CurvatureConfig(dtype=F64, num_draws=2), draws_per_forward=4,
                         progress=False, checkpoint_dir=checkpoint_dir, checkpoint_every=1)


def score(checkpoint_dir=None):
    from kfac_influence import pairwise_scores

    unet, task, x, q = inputs()
    curvature = fit()
    return pairwise_scores(unet, task, curvature, q, x, draws_per_forward=4, progress=False,
                           checkpoint_dir=checkpoint_dir, checkpoint_every=1)


def main(mode, checkpoint_dir, action, k):
    import safetensors.torch

    import kfac_influence.engine as engine

    torch.set_num_threads(1)
    real = engine.save_tensors
    count = {"n": 0}

    def wrapped(path, tensors, header):
        count["n"] += 1
        if count["n"] == k and action == "kill-inside":
            data = safetensors.torch.save({n: t.detach().cpu().contiguous() for n, t in tensors.items()})
            fd, _ = tempfile.mkstemp(dir=os.path.dirname(str(path)), prefix=f".{os.path.basename(str(path))}.",
                                     suffix=".tmp")
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, tensors, header)
        if count["n"] == k and action == "stall":
            print(f"saved {k}", flush=True)
            time.sleep(120)
        if count["n"] == k and action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)

    engine.save_tensors = wrapped
    (fit if mode == "fit" else score)(checkpoint_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
