"""kfac_influence.latents on a tiny AutoencoderKL built from a config (no download): the encoding is the scaled
latent mean (checked image by image against the VAE itself), decoding inverts the scaling, an interrupted encoding
resumes to the same bytes, and a cache made from other inputs is refused."""
import functools

import pytest
import torch

from kfac_influence.latents import (DEFAULT_SCALING_FACTOR, LatentsMismatch, decode_latents, encode_latents,
                                    latent_factors, load_latents)

F64 = torch.float64


@functools.lru_cache(maxsize=None)
def _vae(scaling_factor):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kw = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
                         norm_num_groups=4, sample_size=8, layers_per_block=1, **kw).to(F64)


def vae(scaling_factor=0.5):
    import copy
    return copy.deepcopy(_vae(scaling_factor))


def images(n=7, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1


def test_encoding_is_the_scaled_latent_mean_and_decoding_inverts_it(tmp_path):
    v, x = vae(0.5), images()
    labels = torch.arange(7) % 3
    v.train()
    z = encode_latents(v, (x, labels), tmp_path / "z.safetensors", batch_size=3)
    assert v.training  # eval while encoding, the caller's mode restored
    assert z.shape == (7, 2, 4, 4) and z.dtype == F64
    with torch.no_grad():
        ref = torch.cat([v.encode(x[i:i + 1]).latent_dist.mean for i in range(7)]) * 0.5
        torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(decode_latents(v, z, batch_size=4), v.decode(z / 0.5).sample, rtol=1e-12,
                                   atol=1e-12)
    saved, header = load_latents(tmp_path / "z.safetensors")
    assert torch.equal(saved, z) and header["done"] == 7 and header["scaling_factor"] == 0.5
    # in memory, no file: the same latents
    assert torch.equal(encode_latents(v, x, batch_size=3), z)
    # factors: the argument, else the config, else Stable Diffusion 1.x's
    assert latent_factors(v) == (0.5, 0.0) and latent_factors(v, 2.0, 0.1) == (2.0, 0.1)
    assert latent_factors(torch.nn.Linear(1, 1)) == (DEFAULT_SCALING_FACTOR, 0.0)
    with pytest.raises(ValueError, match="scaling_factor must be positive"):
        latent_factors(v, 0.0)


def test_interrupted_encoding_resumes_to_the_same_file(tmp_path, monkeypatch):
    v, x = vae(), images(8)
    full = encode_latents(v, x, tmp_path / "full.safetensors", batch_size=3, save_every=1)

    calls = {"n": 0}
    real = v.encode

    def failing(inp):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("interrupted after 2 batches")
        return real(inp)

    monkeypatch.setattr(v, "encode", failing)
    part = tmp_path / "part.safetensors"
    with pytest.raises(KeyboardInterrupt):
        encode_latents(v, x, part, batch_size=3, save_every=1)
    saved, header = load_latents(part)
    assert header["done"] == 6 and torch.equal(saved, full[:6])
    monkeypatch.setattr(v, "encode", real)
    seen = []
    monkeypatch.setattr(v, "encode", lambda inp: seen.append(inp.shape[0]) or real(inp))
    z = encode_latents(v, x, part, batch_size=3, save_every=1)
    assert seen == [2]  # only the last batch was encoded again
    assert torch.equal(z, full)
    assert part.read_bytes() == (tmp_path / "full.safetensors").read_bytes()
    # a complete file is read, not recomputed
    seen.clear()
    assert torch.equal(encode_latents(v, x, part, batch_size=3), full) and seen == []


@pytest.mark.parametrize("change,match", [
    ("weights", "the VAE's weights"), ("images", "the images"), ("batch_size", "batch_size"),
    ("scaling", "scaling_factor"),
])
def test_a_cache_of_other_inputs_is_refused(tmp_path, change, match):
    v, x = vae(), images()
    path = tmp_path / "z.safetensors"
    encode_latents(v, x, path, batch_size=3)
    kw = dict(batch_size=3)
    if change == "weights":
        with torch.no_grad():
            v.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    elif change == "images":
        x = x.clone()
        x[3, 0, 0, 0] = 0.123
    elif change == "batch_size":
        kw["batch_size"] = 4
    else:
        kw["scaling_factor"] = 0.2
    with pytest.raises(LatentsMismatch, match=f"{match}.* differ\\); delete it or choose another path") as e:
        encode_latents(v, x, path, **kw)
    assert "\n" not in str(e.value)


def test_encode_rejects_bad_inputs():
    with pytest.raises(ValueError, match="batch_size must be"):
        encode_latents(vae(), images(), batch_size=0)
    with pytest.raises(ValueError, match="images must be \\(N, C, H, W\\)"):
        encode_latents(vae(), images().flatten(1))
    with pytest.raises(TypeError, match="latent_dist"):
        encode_latents(torch.nn.Conv2d(1, 1, 1).double(), images())


def test_latent_diffusion_attributes_the_unet_on_cached_latents(tmp_path, one_thread):
    """The library flow of a latent model: images encoded once, curvature and scores of the (class-conditional)
    UNet on the latents, the VAE untouched and untracked, generated latents decoded for viewing."""
    from diffusers import UNet2DModel

    from kfac_influence import CurvatureConfig, fit_curvature, pairwise_scores
    from kfac_influence.tasks import DiffusionTask
    from helpers import scheduler

    v, x = vae(), images(6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    before = {k: p.clone() for k, p in v.state_dict().items()}
    z = encode_latents(v, x, tmp_path / "z.safetensors", batch_size=4)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3).to(F64)
    task = DiffusionTask(scheduler(), num_train_draws=2, num_query_draws=2, condition="class")
    curv = fit_curvature(unet, task, (z, labels), CurvatureConfig(method="kfac", dtype=F64), draws_per_forward=4, progress=False)
    queries = (torch.randn(2, 2, 4, 4, dtype=F64), torch.tensor([1, 2]))  # generated latents, their labels
    S = pairwise_scores(unet, task, curv, queries, (z, labels), draws_per_forward=4, progress=False, damping=1e-3)
    assert S.shape == (2, 6) and torch.isfinite(S).all()
    tracked = set(curv.module_names)
    assert tracked == {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert all(torch.equal(p, before[k]) for k, p in v.state_dict().items())
    assert decode_latents(v, queries[0]).shape == (2, 1, 8, 8)
