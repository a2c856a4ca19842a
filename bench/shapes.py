"""Representative layer shapes of the two model presets, shared by the microbenchmarks and the GPU check.

cifar-ddpm: diffusers UNet2DModel at 32x32, block_out_channels (128, 256, 256, 256), 2 layers per block, attention
at 16x16, time embedding 128 -> 512 -> 512. digits-tiny: a small UNet2DModel at 8x8 with channels 32/64.
Each entry: name, kind ("conv" with (C_in, C_out, H, k) or "linear" with (D_in, D_out, R)), examples per batch.
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
QUERIES = 64


def layer_dims(s):
    """(R, D_in, D_out) of the layer's (a, g) rows; conv inputs are patches (C_in * k * k)."""
    if s["kind"] == "conv":
        return s["hw"] * s["hw"], s["c_in"] * s["k"] ** 2, s["c_out"]
    return s["r"], s["d_in"], s["d_out"]
