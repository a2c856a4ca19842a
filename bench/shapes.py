"""Representative layer shapes of the two model presets, shared by the microbenchmarks and the GPU check.

cifar-ddpm: diffusers UNet2DModel at 32x32, block_out_channels (128, 256, 256, 256), 2 layers per block, attention
at 16x16, time embedding 128 -> 512 -> 512. digits-tiny: a small UNet2DModel at 8x8 with channels 32/64.
sd15: the UNet of Stable Diffusion 1.5 (UNet2DConditionModel, 64x64x4 latents, block_out_channels
(320, 640, 1280, 1280), cross-attention to 77 CLIP tokens of width 768, time embedding 320 -> 1280 -> 1280); its
attention q/k/v projections have no bias. Only the compile check (bench/compile_check.py) and the roofline
predictions (bench/roofline.py) use these: the CPU microbenchmarks stay at the two small presets.
Each entry: name, kind ("conv" with (C_in, C_out, H, k) or "linear" with (D_in, D_out, R)), examples per batch,
and ``bias`` (default True: the layer's covariance and gradients carry the homogeneous coordinate).
"""
CIFAR = [
    dict(name="cifar conv3x3 128->128 @32", kind="conv", c_in=128, c_out=128, hw=32, k=3, batch=16),
    dict(name="cifar conv3x3 256->256 @16", kind="conv", c_in=256, c_out=256, hw=16, k=3, batch=32),
    dict(name="cifar conv3x3 256->256 @8", kind="conv", c_in=256, c_out=256, hw=8, k=3, batch=64),
    dict(name="cifar attn linear 256->256 x256", kind="linear", d_in=256, d_out=256, r=256, batch=32),
    dict(name="cifar time-emb linear 512->512", kind="linear", d_in=512, d_out=512, r=1, batch=256),
]
DIGITS = [
    dict(name="digits conv3x3 32->32 @8", kind="conv", c_in=32, c_out=32, hw=8, k=3, batch=64),
    dict(name="digits conv3x3 64->64 @4", kind="conv", c_in=64, c_out=64, hw=4, k=3, batch=64),
    dict(name="digits time-emb linear 128->128", kind="linear", d_in=128, d_out=128, r=1, batch=64),
]
SD15 = [
    dict(name="sd15 conv_in 4->320 @64", kind="conv", c_in=4, c_out=320, hw=64, k=3, batch=4),
    dict(name="sd15 conv3x3 320->320 @64", kind="conv", c_in=320, c_out=320, hw=64, k=3, batch=4),
    dict(name="sd15 conv3x3 640->640 @32", kind="conv", c_in=640, c_out=640, hw=32, k=3, batch=4),
    dict(name="sd15 conv3x3 1280->1280 @16", kind="conv", c_in=1280, c_out=1280, hw=16, k=3, batch=4),
    dict(name="sd15 conv3x3 1280->1280 @8", kind="conv", c_in=1280, c_out=1280, hw=8, k=3, batch=4),
    dict(name="sd15 attn to_q 320->320 x4096", kind="linear", d_in=320, d_out=320, r=4096, batch=4, bias=False),
    dict(name="sd15 attn to_q 640->640 x1024", kind="linear", d_in=640, d_out=640, r=1024, batch=4, bias=False),
    dict(name="sd15 attn to_q 1280->1280 x256", kind="linear", d_in=1280, d_out=1280, r=256, batch=4, bias=False),
    dict(name="sd15 attn to_out 320->320 x4096", kind="linear", d_in=320, d_out=320, r=4096, batch=4),
    dict(name="sd15 xattn to_k 768->320 x77", kind="linear", d_in=768, d_out=320, r=77, batch=4, bias=False),
    dict(name="sd15 xattn to_k 768->640 x77", kind="linear", d_in=768, d_out=640, r=77, batch=4, bias=False),
    dict(name="sd15 xattn to_k 768->1280 x77", kind="linear", d_in=768, d_out=1280, r=77, batch=4, bias=False),
    dict(name="sd15 time-emb linear 320->1280", kind="linear", d_in=320, d_out=1280, r=1, batch=64),
    dict(name="sd15 time-emb linear 1280->1280", kind="linear", d_in=1280, d_out=1280, r=1, batch=64),
]
QUERIES = 64


def layer_dims(s):
    """(R, D_in, D_out) of the layer's (a, g) rows; conv inputs are patches (C_in * k * k)."""
    if s["kind"] == "conv":
        return s["hw"] * s["hw"], s["c_in"] * s["k"] ** 2, s["c_out"]
    return s["r"], s["d_in"], s["d_out"]
