"""The latent pipeline (issue 14, item 3): a fixed VAE in front of the UNet. The training images are encoded once
(latent mean x scaling_factor) into a cached, resumable latents file; train, fit and score run on latents; queries
are generated latents, decoded for the report. Checked on a tiny diffusers pipeline folder built with
``save_pretrained`` (``--model path/``: unet/, vae/, scheduler/) and on the ``latent-tiny`` preset (whose VAE the
pipeline trains), with tiny shapes: 24 digits at 16x16, latents 8x8."""
import contextlib
import io
import json
import os
import shutil
import signal

import pytest
import torch

from kfac_influence.app import cli as app_cli
from kfac_influence.app.fingerprints import fingerprints
from kfac_influence.app.runner import Pipeline
from kfac_influence.app.settings import PRESET_SETTINGS, RunConfig, latent_run, upgrade_settings
from kfac_influence.curvature import load_curvature
from kfac_influence.diffusion.data import DataConfig, load_dataset
from kfac_influence.diffusion.models import load_model
from kfac_influence.diffusion.vae import VAEConfig, build_vae, latent_std, load_vae, train_vae
from kfac_influence.identity import data_fingerprint
from kfac_influence.latents import decode_latents, load_latents
from kfac_influence.scoring import pairwise_scores
from kfac_influence.storage import load_tensors, model_fingerprint
from kfac_influence.tasks import DiffusionTask

TINY_VAE = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), latent_channels=1,
                layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.7)
# latent_channels == the images' channels: a UNet scored on the 16x16 pixels would run too, only giving other
# numbers (so the "scores are of latents" test below is about values, not shapes)
TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=None)
FAST = ["--limit", "24", "--image-size", "16", "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2",
        "--num-queries", "2", "--sample-steps", "3", "--fit-draws", "1", "--train-draws", "1", "--query-draws", "2",
        "--top-k", "2", "--fit-draws-per-forward", "8", "--score-draws-per-forward", "64", "--encode-batch-size",
        "8", "--no-progress", "--threads", "1"]


def main(capsys, *args):
    code = app_cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.err.strip().splitlines()


def quiet(*args):
    """``kfac-influence ARGS`` for a module fixture (capsys is function-scoped): (status, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = app_cli.main([str(a) for a in args])
    return code, err.getvalue().strip().splitlines()


def make_folder(path, vae_seed=0, unet=None):
    """A latent diffusers pipeline folder written by ``save_pretrained`` (model_index.json, unet/, vae/,
    scheduler/), through a pipeline class of the test's own: the loader reads components, not the class.
    ``unet``: the UNet to save (default a tiny ``UNet2DModel``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DModel

    class TinyLatentPipeline(DiffusionPipeline):
        def __init__(self, unet, vae, scheduler):
            super().__init__()
            self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    torch.manual_seed(vae_seed)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(1)
    unet = UNet2DModel(**TINY_UNET) if unet is None else unet
    sched = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    TinyLatentPipeline(unet=unet, vae=vae, scheduler=sched).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("model") / "pipe")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder, one_thread):
    """An uninterrupted latent run on the folder model: (out folder, stderr lines)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    code, err = quiet("run", "--out", out, "--model", folder, *FAST)
    assert code == 0, err
    return out, err


def data24():
    return load_dataset(DataConfig(limit=24, image_size=16))


def test_folder_run_trains_fits_and_scores_on_latents(reference, folder, one_thread):
    out, err = reference
    assert latent_run(RunConfig().merged({"model": {"spec": str(folder)}}))
    assert not (out / "vae").exists() and not any(ln.startswith("[vae]") for ln in err)  # the folder's VAE
    data = data24()
    vae = load_vae(str(folder / "vae"))
    # the cached latents: the scaled latent MEAN of each image, computed here image by image from the VAE itself
    z, header = load_latents(str(out / "latents/latents.safetensors"))
    with torch.no_grad():
        ref = torch.cat([vae.encode(data.images[i:i + 1]).latent_dist.mean for i in range(24)]) * 1.7
    assert z.shape == (24, 1, 8, 8)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)
    assert header["vae"] == model_fingerprint(vae.named_parameters()) and header["scaling_factor"] == 1.7
    assert header["images"] == data_fingerprint(data.images) and header["done"] == 24
    stage = json.loads((out / "latents/stage.json").read_text())
    assert stage["done"] and stage["manifest"] == ["latents.safetensors"] and set(stage["inputs"]) == {"data", "vae"}
    # queries: generated latents (the folder's scheduler: T = 100), decoded for people
    samples = load_tensors(str(out / "samples/samples.safetensors"))[0]
    assert samples["latents"].shape == (2, 1, 8, 8) and samples["images"].shape == (2, 1, 16, 16)
    assert int(samples["timesteps"].max()) < 100
    torch.testing.assert_close(samples["images"], decode_latents(vae, samples["latents"]).clamp(-1, 1),
                               rtol=1e-5, atol=1e-6)
    # the trained pipeline folder carries the fixed VAE (so --model loads it back)
    assert model_fingerprint(load_vae(str(out / "train/pipeline/vae")).named_parameters()) == header["vae"]
    rep = json.loads((out / "report/report.json").read_text())
    assert rep["latent"]["latent_shape"] == [1, 8, 8] and "Latent diffusion" in (out / "report/report.md").read_text()


def test_scores_are_those_of_latents_not_pixels(reference, one_thread):
    """Scores recomputed from the independently encoded latents and the generated latents equal the score stage's;
    the same computation on pixels (the images and the decoded queries, which this UNet also takes) differs: a
    pipeline that scored pixels fails here."""
    out, _ = reference
    config = RunConfig.from_dict(upgrade_settings(json.loads((out / "run.json").read_text())["settings"]))
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    model, _ = ctx.trained()
    curvature = load_curvature(str(out / "fit/curvature.safetensors"), model)
    samples = load_tensors(str(out / "samples/samples.safetensors"))[0]
    saved = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]
    task = ctx.task()
    data = data24()
    vae = load_vae(str(out / "train/pipeline/vae"))
    with torch.no_grad():
        latents = vae.encode(data.images).latent_dist.mean * vae.config.scaling_factor

    def scores(queries, train):
        return pairwise_scores(model, task, curvature, queries, train, draws_per_forward=64,
                               damping=config.score.damping, progress=False).float()

    assert torch.allclose(scores(samples["latents"], latents), saved, rtol=1e-4, atol=1e-5 * saved.abs().max())
    pixels = scores(samples["images"], data.images)
    assert pixels.shape == saved.shape
    assert not torch.allclose(pixels, saved, rtol=1e-2, atol=1e-3 * saved.abs().max())


def test_interrupted_encode_and_fit_resume_bit_identically(tmp_path, reference, folder, capsys, monkeypatch,
                                                           one_thread):
    """Ctrl-C in the third batch of the encoding, then Ctrl-C in the fit's second group: each rerun resumes
    from the stage's checkpoint, and the latents file, the curvature and the scores equal the uninterrupted
    run's (checkpoint frequency changes no result)."""
    import kfac_influence.latents as latents_mod

    ref, _ = reference
    out = tmp_path / "out"
    args = ["run", "--out", out, "--model", folder, *FAST, "--checkpoint-seconds", "1e-6"]
    real_encode = latents_mod._encode_batch
    calls = {"n": 0}

    def ctrl_c_in_the_third_batch(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_encode(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(latents_mod, "_encode_batch", ctrl_c_in_the_third_batch)
        code, err = main(capsys, *args)
    assert code == 130 and err[-1] == "kfac-influence: interrupted; rerun the same command to resume", err
    partial, header = load_latents(str(out / "latents/checkpoints/latents.safetensors"))
    assert header["done"] == 16 and partial.shape[0] == 16  # two batches of 8 saved
    assert not (out / "latents/latents.safetensors").exists() and not (out / "latents/.new").exists()
    assert not json.loads((out / "latents/stage.json").read_text()).get("done")

    draws = DiffusionTask.draws
    n = {"draws": 0}

    def ctrl_c_in_the_second_group(self, *a, **kw):
        n["draws"] += 1
        if n["draws"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return draws(self, *a, **kw)

    seen = []
    monkeypatch.setattr(latents_mod, "_encode_batch", lambda vae, x, *a: seen.append(x.shape[0]) or
                        real_encode(vae, x, *a))
    with monkeypatch.context() as m:
        m.setattr(DiffusionTask, "draws", ctrl_c_in_the_second_group)
        code, err = main(capsys, *args)
    assert code == 130, err
    assert any(ln.startswith("[encode] running") and "resuming from the checkpoint" in ln for ln in err), err
    assert seen == [8]  # only the third batch was encoded
    assert (out / "latents/latents.safetensors").read_bytes() == (ref / "latents/latents.safetensors").read_bytes()
    assert (out / "fit/checkpoints/fit_state.safetensors").is_file() and not (out / "fit/curvature.safetensors").exists()

    code, err = main(capsys, *args)
    assert code == 0, err
    assert any(ln.startswith("[fit] running") and "resuming from the checkpoint" in ln for ln in err), err
    assert sum("up to date" in ln for ln in err) == 3, err  # encode, train, sample
    a = load_tensors(str(out / "fit/curvature.safetensors"))[0]
    b = load_tensors(str(ref / "fit/curvature.safetensors"))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"],
                       load_tensors(str(ref / "scores/scores.safetensors"))[0]["scores"])
    assert not (out / "latents/checkpoints").exists() and not (out / "fit/checkpoints").exists()


def test_a_changed_vae_invalidates_the_cached_latents(tmp_path, capsys, one_thread):
    """New VAE weights in the --model folder: the encode stage reruns and says why, its latents record the new
    VAE; a file the encode stage did not write stops it, untouched."""
    model = make_folder(tmp_path / "pipe")
    out = tmp_path / "out"
    args = [*FAST, "--steps", "0"]
    code, err = main(capsys, "run", "--out", out, "--model", model, *args)
    assert code == 0, err
    before = (out / "latents/latents.safetensors").read_bytes()
    old = load_latents(str(out / "latents/latents.safetensors"))[0]
    code, err = main(capsys, "encode", "--out", out, "--no-progress", "--threads", "1")
    assert code == 0 and any(ln.startswith("[encode] up to date") for ln in err), err

    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(model / "vae"), safe_serialization=True)
    new = load_vae(str(model / "vae"))
    (out / "latents/notes.txt").write_text("mine")
    code, err = main(capsys, "encode", "--out", out, "--no-progress", "--threads", "1")
    assert code == 2 and "notes.txt, not written by kfac-influence" in err[-1] and len(err) == 1, err
    assert (out / "latents/latents.safetensors").read_bytes() == before
    (out / "latents/notes.txt").unlink()
    code, err = main(capsys, "encode", "--out", out, "--no-progress", "--threads", "1")
    assert code == 0, err
    why = next(ln for ln in err if ln.startswith("[encode] running"))
    assert "the VAE (its weights) changed since it ran (vae " in why, why
    z, header = load_latents(str(out / "latents/latents.safetensors"))
    assert header["vae"] == model_fingerprint(new.named_parameters()) and not torch.allclose(z, old)
    # the stages reading the latents are no longer done (they say the latents changed)
    code, err = main(capsys, "run", "--out", out, *args)
    assert code == 0 and any("[train] running" in ln and "changed since it ran" in ln for ln in err), err


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory, one_thread):
    """``--model latent-tiny`` (its VAE trained by the pipeline; class-conditional UNet) with tiny settings."""
    out = tmp_path_factory.mktemp("preset") / "out"
    code, err = quiet("run", "--out", out, "--model", "latent-tiny", *FAST, "--vae-steps", "3",
                      "--vae-batch-size", "8", "--vae-checkpoint-every", "2")
    assert code == 0, err
    return out, err


def test_latent_tiny_preset_trains_its_vae_then_a_conditional_unet_on_latents(preset_run, one_thread):
    out, err = preset_run
    assert [ln.split("]")[0][1:] for ln in err if ln.endswith("not run yet")] == \
        ["vae", "encode", "train", "sample", "fit", "score", "report"]
    vae = load_vae(str(out / "vae/vae"))
    data = data24()
    # scaling_factor = 1 / std of the training images' latent means, recomputed here
    with torch.no_grad():
        means = vae.encode(data.images).latent_dist.mean.double()
    assert vae.config.scaling_factor == pytest.approx(1.0 / float(means.std()), rel=1e-5)
    losses = json.loads((out / "vae/losses.json").read_text())
    assert len(losses["losses"]) == 3 and losses["scaling_factor"] == vae.config.scaling_factor
    z, header = load_latents(str(out / "latents/latents.safetensors"))
    assert z.shape == (24, 2, 4, 4) and float(z.std()) == pytest.approx(1.0, rel=1e-3)  # unit variance
    assert header["vae"] == model_fingerprint(vae.named_parameters())
    unet, _ = load_model(str(out / "train/pipeline"))
    assert unet.config.in_channels == 2 and unet.config.num_class_embeds == 11
    samples = load_tensors(str(out / "samples/samples.safetensors"))[0]
    assert samples["labels"].tolist() == [0, 1] and samples["latents"].shape == (2, 2, 4, 4)
    assert samples["images"].shape == (2, 1, 16, 16)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["scheduler"]["clip_sample"] is False  # the preset's default: latents are not clipped
    assert run["settings"]["vae"]["steps"] == 3 and set(run["fingerprints"]) >= {"vae", "encode"}
    assert json.loads((out / "report/report.json").read_text())["class_match"]["exact"] is True
    # the scores: each query's generated latent under its class, each training latent under its label
    config = RunConfig.from_dict(upgrade_settings(run["settings"]))
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    model, _ = ctx.trained()
    curvature = load_curvature(str(out / "fit/curvature.safetensors"), model)
    saved = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]
    with torch.no_grad():
        latents = vae.encode(data.images).latent_dist.mean * vae.config.scaling_factor
    again = pairwise_scores(model, ctx.task(), curvature, (samples["latents"], samples["labels"]),
                            (latents, data.labels), draws_per_forward=64, damping=config.score.damping,
                            progress=False).float()
    assert torch.allclose(again, saved, rtol=1e-4, atol=1e-5 * saved.abs().max())


def test_rerun_is_up_to_date_and_a_vae_setting_reruns_from_the_vae(preset_run, tmp_path, capsys, one_thread):
    out, _ = preset_run
    code, err = main(capsys, "run", "--out", out, "--no-progress", "--threads", "1")
    assert code == 0 and sum("up to date" in ln for ln in err) == 7, err
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    code, err = main(capsys, "vae", "--out", copy, "--vae-kl-weight", "0.01", "--no-progress", "--threads", "1")
    assert code == 0 and any(ln.startswith("[vae] running") and "settings changed" in ln for ln in err), err
    code, err = main(capsys, "train", "--out", copy, "--no-progress")  # the latents are of the old VAE
    assert code == 2 and "stage 'encode' is not done" in err[-1] and len(err) == 1, err


def test_preset_defaults_and_settings():
    parser = app_cli.build_parser()
    config = app_cli._resolve(parser.parse_args(["run", "--out", "/nonexistent/x", "--model", "latent-tiny"]))
    assert config.data.image_size == 32 and config.scheduler.clip_sample is False
    assert config.train.steps == PRESET_SETTINGS["latent-tiny"]["train"]["steps"] and config.fit.curvature.num_draws
    given = app_cli._resolve(parser.parse_args(["run", "--out", "/nonexistent/x", "--model", "latent-tiny",
                                                "--image-size", "16", "--steps", "7"]))
    assert given.data.image_size == 16 and given.train.steps == 7  # options win over a preset's defaults
    assert app_cli._resolve(parser.parse_args(["run", "--out", "/nonexistent/x"])).data.image_size is None
    # pixel runs: no latent stages, fingerprints independent of the vae settings
    base = RunConfig()
    assert set(fingerprints(base)) == {"train", "sample", "fit", "score", "report"}
    assert fingerprints(base) == fingerprints(base.merged({"vae": {"steps": 1, "encode_batch_size": 3}}))
    lat = base.merged({"model": {"spec": "latent-tiny"}})
    assert fingerprints(lat.merged({"vae": {"encode_batch_size": 3}}))["vae"] == fingerprints(lat)["vae"]
    assert fingerprints(lat.merged({"vae": {"encode_batch_size": 3}}))["encode"] != fingerprints(lat)["encode"]
    for bad, needle in (({"steps": -1}, "must be >= 0"), ({"kl_weight": float("nan")}, "finite number"),
                        ({"encode_batch_size": 0}, "batch sizes must be >= 1"), ({"lr": 0.0}, "lr must be > 0")):
        with pytest.raises(ValueError, match=needle):
            VAEConfig(**bad)


def test_one_line_errors_before_anything_is_written(tmp_path, folder, capsys):
    cases = [
        (["vae"], "the vae stage is for latent runs (--model latent-tiny or a diffusers pipeline folder with vae/)"),
        (["vae", "--model", folder], "the vae stage is for latent runs with a VAE preset"),
        (["run", "--model", "latent-tiny", "--image-size", "10"], "so image sides must be multiples of 4"),
        (["run", "--model", "latent-tiny", "--vae-steps", "-2"], "vae steps, warmup_steps and checkpoint_every"),
        (["run", "--model", folder, "--image-size", "16", "--channels", "3"],
         "takes 1-channel images but the data has 3"),
    ]
    for i, (args, needle) in enumerate(cases):
        code, err = main(capsys, args[0], "--out", tmp_path / f"o{i}", "--limit", "8", "--no-progress", *args[1:])
        assert code == 2 and len(err) == 1 and needle in err[0], (args, err)
        assert not (tmp_path / f"o{i}").exists()
    code, err = main(capsys, "lds", "--out", tmp_path / "lds", "--scores", tmp_path / "s.safetensors", "--queries",
                     tmp_path / "q.safetensors", "--model", "latent-tiny")
    assert code == 2 and "is a latent model (it has a VAE); lds and retrain-top retrain pixel-space" in err[-1], err
    assert not (tmp_path / "lds").exists()


def test_interrupted_vae_training_resumes_to_the_same_weights(tmp_path, monkeypatch, one_thread):
    import kfac_influence.diffusion.vae as vae_mod

    x = data24().images
    cfg = VAEConfig(steps=4, batch_size=8, checkpoint_every=1, warmup_steps=1)
    full = train_vae(build_vae("latent-tiny", in_channels=1, sample_size=16), x, cfg, progress=False)
    real = vae_mod.save_tensors
    calls = {"n": 0}

    def stop_after_the_second_checkpoint(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    ck = tmp_path / "ck"
    with monkeypatch.context() as m:
        m.setattr(vae_mod, "save_tensors", stop_after_the_second_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train_vae(build_vae("latent-tiny", in_channels=1, sample_size=16), x, cfg, checkpoint_dir=str(ck),
                      progress=False)
    resumed = train_vae(build_vae("latent-tiny", in_channels=1, sample_size=16), x, cfg, checkpoint_dir=str(ck),
                        progress=False)
    assert resumed.resumed_from == 2 and len(resumed.losses) == 2
    assert all(torch.equal(a, b) for a, b in zip(full.vae.state_dict().values(), resumed.vae.state_dict().values()))
    assert resumed.scaling_factor == full.scaling_factor == pytest.approx(1 / latent_std(full.vae, x, 8))
    with pytest.raises(Exception, match="checkpoint of a different VAE, config or data"):
        train_vae(build_vae("latent-tiny", in_channels=1, sample_size=16), x[:16], cfg, checkpoint_dir=str(ck),
                  progress=False)


def test_text_conditional_latent_folder_scores_latents_under_their_captions(tmp_path, capsys, one_thread):
    """A Stable-Diffusion-shaped folder (UNet2DConditionModel + AutoencoderKL + scheduler) on captioned images:
    the scores equal those recomputed from (independently encoded latents, caption embeddings) and (generated
    latents, prompt embeddings), not those of the pixels under the same embeddings."""
    from diffusers import UNet2DConditionModel
    from test_text_pipeline import TINY_TEXT, write_embeddings, write_folder

    captions = write_folder(tmp_path / "imgs")  # 24 captioned 8x8 digits, read at 16x16
    write_embeddings(tmp_path / "emb.safetensors", list(dict.fromkeys(captions)) + [""])
    torch.manual_seed(2)
    model = make_folder(tmp_path / "pipe", unet=UNet2DConditionModel(
        **{k: v for k, v in TINY_TEXT.items() if not k.startswith("_")}))
    out = tmp_path / "out"
    code, err = main(capsys, "run", "--out", out, "--data", tmp_path / "imgs", "--model", model, "--embeddings",
                     tmp_path / "emb.safetensors", *FAST)
    assert code == 0, err
    config = RunConfig.from_dict(upgrade_settings(json.loads((out / "run.json").read_text())["settings"]))
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    assert ctx.latent and ctx.text_conditional
    unet, _ = ctx.trained()
    curvature = load_curvature(str(out / "fit/curvature.safetensors"), unet)
    samples = load_tensors(str(out / "samples/samples.safetensors"))[0]
    saved = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]
    vae = load_vae(str(model / "vae"))
    with torch.no_grad():
        latents = vae.encode(ctx.data().images).latent_dist.mean * 1.7

    def scores(queries, train):
        return pairwise_scores(unet, ctx.task(), curvature, ctx.text().queries().as_data(queries),
                               ctx.text().train().as_data(train), draws_per_forward=64,
                               damping=config.score.damping, progress=False).float()

    assert torch.allclose(scores(samples["latents"], latents), saved, rtol=1e-4, atol=1e-5 * saved.abs().max())
    pixels = scores(samples["images"], ctx.data().images)
    assert not torch.allclose(pixels, saved, rtol=1e-2, atol=1e-3 * saved.abs().max())
