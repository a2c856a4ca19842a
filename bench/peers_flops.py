"""Multiply-adds each pass of the peer benchmark must do, relative to the plain forward + backward (the floor).

    .venv/bin/python bench/peers_flops.py --sizes 16 32

Counted from the tracked layers' shapes (every Linear and Conv2d of ``bench/peers_stage.py``'s UNet), per draw,
for the work our torch path does (the formulas are those of ``kfac_kernels``' docstrings):

* floor: forward, input gradient and weight gradient of every tracked layer, ``3 R d_in d_out`` each;
* fit pass 1: forward + input gradient ``2 R d_in d_out``, A (a conv the torch path takes from shifted Grams,
  ``covariance.uses_shifted_gram``: ``n_delta C^2`` per padded position, n_delta = 13 for 3x3; otherwise the
  rows' Gram ``R d_in'^2``), G ``R d_out^2``;
* fit pass 2: forward + input gradient, the EK-FAC rotation in the cheaper order (rotate first:
  ``R (d_in'^2 + d_out^2) + R d_out d_in'``; gradient first: ``R d_out d_in' + d_out d_in'^2 +
  min(R d_out^2, d_out^2 d_in')``);
* scoring train pass: forward + input gradient, the per-example gradient ``R d_out d_in'`` and its contraction
  with Q preconditioned queries ``Q d_out d_in'``.

Attention's own products (QK^T, AV), normalisation and activations are left out of every row alike. The ratio
"pass / floor" is what a pass costs relative to the floor if its multiply-adds run as fast as the floor's (the
model's own forward and backward): the yardstick for the measured per-pass ratios in bench/RESULTS.md, not a
hard limit (a large GEMM runs about twice as fast per multiply-add as this model's forward on a CPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers_stage import Setup  # noqa: E402

from kfac_influence.capture import select_layers  # noqa: E402
from kfac_kernels.ops import covariance as cov  # noqa: E402
from kfac_kernels.ops.eigen_correction import rotate_first_is_cheaper  # noqa: E402


def layer_shapes(size: int):
    """``[(name, module, input shape, output shape)]`` of the tracked layers for one draw."""
    st = Setup(size, 1, 1, 1)
    shapes = {}
    mods = select_layers(st.model, None, ())

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in mods.items()]
    x, t, _ = st.rows("train")
    with torch.no_grad():
        st.model(x[:1], t[:1])
    for h in hooks:
        h.remove()
    return [(n, m, *shapes[n]) for n, m in mods.items()]


def layer_macs(module, in_shape, out_shape, queries: int) -> dict:
    """Multiply-adds per draw of each kind of work for one layer."""
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        c, h, w = in_shape[1:]
        r = out_shape[2] * out_shape[3]
        d_in, d_out = c * kh * kw, module.out_channels
        shifted = cov.uses_shifted_gram(c, r, module.stride)
        if shifted:
            geometry = (module.kernel_size, module.padding, module.dilation)
            n_delta = len(cov.border_plan(*geometry, h, w)[1])
            (mh, mw), _, _ = cov.window_margins(*geometry)
            cov_a = n_delta * c * c * (h + 2 * mh) * (w + 2 * mw)
    else:
        r = 1
        for s in in_shape[1:-1]:
            r *= s
        d_in, d_out = module.in_features, module.out_features
        shifted = False
    d_in1 = d_in + int(module.bias is not None)
    if not shifted:
        cov_a = r * d_in1 * d_in1
    rot = (r * (d_in1 ** 2 + d_out ** 2) + r * d_out * d_in1 if rotate_first_is_cheaper(r, d_in1, d_out) else
           r * d_out * d_in1 + d_out * d_in1 ** 2 + min(r * d_out ** 2, d_out ** 2 * d_in1))
    fwd = r * d_in * d_out
    return {"floor": 3 * fwd, "pass1": 2 * fwd + cov_a + r * d_out ** 2, "pass2": 2 * fwd + rot,
            "scores": 2 * fwd + r * d_out * d_in1 + queries * d_out * d_in1}


def pass_ratios(size: int, queries: int) -> dict:
    """Multiply-adds per draw of the floor (``floor_mmac``, millions) and of each pass relative to it."""
    tot = {}
    for _, m, i, o in layer_shapes(size):
        for k, v in layer_macs(m, i, o, queries).items():
            tot[k] = tot.get(k, 0) + v
    f = tot["floor"]
    return {"floor_mmac": f / 1e6, "pass1": tot["pass1"] / f, "pass2": tot["pass2"] / f,
            "factors": (tot["pass1"] + tot["pass2"]) / 2 / f, "scores": tot["scores"] / f}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--queries", type=int, default=16)
    a = ap.parse_args(argv)
    print("| size | floor MMAC/draw | fit pass 1 / floor | fit pass 2 / floor | factors per pass / floor | "
          "scoring train pass / floor |")
    print("|---|---|---|---|---|---|")
    for size in a.sizes:
        r = pass_ratios(size, a.queries)
        print(f"| {size}x{size} | {r['floor_mmac']:.0f} | {r['pass1']:.2f} | {r['pass2']:.2f} | {r['factors']:.2f} | "
              f"{r['scores']:.2f} |")


if __name__ == "__main__":
    main()
