"""Tiny conditional models for the tests (float64, built from configs: no download)."""
import copy
import functools

import torch
import torch.nn as nn


def class_unet(num_classes: int = 3, size: int = 4, seed: int = 0, dtype=torch.float64):
    """A class-conditional diffusers ``UNet2DModel`` (``num_class_embeds``), attention in the second block."""
    return copy.deepcopy(_class_unet(num_classes, size, seed, dtype))


@functools.lru_cache(maxsize=None)
def _class_unet(num_classes, size, seed, dtype):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=num_classes).to(dtype)


def text_unet(cross_dim: int = 12, size: int = 4, seed: int = 0, dtype=torch.float64, channels=(8, 16)):
    """A cross-attention diffusers ``UNet2DConditionModel`` (text-to-image layout, tiny)."""
    return copy.deepcopy(_text_unet(cross_dim, size, seed, dtype, tuple(channels)))


@functools.lru_cache(maxsize=None)
def _text_unet(cross_dim, size, seed, dtype, channels):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=channels,
                                layers_per_block=1, cross_attention_dim=cross_dim, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4).to(dtype)


class LabelNet(nn.Module):
    """A class-conditional epsilon-predictor whose only tracked layer is its last Linear ``head``, so that K-FAC
    with the type-2 Fisher is the exact GGN of the tracked parameters: f = head(tanh(inp(x) + emb(y) + t / T)).
    ``class_labels=None`` uses a zero embedding (what a model that dropped the condition would compute)."""

    def __init__(self, pixels: int = 16, hidden: int = 6, num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(pixels, hidden)
        self.emb = nn.Embedding(num_classes, hidden)
        self.head = nn.Linear(hidden, pixels)
        self.double()

    def forward(self, x, t, class_labels=None):
        h = self.inp(x.flatten(1)) + (t.to(x.dtype) / 1000.0)[:, None]
        if class_labels is not None:
            h = h + 2.0 * self.emb(class_labels)
        return self.head(torch.tanh(h)).view_as(x)
