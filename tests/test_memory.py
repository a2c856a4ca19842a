"""kfac_influence.memory: measured footprints against hand counts, the memory model's boundary, and errors."""
import sys
from pathlib import Path

import pytest
import torch

from kfac_influence import CurvatureConfig
from kfac_influence.memory import choose_draws_per_forward, estimate, measure_footprint, parse_bytes
from kfac_influence.tasks import DiffusionTask, RegressionTask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import scheduler, tiny_unet  # noqa: E402


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3)).double()


def test_mlp_footprint_matches_hand_count():
    model = mlp()
    data = (torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    fp = measure_footprint(model, RegressionTask(), data)
    # autograd keeps per row: the input (10, for the first addmm), tanh's output (20, also the second layer's
    # input); plus the output f (3). Parameters are not counted.
    assert fp.act_bytes_per_row == (10 + 20 + 3) * 8
    assert fp.out_bytes_per_row == (20 + 3) * 8
    assert fp.unfold_bytes_per_row == max(11 + 20, 21 + 3) * 8
    assert fp.layers == (("0", 11, 20, 1), ("2", 21, 3, 1))
    assert fp.grad_numel == 20 * 11 + 3 * 21
    assert fp.factor_numel == (11 * 11 + 20 * 20 + 220) + (21 * 21 + 9 + 63)
    assert fp.param_bytes == (20 * 11 + 3 * 21) * 8
    e = estimate(fp, "fit", 7)
    assert e.total == fp.param_bytes + 8 * fp.factor_numel + 2 * 4 * fp.factor_numel + 7 * e.per_row + e.scratch
    # scores: the train pass holds Q preconditioned gradients (8 bytes, or 1 with int8) and the (Q, N) matrix
    base = fp.param_bytes + 4 * fp.factor_numel
    q = estimate(fp, "scores", 7, num_queries=4, num_examples=10_000)
    q8 = estimate(fp, "scores", 7, num_queries=4, num_examples=10_000, int8_queries=True)
    assert q.fixed == base + 4 * fp.grad_numel * 8 + 8 * 4 * 10_000
    assert q8.fixed == base + 4 * fp.grad_numel * 1 + 8 * 4 * 10_000
    few = estimate(fp, "scores", 7, num_queries=4, num_examples=1)  # query pass dominates
    # beside the draws: the raw gradients (query pass) or the held ones and the (4, 1) scores (train pass)
    assert few.fixed == base + 4 * fp.grad_numel * 8 + 8 * 4
    # preconditioning, no draw alive: the gradients + the largest layer's temporaries (float64 in, two float32 out)
    assert few.floor == base + 4 * (fp.grad_numel * 8 + 220 * (8 + 2 * 4))
    assert few.total == max(few.fixed + 7 * few.per_row + few.scratch, few.floor)
    assert estimate(fp, "scores", 1, num_queries=400, num_examples=1).total == \
        estimate(fp, "scores", 1, num_queries=400, num_examples=1).floor  # many queries, one draw: the floor
    # streamed: two layers' factors (the largest twice) while preconditioning, the last layer's during the passes
    s = estimate(fp, "scores", 7, num_queries=4, num_examples=1, streamed=True)
    sizes = [11 * 11 + 20 * 20 + 220, 21 * 21 + 9 + 63]
    assert s.fixed == few.fixed - 4 * fp.factor_numel + 4 * sizes[-1]
    assert s.floor == few.floor - 4 * fp.factor_numel + 4 * 2 * max(sizes)


def test_measuring_a_footprint_keeps_no_activations_alive():
    """The saved-tensor hook must not tie an op's output to its own graph node: that reference cycle (C++, out of
    the garbage collector's reach) kept a whole forward's activations alive after every call."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_unet(size=8, channels=(4, 8))
    task = DiffusionTask(scheduler(), num_train_draws=1)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fp = measure_footprint(model, task, x)
    net = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert net < 0.1 * fp.act_bytes_per_row


def test_unet_conv_positions_and_linearity():
    model = tiny_unet(size=8, channels=(4, 8))
    task = DiffusionTask(scheduler(), num_train_draws=1)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    fp = measure_footprint(model, task, x)
    layers = {n: (di, do, r) for n, di, do, r in fp.layers}
    assert layers["conv_in"] == (1 * 9 + 1, 4, 64)          # 3x3 conv, 8x8 output positions
    assert layers["conv_out"] == (4 * 9 + 1, 1, 64)
    assert layers["time_embedding.linear_1"][2] == 1
    # the measurement is per row: the same with 1 example's 2 rows... as with 2 examples
    fp1 = measure_footprint(model, task, x[:2])
    assert fp1.act_bytes_per_row == fp.act_bytes_per_row


def test_choose_draws_per_forward_is_the_largest_that_fits():
    model = tiny_unet(size=8, channels=(4, 8))
    task = DiffusionTask(scheduler(), num_train_draws=1)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    fp = measure_footprint(model, task, x)
    for stage, kw in (("fit", {}), ("scores", dict(num_queries=8, num_examples=1000))):
        sizes = []
        for budget in (8 << 20, 32 << 20, 128 << 20):
            b = choose_draws_per_forward(model, task, x, budget, stage=stage, footprint=fp,
                                  config=CurvatureConfig(dtype=torch.float64), headroom=1.0, **kw)
            total = lambda n: estimate(fp, stage, n, factor_itemsize=8, **kw).total  # noqa: E731
            assert total(b) <= budget and (b == 4096 or total(b + 1) > budget)
            sizes.append(b)
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_too_small_budget_is_a_clear_error():
    model = tiny_unet(size=8, channels=(4, 8))
    task = DiffusionTask(scheduler(), num_train_draws=1)
    with pytest.raises(MemoryError, match="even one draw per forward"):
        choose_draws_per_forward(model, task, torch.rand(2, 1, 8, 8, dtype=torch.float64), "64KiB")


@pytest.mark.parametrize("text,value", [("512MiB", 512 << 20), ("6GB", 6_000_000_000), ("1.5 GiB", 3 << 29),
                                        (1000, 1000)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", "5 parsecs", -1, 0])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def _cross_unet_footprint(tokens, device="cpu"):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from conditional_models import text_unet

    model = text_unet(size=8, dtype=torch.float32).to(device)
    task = DiffusionTask(scheduler(), num_train_draws=1, condition="text")
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(2, 1, 8, 8, generator=g), torch.randn(2, tokens, 12, generator=g))
    with sdpa_kernel(SDPBackend.MATH):  # the meta device decomposes attention the same way
        return measure_footprint(model, task, data)


def test_cross_attention_layers_take_the_tokens_as_positions():
    fp3, fp7 = _cross_unet_footprint(3), _cross_unet_footprint(7)
    layers = {n: (di, do, r) for n, di, do, r in fp3.layers}
    # block 0 (8x8, 8 channels), the middle block (4x4, 16 channels), the last up block (8x8, 8 channels, two
    # attentions); to_k / to_v / to_q have no bias
    down, mid = "down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0"
    assert layers[f"{down}.attn2.to_k"] == (12, 8, 3) and layers[f"{down}.attn2.to_v"] == (12, 8, 3)
    assert layers[f"{mid}.attn2.to_k"] == (12, 16, 3)
    assert layers[f"{down}.attn1.to_k"] == (8, 8, 64) and layers[f"{mid}.attn1.to_k"] == (16, 16, 16)
    assert layers[f"{down}.attn2.to_q"] == (8, 8, 64)  # queries: the image positions
    cross = [n for n in layers if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(cross) == 8
    # factors and per-example gradients of the cross-attention keys / values are counted, whatever the tokens
    assert fp7.factor_numel == fp3.factor_numel and fp7.grad_numel == fp3.grad_numel
    assert sum(layers[n][0] * layers[n][1] for n in cross) == 12 * (6 * 8 + 2 * 16)
    # four more tokens: exactly four more positions of every key / value projection in the output gradients
    assert fp7.out_bytes_per_row - fp3.out_bytes_per_row == 4 * (4 * (6 * 8 + 2 * 16))
    # and at least the four more tokens' embeddings (kept for the keys' and values' backward) in the activations
    assert fp7.act_bytes_per_row - fp3.act_bytes_per_row >= 4 * 4 * 12
    e3, e7 = estimate(fp3, "fit", 8), estimate(fp7, "fit", 8)
    assert e3.fixed == e7.fixed and e7.per_row > e3.per_row


def test_footprint_on_the_meta_device_equals_the_cpu_one():
    """bench/memory_table.py sizes Stable Diffusion on the meta device (no weights): the same footprint as on
    the CPU with the math attention kernel (the meta device's decomposition)."""
    assert _cross_unet_footprint(5, "meta") == _cross_unet_footprint(5)


def test_plan_scores_holds_the_largest_query_block_that_fits():
    from kfac_influence.memory import plan_scores
    model = tiny_unet(size=8, channels=(4, 8))
    task = DiffusionTask(scheduler(), num_train_draws=2, num_query_draws=2)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    cfg = CurvatureConfig(dtype=torch.float64)
    fp = measure_footprint(model, task, x, config=cfg)

    def total(q, b):  # in blocks (q < 40) the whole (40, 50) float64 score matrix is held beside the block's
        whole = 8 * 40 * 50 if q < 40 else 0
        return estimate(fp, "scores", b, num_queries=q, num_examples=50, factor_itemsize=8).total + whole

    blocks = []
    for budget in (total(1, 1), total(3, 1) + 1, total(9, 1), total(40, 1) * 4):
        plan = plan_scores(model, task, x, budget, num_queries=40, num_examples=50, config=cfg, headroom=1.0,
                           footprint=fp)
        assert plan.peak == total(plan.query_batch, plan.draws_per_forward) <= budget
        assert plan.passes == -(-40 // plan.query_batch)
        if plan.query_batch < 40:
            # the largest block that fits at one draw per forward, rounded down to whole query groups
            # (draws_per_forward // 2 queries each), the block pairwise_scores then forms
            raw = max(q for q in range(1, 40) if total(q, 1) <= budget)
            group = max(1, plan.draws_per_forward // 2)
            assert total(40, 1) > budget and plan.query_batch % group == 0 and raw - group < plan.query_batch <= raw
        blocks.append(plan.query_batch)
    assert blocks[0] == 1 and blocks[1] == 3 and blocks[2] == 9 and blocks[3] == 40
    with pytest.raises(MemoryError, match="even one query"):
        plan_scores(model, task, x, total(1, 1) - 1, num_queries=40, num_examples=50, config=cfg, headroom=1.0,
                    footprint=fp)
