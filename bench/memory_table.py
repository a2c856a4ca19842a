"""Memory model sizes of some diffusion UNets (the table in docs/memory.md), built on the meta device: no weights,
no memory, no download, seconds for an 860M-parameter Stable Diffusion 1.5 UNet.

    .venv/bin/python bench/memory_table.py            # markdown table
    .venv/bin/python bench/memory_table.py --json     # the numbers

Per model: parameters P, tracked Linear / Conv2d layers, W = sum_l d_out d_in' (tracked weights, bias included:
one per-example gradient has W values), K-FAC factor bytes 4 * sum_l (d_in'^2 + d_out^2) (float32 A and G; the
eigenbases Q_A, Q_G are as large again), EK-FAC eigenvalue bytes 4 W, per-example gradient bytes 4 W, the
cross-attention keys / values' share (``attn2.to_k`` / ``attn2.to_v``: d_in' = the text width, R = the tokens),
and ``measure_footprint``'s per-draw terms for a float32 model: ``out`` (output gradients of the tracked layers,
4 sum_l R_l d_out) and ``act`` (what autograd keeps for backward; on the meta device, whose attention kernel
choice may differ from a GPU's, so a guide, not a bound).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from kfac_influence.memory import measure_footprint  # noqa: E402
from kfac_influence.tasks import DiffusionTask  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TOKENS = 77  # CLIP's context length


def models():
    """(name, model on meta, task, sample: 2 examples with their conditions)."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    from kfac_influence.diffusion.models import PRESETS

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    for name in ("digits-tiny", "cifar-ddpm"):
        cfg = PRESETS[name]
        with torch.device("meta"):
            model = UNet2DModel(**cfg)
        x = torch.zeros(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        yield name, model, DiffusionTask(betas, num_train_draws=1), x
    with torch.device("meta"):
        model = UNet2DConditionModel(**SD15)
    sample = (torch.zeros(2, 4, 64, 64), torch.zeros(2, TOKENS, 768))
    yield "sd-1.5 (64x64x4 latents, 77 tokens)", model, DiffusionTask(betas, num_train_draws=1, condition="text"), \
        sample


def row(name, model, task, sample) -> dict:
    fp = measure_footprint(model, task, sample)
    cross = [(di, do, r) for n, di, do, r in fp.layers if n.endswith(("attn2.to_k", "attn2.to_v"))]
    f_ag = sum(di * di + do * do for _, di, do, _ in fp.layers)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "tracked_layers": len(fp.layers),
            "W": fp.grad_numel, "factor_bytes": 4 * f_ag, "eigenvalue_bytes": 4 * fp.grad_numel,
            "per_example_grad_bytes": 4 * fp.grad_numel, "cross_layers": len(cross),
            "cross_factor_bytes": 4 * sum(di * di + do * do for di, do, _ in cross),
            "cross_W": sum(di * do for di, do, _ in cross), "D": fp.output_numel,
            "out_bytes_per_draw": fp.out_bytes_per_row, "act_bytes_per_draw": fp.act_bytes_per_row}


def fmt_bytes(b: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b} B"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row(*m) for m in models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | P | tracked layers | W | factors A, G (fp32) | EK-FAC eigenvalues | per-example gradient | "
          "cross-attn k/v: layers, factors, W | out / draw | act / draw (meta) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cross = f"{r['cross_layers']}, {fmt_bytes(r['cross_factor_bytes'])}, {r['cross_W'] / 1e6:.2f}M" \
            if r["cross_layers"] else "-"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tracked_layers']} | {r['W'] / 1e6:.1f}M | "
              f"{fmt_bytes(r['factor_bytes'])} | {fmt_bytes(r['eigenvalue_bytes'])} | "
              f"{fmt_bytes(r['per_example_grad_bytes'])} | {cross} | {fmt_bytes(r['out_bytes_per_draw'])} | "
              f"{fmt_bytes(r['act_bytes_per_draw'])} |")


if __name__ == "__main__":
    main()
