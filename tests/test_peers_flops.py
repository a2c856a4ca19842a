"""bench/peers_flops.py: the floor it counts from layer shapes is the forward + input gradient + weight gradient of
the tracked layers, three times their forward multiply-adds, which torch's own FLOP counter measures."""
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import peers_flops  # noqa: E402
from peers_stage import Setup  # noqa: E402


def test_floor_is_three_forwards_of_the_tracked_layers_as_torch_counts_them():
    size = 8
    st = Setup(size, 1, 1, 1)
    x, t, _ = st.rows("train")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        st.model(x[:1], t[:1])
    counts = counter.get_flop_counts()["Global"]
    # tracked layers are every Linear (addmm / mm) and Conv2d (convolution); attention's own products are not
    linear_and_conv = sum(v for op, v in counts.items()
                          if str(op).split(".")[1] in ("convolution", "addmm", "mm"))
    floor = sum(peers_flops.layer_macs(m, i, o, 0)["floor"] for _, m, i, o in peers_flops.layer_shapes(size))
    assert floor == 3 * linear_and_conv // 2

