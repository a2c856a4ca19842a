"""Small models and data shared by the tests."""
import copy
import functools

import torch


def tiny_unet(seed: int = 0, attention: bool = True, channels=(8, 16), size: int = 8, dtype=torch.float64):
    """A fresh copy of a cached tiny UNet (building diffusers models is slow)."""
    return copy.deepcopy(_tiny_unet(seed, attention, tuple(channels), size, dtype))


@functools.lru_cache(maxsize=None)
def _tiny_unet(seed: int = 0, attention: bool = True, channels=(8, 16), size: int = 8, dtype=torch.float64):
    """A diffusers UNet2DModel small enough for float64 brute force (attention in the second block)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    model = UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=channels,
                        layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=4,
                        attention_head_dim=8)
    return model.to(dtype)


def scheduler(T: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
