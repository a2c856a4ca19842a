"""Side-by-side timing of the torch path's conv ops with and without im2col, at the layer shapes of the model presets
and of the peer benchmark; prints a ratio table (medians).

    .venv/bin/python bench/conv_paths.py --threads 1 --repeats 5

Draws: ``conv_covariance`` (unfolded-patch GEMM = ``conv_covariance_reference`` vs the shifted Gram of the torch
backend), per-example gradients (unfold + einsum vs one grouped convolution), ``eigenvalue_correction`` and
``pairwise_scores`` (unfolded rows vs ``ConvPatches``). "unfolded MB" is the (B, R, C*k*k) float32 tensor the
ConvPatches path does not build.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kfac_kernels as kk  # noqa: E402
from kfac_kernels.ops import covariance as cov  # noqa: E402
from kfac_kernels.ops.eigen_correction import eigenvalue_correction_reference  # noqa: E402
from kfac_kernels.ops.pairwise import pairwise_scores_reference  # noqa: E402
from shapes import CIFAR, DIGITS  # noqa: E402

PEERS = [  # the peer benchmark's UNet (channels 32/64) at 16x16: an up-path conv on concatenated skips, a mid conv
    dict(name="peers conv3x3 96->32 @16", kind="conv", c_in=96, c_out=32, hw=16, k=3, batch=32),
    dict(name="peers conv3x3 64->64 @8", kind="conv", c_in=64, c_out=64, hw=8, k=3, batch=32),
]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rows_for(layer, batch_cap: int, queries: int):
    gen = torch.Generator().manual_seed(0)
    b = min(layer["batch"], batch_cap)
    x = torch.randn(b, layer["c_in"], layer["hw"], layer["hw"], generator=gen)
    patches = kk.ConvPatches(x, layer["k"], 1, layer["k"] // 2, 1)
    r, d_in = patches.shape[1:]
    d_out = layer["c_out"]
    g = torch.randn(b, d_out, layer["hw"], layer["hw"], generator=gen).flatten(2).transpose(1, 2) / math.sqrt(r)
    qa = torch.linalg.qr(torch.randn(d_in + 1, d_in + 1, generator=gen))[0]
    qg = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen))[0]
    p = torch.randn(queries, d_out, d_in + 1, generator=gen)
    return x, patches, g, qa, qg, p


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-cap", type=int, default=32, help="examples per call (CPU time)")
    ap.add_argument("--queries", type=int, default=16)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), medians of {a.repeats}, at most {a.batch_cap} "
          f"examples per call, {a.queries} queries\n")
    print("| layer | B | unfolded MB | op | unfolded ms | ConvPatches ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for layer in [s for s in DIGITS + PEERS + CIFAR if s["kind"] == "conv"]:
        x, patches, g, qa, qg, p = rows_for(layer, a.batch_cap, a.queries)
        rows = patches.rows()
        mb = rows.numel() * 4 / 2 ** 20
        k = layer["k"]
        ops = [
            ("conv_covariance", lambda: cov.conv_covariance_reference(x, k, 1, k // 2, append_one=True),
             lambda: kk.conv_covariance(x, k, 1, k // 2, append_one=True, backend="torch")),
            ("per-example gradients", lambda: kk.per_example_gradients(patches.rows(), g, append_one=True),
             lambda: kk.per_example_gradients(patches, g, append_one=True)),
            ("eigenvalue_correction",
             lambda: eigenvalue_correction_reference(patches.rows(), g, qa, qg, append_one=True),
             lambda: eigenvalue_correction_reference(patches, g, qa, qg, append_one=True)),
            ("pairwise_scores", lambda: pairwise_scores_reference(patches.rows(), g, p, append_one=True),
             lambda: pairwise_scores_reference(patches, g, p, append_one=True)),
        ]
        for name, slow, fast in ops:
            t_slow, t_fast = median_ms(slow, a.repeats), median_ms(fast, a.repeats)
            print(f"| {layer['name']} | {x.shape[0]} | {mb:.1f} | {name} | {t_slow:.1f} | {t_fast:.1f} | "
                  f"{t_slow / t_fast:.2f} |", flush=True)


if __name__ == "__main__":
    main()
