"""Roofline predictions for the fused kernels on an H200, at the cifar-ddpm and Stable-Diffusion-1.5 layers.

For each op and layer of bench/shapes.py: the multiply-adds (MAC) and the bytes to and from HBM that the fused
Triton path and the plain torch composition (the one bench/gpu_check.py times; intermediates included) must do,
the lower bounds of time they give on an H200 SXM, and the ratio of peak memory (fused / torch, the op's own
allocations; inputs excluded). These are predictions to hold bench/gpu_check.sh against on the day a GPU is lent:
a measured time can only be above its bound; a measured speed-up can only be below the ratio of the bounds when
both sides run near their rooflines.

Peak figures (NVIDIA H200 datasheet, SXM; dense = half of the "with sparsity" figures it lists):
  * BF16 / FP16 tensor core: 989 TFLOP/s dense (1,979 with sparsity)   -> 494.5 T MAC/s
  * TF32 tensor core: 494 TFLOP/s dense (989 with sparsity); the kernels' float32 products are tf32x3 (three TF32
    products): 165 TFLOP/s of float32-accurate work                      -> 82 T MAC/s
  * FP32 (CUDA cores, what cuBLAS uses for float32 when TF32 is off, torch's default for matmul): 67 TFLOP/s
  * HBM3e: 4.8 TB/s
Model: time >= max(MAC / peak MAC rate, bytes / 4.8 TB/s) for each launch, summed over the launches of the path
(rotations and other cuBLAS GEMMs counted on the torch side's rate). Bytes count each tensor once per pass that
must touch it in HBM (a re-read that L2 (50 MB) can serve is not counted, one that cannot is: the pairwise
kernel reads the query tile once per block of 16 examples, 32 at R = 1, where it forms no gradients at all).
Elementwise passes of the torch composition (copies, casts, squares, divisions) are memory-bound passes over
their tensors.

    python bench/roofline.py
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import CIFAR, QUERIES, SD15, layer_dims  # noqa: E402

PEAK = dict(
    half_tc=989e12 / 2,   # MAC/s, bf16/fp16 tensor cores, dense
    tf32x3=494e12 / 2 / 3,  # MAC/s, float32-accurate products from three TF32 products
    fp32=67e12 / 2,       # MAC/s, CUDA-core float32 (cuBLAS with TF32 off)
    hbm=4.8e12,           # bytes/s
)
PRECOND_QUERIES = 16  # as bench/gpu_check.py
LOWRANK_RANK = 32  # the query rank of bench/gpu_check.py's low-rank rows
L2_BYTES = 50 << 20
SOURCES = ("NVIDIA H200 Tensor Core GPU datasheet (SXM): FP16/BF16 tensor 1,979 TFLOPS and TF32 tensor 989 TFLOPS "
           "with sparsity (half of it dense), FP32 67 TFLOPS, 4.8 TB/s HBM3e")


def _t(mac, nbytes, rate):
    return max(mac / rate, nbytes / PEAK["hbm"])


class Path:
    """A sum of launches: each ``(mac, bytes, rate)``; ``peak`` bytes of the op's own allocations."""

    def __init__(self):
        self.mac = 0.0
        self.bytes = 0.0
        self.time = 0.0
        self.peak = 0.0

    def gemm(self, mac, nbytes, rate):
        self.mac += mac
        self.bytes += nbytes
        self.time += _t(mac, nbytes, rate)
        return self

    def stream(self, nbytes):
        return self.gemm(0, nbytes, 1.0)


def predict(s, half: bool):
    """{op: (fused Path, torch Path)} for layer ``s`` with bf16 (``half``) or float32 operands."""
    r, d_in, d_out = layer_dims(s)
    b = s["batch"]
    one = int(s.get("bias", True))
    dp, do = d_in + one, d_out
    el = 2 if half else 4
    k_rate = PEAK["half_tc"] if half else PEAK["tf32x3"]
    t_rate = PEAK["half_tc"] if half else PEAK["fp32"]
    out = {}
    # ---- covariance: fused = upper tile pairs of the Gram, straight from x; torch = unfold / cat + full GEMM
    tri = dp * (dp + 1) / 2
    if s["kind"] == "conv":
        b2, m = 2 * b, 2 * b * r  # gpu_check's conv covariance rows take twice the layer's batch
        x_bytes = b2 * s["c_in"] * s["hw"] ** 2 * el
        f = Path().gemm(m * tri, x_bytes + dp * dp * 4, k_rate)
        f.peak = dp * dp * 4
        t = Path().stream(x_bytes + m * d_in * el)                  # unfold: read x, write (B, D, R)
        t.stream(2 * m * d_in * el)                                   # transpose + reshape: a contiguous copy
        t.stream(m * d_in * el + m * dp * el)                         # with_one: cat
        t.gemm(m * dp * dp, 2 * m * dp * el + dp * dp * el, t_rate)  # rows^T rows (no symmetry)
        t.peak = m * d_in * el * 2 + m * dp * el + dp * dp * el
        out["conv_cov expand"] = (f, t)
        f = Path().stream(x_bytes + b2 * d_in * 4)                    # patch means (one pass over x)
        f.gemm(b2 * tri, b2 * d_in * 4 + dp * dp * 4, k_rate)
        f.peak = b2 * d_in * 4 + dp * dp * 4
        t = Path().stream(x_bytes + m * d_in * el).stream(m * d_in * el + b2 * d_in * el)  # unfold, mean
        t.stream(2 * b2 * dp * el).gemm(b2 * dp * dp, 2 * b2 * dp * el + dp * dp * el, t_rate)
        t.peak = m * d_in * el + 2 * b2 * dp * el + dp * dp * el
        out["conv_cov reduce"] = (f, t)
    else:
        rows = b * r if r > 1 else b * 16  # gpu_check's linear rows for R = 1 layers
        f = Path().gemm(rows * tri, rows * d_in * el + dp * dp * 4, k_rate)
        f.peak = dp * dp * 4
        t = Path().stream(rows * d_in * el + rows * dp * el).gemm(rows * dp * dp, 2 * rows * dp * el + dp * dp * el,
                                                                  t_rate)
        t.peak = rows * dp * el + dp * dp * el
        out["linear_cov"] = (f, t)
    # ---- eigenvalue correction / self-scores: both rotate a and g with cuBLAS; fused forms Z_b tile by tile
    m = b * r
    ag = m * (d_in + do) * el
    rot_mac = m * (dp * dp + do * do)
    rot_bytes = ag + m * (dp + do) * el + (dp * dp + do * do) * el
    z = b * do * dp
    for name, has_inv in (("eig_correction", False), ("self_scores", True)):
        if has_inv and r == 1:
            continue
        f = Path().gemm(rot_mac, rot_bytes, t_rate)
        if r == 1:
            f.gemm(b * do * dp, m * (dp + do) * el + do * dp * 4, k_rate)
        else:
            f.gemm(m * do * dp, m * (dp + do) * el + (do * dp * 4 if not has_inv else do * dp * 4 + b * 4), k_rate)
        f.peak = m * (dp + do) * el + (b * 4 if has_inv else do * dp * 4)
        t = Path().gemm(rot_mac, rot_bytes, t_rate)
        if r == 1:
            t.stream(2 * m * (dp + do) * (el + 4)).gemm(b * do * dp, m * (dp + do) * 4 + do * dp * 4, t_rate)
            t.peak = m * (dp + do) * (el + 4) * 2 + do * dp * 4
        else:
            t.gemm(m * do * dp, m * (dp + do) * el + z * el, t_rate)   # einsum -> Z (B, D_out, D_in')
            t.stream(z * el + z * 4).stream(2 * z * 4)                 # .float(), ** 2
            t.stream(z * 4 * (3 if has_inv else 1))                    # / (lam + damping), sum
            t.peak = m * (dp + do) * el + z * el + 2 * z * 4
        out[name] = (f, t)
    # ---- precondition (16 queries): four GEMMs either way; fused keeps two float32 buffers, scale in epilogue
    q = PRECOND_QUERIES
    v = q * do * dp
    t32 = PEAK["fp32"] if not half else PEAK["half_tc"]
    f = Path().gemm(q * do * dp * dp, v * el + dp * dp * el + v * 4, k_rate)   # V Q_A (in half when V, Q_A are)
    f.gemm(q * do * do * dp, 2 * v * 4 + do * dp * 4, PEAK["tf32x3"])         # Q_G^T (.) * inv, fused scale
    f.gemm(q * do * do * dp, 2 * v * 4, PEAK["tf32x3"])                       # Q_G (.)
    f.gemm(q * do * dp * dp, 2 * v * 4, PEAK["tf32x3"])                       # (.) Q_A^T
    f.peak = 2 * v * 4                                                        # two float32 work buffers
    t = Path().gemm(q * do * do * dp, v * el + v * el, t_rate)                # Q_G^T V
    t.gemm(q * do * dp * dp, 2 * v * el, t32)                                 # (.) Q_A
    t.stream(2 * v * el + do * dp * 4)                                        # / (Lambda + damping)
    t.gemm(q * do * do * dp, 2 * v * el, t32).gemm(q * do * dp * dp, 2 * v * el, t32)
    t.peak = 3 * v * el                                                       # three temporaries live at once
    out["precondition"] = (f, t)
    # ---- pairwise scores, 64 queries: fused forms gradient tiles on chip; torch materialises (B, D_out, D_in')
    p_bytes = QUERIES * do * dp * el
    if r == 1:  # _pairwise_r1_kernel: no gradient product; the query tile read once per 32 examples
        p_reads = math.ceil(b / 32) if p_bytes > L2_BYTES else 1
        f = Path().gemm(QUERIES * z, ag + p_reads * p_bytes + QUERIES * b * 4, k_rate)
    else:
        p_reads = math.ceil(b / 16) if p_bytes > L2_BYTES else 1
        f = Path().gemm(m * do * dp + QUERIES * z, ag + p_reads * p_bytes + QUERIES * b * 4, k_rate)
    f.peak = QUERIES * b * 4
    t = Path().stream(m * d_in * el + m * dp * el)                   # with_one(a)
    t.gemm(m * do * dp, m * (dp + do) * el + z * el, t_rate)          # einsum -> per-example gradients
    t.gemm(QUERIES * z, z * el + p_bytes + QUERIES * b * el, t_rate)  # (Q, K) @ (K, B)
    t.peak = m * dp * el + z * el + QUERIES * b * 4
    out["pairwise"] = (f, t)
    out["lowrank"] = _lowrank(s, b, r, m, d_in, dp, do, el, k_rate, t_rate)
    return out


def _lowrank(s, b, r, m, d_in, dp, do, el, k_rate, t_rate):
    """Low-rank scores, 64 queries of rank LOWRANK_RANK: fused projects (a conv's input by implicit im2col, never
    unfolded) and multiplies on chip, writing the (Q k, B) column sums; torch unfolds, forms both (B, R, Q k)
    projections, multiplies and sums. a and g are re-read once per 64 rank columns unless L2 holds them."""
    qk = QUERIES * LOWRANK_RANK
    a_bytes = b * s["c_in"] * s["hw"] ** 2 * el if s["kind"] == "conv" else m * d_in * el
    ag = a_bytes + m * do * el
    q_bytes = qk * (do + dp) * el
    reads = 1 if ag <= L2_BYTES else math.ceil(qk / 64)
    f = Path().gemm(m * (do + dp) * qk + m * qk, reads * ag + q_bytes + qk * b * 4 * 2 + QUERIES * b * 4, k_rate)
    f.peak = qk * b * 4 + QUERIES * b * 4
    t = Path()
    if s["kind"] == "conv":
        t.stream(a_bytes + m * d_in * el)                         # unfold
    t.stream(m * d_in * el + m * dp * el)                         # with_one(a)
    t.gemm(m * do * qk, m * do * el + do * qk * el + m * qk * el, t_rate)  # g @ left
    t.gemm(m * dp * qk, m * dp * el + dp * qk * el + m * qk * el, t_rate)  # a' @ right
    t.stream(3 * m * qk * el).stream(m * qk * el + b * qk * el)    # product, sum over positions
    t.peak = (m * d_in * el if s["kind"] == "conv" else 0) + m * dp * el + 2 * m * qk * el + b * qk * el
    return f, t


def rows(shapes=None):
    res = []
    for s in shapes or (CIFAR + SD15):
        for half in (True, False):
            for op, (f, t) in predict(s, half).items():
                res.append(dict(op=op, layer=s["name"], dtype="bf16" if half else "fp32", fused_mac=f.mac,
                                fused_bytes=f.bytes, fused_us=f.time * 1e6, torch_mac=t.mac, torch_bytes=t.bytes,
                                torch_us=t.time * 1e6, speedup_bound=t.time / f.time, mem_ratio=f.peak / t.peak))
    return res


def predicted_ms(op_name: str, layer_name: str, dtype_name: str):
    """(fused ms, torch ms, speed-up, memory ratio) predicted for a bench/gpu_check.py row, or None."""
    key = op_name.replace("pairwise int8", "pairwise")
    for r in ROWS:
        if r["op"] == key and r["layer"] == layer_name and r["dtype"] == dtype_name:
            return r["fused_us"] / 1e3, r["torch_us"] / 1e3, r["speedup_bound"], r["mem_ratio"]
    return None


def _g(x):
    return f"{x / 1e9:.2f}" if x >= 1e7 else f"{x / 1e9:.4f}"


def markdown(res) -> str:
    lines = ["| op | layer | dtype | fused GMAC | fused GB | torch GMAC | torch GB | fused >= us | torch >= us | "
             "speed-up bound | peak mem ratio | measured us (fused / torch) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['op']} | {r['layer']} | {r['dtype']} | {_g(r['fused_mac'])} | {_g(r['fused_bytes'])} | "
                     f"{_g(r['torch_mac'])} | {_g(r['torch_bytes'])} | {r['fused_us']:.1f} | {r['torch_us']:.1f} | "
                     f"{r['speedup_bound']:.2f}x | {r['mem_ratio']:.2g} | |")
    return "\n".join(lines)


ROWS = rows()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    print(f"H200 SXM peaks: {PEAK['half_tc'] * 2 / 1e12:.0f} TFLOP/s bf16/fp16 tensor (dense), "
          f"{PEAK['tf32x3'] * 2 / 1e12:.0f} TFLOP/s float32 via tf32x3, {PEAK['fp32'] * 2 / 1e12:.0f} TFLOP/s fp32 "
          f"CUDA cores, {PEAK['hbm'] / 1e12:.1f} TB/s HBM3e. Source: {SOURCES}.")
    print(markdown(ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
