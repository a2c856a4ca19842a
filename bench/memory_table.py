"""Memory model sizes of some diffusion UNets (the table in docs/memory.md), built on the meta device: no weights,
no memory, no download, seconds for an 860M-parameter Stable Diffusion 1.5 UNet.

    .venv/bin/python bench/memory_table.py            # markdown table
    .venv/bin/python bench/memory_table.py --json     # the numbers

Per model: parameters P, tracked Linear / Conv2d layers, W = sum_l d_out d_in' (tracked weights, bias included:
one per-example gradient has W values), K-FAC factor bytes 4 * sum_l (d_in'^2 + d_out^2) (float32 A and G; the
eigenbases Q_A, Q_G are as large again), EK-FAC eigenvalue bytes 4 W, per-example gradient bytes 4 W, the
cross-attention keys / values' share (``attn2.to_k`` / ``attn2.to_v``: d_in' = the text width, R = the tokens),
and ``measure_footprint``'s per-draw terms for a float32 model: ``out`` (output gradients of the tracked layers,
4 sum_l R_l d_out) and ``act`` (what autograd keeps for backward). The meta device runs attention as the math
kernel does (tests/test_memory.py: the same footprint as the CPU under ``SDPBackend.MATH``), which keeps each
attention's probabilities (heads x L_q x L_k per draw, the ``probs`` column); flash and memory-efficient kernels
(CUDA) keep a log-sum-exp instead, so there ``act`` is about ``act - probs`` (the ``act, flash`` column).
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


def attention_probs_bytes(model, task, sample, itemsize: int = 4) -> int:
    """Bytes per draw of the attention probabilities of every diffusers ``Attention`` call (heads x L_q x L_k)."""
    from diffusers.models.attention_processor import Attention

    total = [0]

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        lq = h.shape[1] if h.dim() == 3 else h.shape[2] * h.shape[3]
        lk = lq if enc is None else enc.shape[1]
        total[0] += module.heads * lq * lk * itemsize

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, Attention)]
    try:
        from kfac_influence.data_iter import get_batch
        rows = task.draws(get_batch(sample, torch.arange(1)), torch.arange(1), "fit", num_draws=1, seed=0)
        with torch.no_grad():
            task.forward(model, rows.to(torch.device("meta"), torch.float32))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def row(name, model, task, sample) -> dict:
    fp = measure_footprint(model, task, sample)
    probs = attention_probs_bytes(model, task, sample)
    cross = [(di, do, r) for n, di, do, r in fp.layers if n.endswith(("attn2.to_k", "attn2.to_v"))]
    f_ag = sum(di * di + do * do for _, di, do, _ in fp.layers)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "tracked_layers": len(fp.layers),
            "W": fp.grad_numel, "factor_bytes": 4 * f_ag, "eigenvalue_bytes": 4 * fp.grad_numel,
            "per_example_grad_bytes": 4 * fp.grad_numel, "cross_layers": len(cross),
            "cross_factor_bytes": 4 * sum(di * di + do * do for di, do, _ in cross),
            "cross_W": sum(di * do for di, do, _ in cross), "D": fp.output_numel,
            "out_bytes_per_draw": fp.out_bytes_per_row, "act_bytes_per_draw": fp.act_bytes_per_row,
            "attention_probs_bytes_per_draw": probs}


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
          "cross-attn k/v: layers, factors, W | out / draw | act / draw | probs / draw | act, flash / draw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cross = f"{r['cross_layers']}, {fmt_bytes(r['cross_factor_bytes'])}, {r['cross_W'] / 1e6:.2f}M" \
            if r["cross_layers"] else "-"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tracked_layers']} | {r['W'] / 1e6:.1f}M | "
              f"{fmt_bytes(r['factor_bytes'])} | {fmt_bytes(r['eigenvalue_bytes'])} | "
              f"{fmt_bytes(r['per_example_grad_bytes'])} | {cross} | {fmt_bytes(r['out_bytes_per_draw'])} | "
              f"{fmt_bytes(r['act_bytes_per_draw'])} | {fmt_bytes(r['attention_probs_bytes_per_draw'])} | "
              f"{fmt_bytes(r['act_bytes_per_draw'] - r['attention_probs_bytes_per_draw'])} |")


if __name__ == "__main__":
    main()
