"""The class-conditional pipeline (issue 14, items 4 and 5): labels from the data through training (with condition
dropout), per-class sampling (with classifier-free guidance), the fit and the scores (each query under its own
class), to the report's exact same-class fraction. A tiny run on 40 digits keeps it to seconds."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

from kfac_influence.app import cli as app_cli
from kfac_influence.app.fingerprints import fingerprints
from kfac_influence.app.runner import Pipeline
from kfac_influence.app.settings import RunConfig, class_conditional, upgrade_settings
from kfac_influence.curvature import load_curvature
from kfac_influence.diffusion.data import DataConfig, DataError, load_dataset
from kfac_influence.diffusion.models import PRESETS, build_model, make_scheduler
from kfac_influence.diffusion.training import TrainConfig, train
from kfac_influence.scoring import pairwise_scores
from kfac_influence.storage import load_tensors

TINY_COND = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": None,
             "num_class_embeds": 11}
TINY = {k: v for k, v in TINY_COND.items() if k != "num_class_embeds"}
FAST = ["--limit", "40", "--steps", "6", "--batch-size", "8", "--checkpoint-every", "3", "--no-progress",
        "--threads", "1", "--num-queries", "4", "--sample-steps", "4", "--fit-draws", "1", "--train-draws", "1",
        "--query-draws", "2", "--top-k", "3", "--fit-draws-per-forward", "64", "--score-draws-per-forward", "64"]


def main(capsys, *args):
    code = app_cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    (base / "cond.json").write_text(json.dumps(TINY_COND))
    (base / "no_null.json").write_text(json.dumps({**TINY_COND, "num_class_embeds": 10}))
    (base / "plain.json").write_text(json.dumps(TINY))
    return base


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, models, one_thread):
    """A finished class-conditional run (labels auto-detected from the model's class embeddings, guided
    sampling): (out folder, stdout)."""
    out = tmp_path_factory.mktemp("cond") / "out"
    buf = io.StringIO()  # capsys is function-scoped: this module-scoped fixture captures stdout itself
    with contextlib.redirect_stdout(buf):
        code = app_cli.main(["run", "--out", str(out), "--model", str(models / "cond.json"), *FAST,
                             "--guidance-scale", "2", "--condition-dropout", "0.2"])
    assert code == 0
    return out, buf.getvalue()


def test_preset_digits_cond():
    assert PRESETS["digits-cond"]["num_class_embeds"] == 11
    assert {k: v for k, v in PRESETS["digits-cond"].items() if k != "num_class_embeds"} == PRESETS["digits-tiny"]
    assert build_model("digits-cond").config.num_class_embeds == 11
    assert class_conditional(RunConfig().merged({"model": {"spec": "digits-cond"}}))
    assert not class_conditional(RunConfig())
    assert not class_conditional(RunConfig().merged({"model": {"spec": "digits-cond"}, "data": {"labels": False}}))


def test_labels_flow_into_samples_scores_and_report(cond_run):
    out, stdout = cond_run
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["train"]["condition_dropout"] == 0.2 and run["settings"]["sample"]["guidance_scale"] == 2
    samples, sheader = load_tensors(str(out / "samples/samples.safetensors"))
    assert samples["labels"].tolist() == [0, 1, 2, 3]  # query k is generated for class k % 10
    assert sheader["null_label"] == 10 and sheader["class_names"] == [str(i) for i in range(10)]
    t, meta = load_tensors(str(out / "scores/scores.safetensors"))
    S = t["scores"]
    assert S.shape == (4, 40) and torch.isfinite(S).all()
    assert meta["query_names"][1] == "query_001 (seed 10001, class 1)"
    # the report's same-class fraction, computed here from the saved labels and scores (no classifier)
    data = load_dataset(DataConfig(limit=40))
    assert torch.equal(t["train_ids"], data.ids)
    train_labels = data.labels.numpy()
    order = np.argsort(-S.numpy(), axis=1, kind="stable")
    q = samples["labels"].numpy()[:, None]
    pos = (train_labels[order[:, :3]] == q).mean()
    neg = (train_labels[order[:, ::-1][:, :3]] == q).mean()
    chance = (train_labels[None, :] == q).mean()
    rep = json.loads((out / "report/report.json").read_text())
    cm = rep["class_match"]
    assert cm["exact"] is True and cm["classifier"] is None and cm["k"] == 3
    assert cm["query_classes"] == [0, 1, 2, 3]
    assert cm["top_positive_same_class"] == pytest.approx(pos, abs=1e-6)
    assert cm["top_negative_same_class"] == pytest.approx(neg, abs=1e-6)
    assert cm["chance"] == pytest.approx(chance, abs=1e-6)
    assert rep["query_conditions"]["10002"] == {"class": 2, "name": "2"} and rep["guidance_scale"] == 2
    md = (out / "report/report.md").read_text()
    assert "Class-conditional model" in md and "[query 3 [class 3]]" in md and "no classifier" in md
    assert f"{pos:.3f} (negative: {neg:.3f}" in stdout and "exact" in stdout


def test_scores_use_each_querys_class_and_the_class_matters(cond_run, one_thread):
    """Recomputing the scores with the saved labels reproduces the score stage's file (so it passed them), and
    other query labels give other scores (a pipeline that dropped the condition would fail both)."""
    out, _ = cond_run
    config = RunConfig.from_dict(upgrade_settings(json.loads((out / "run.json").read_text())["settings"]))
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    model, _ = ctx.trained()
    curvature = load_curvature(str(out / "fit/curvature.safetensors"), model)
    samples = ctx.samples()
    saved = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]

    def scores(labels):
        return pairwise_scores(model, ctx.task(), curvature, (samples["images"], labels), ctx.train_data(),
                               draws_per_forward=64, damping=config.score.damping, progress=False).float()

    assert torch.allclose(scores(samples["labels"]), saved, rtol=1e-4, atol=1e-6 * saved.abs().max())
    other = scores((samples["labels"] + 5) % 10)
    assert not torch.allclose(other, saved, rtol=1e-2, atol=1e-3 * saved.abs().max())


def test_rerun_skips_and_unconditional_fingerprints_ignore_condition_settings(cond_run, capsys):
    out, _ = cond_run
    code, _, err = main(capsys, "run", "--out", out, "--no-progress", "--threads", "1")
    assert code == 0 and sum("up to date" in ln for ln in err) == 5, err
    base = RunConfig()
    assert fingerprints(base) == fingerprints(base.merged({"train": {"condition_dropout": 0.3}}))
    cond = base.merged({"model": {"spec": "digits-cond"}})
    assert fingerprints(cond)["train"] != fingerprints(base.merged({"model": {"spec": "digits-cond"},
                                                                   "train": {"condition_dropout": 0.3}}))["train"]
    assert fingerprints(cond) == fingerprints(cond.merged({"data": {"labels": True}}))  # auto == explicit
    g = fingerprints(cond.merged({"sample": {"guidance_scale": 3.0}}))
    assert g["train"] == fingerprints(cond)["train"] and g["sample"] != fingerprints(cond)["sample"]


def test_condition_dropout_is_validated_and_used(tmp_path, capsys):
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="condition_dropout must be in"):
            TrainConfig(condition_dropout=bad)
    code, _, err = main(capsys, "train", "--out", tmp_path / "o", "--model", "digits-cond",
                        "--condition-dropout", "1")
    assert code == 2 and err[-1].startswith("kfac-influence: error: condition_dropout must be in [0, 1)")
    assert not (tmp_path / "o").exists()
    data = load_dataset(DataConfig(limit=16))
    cfg = dict(steps=2, batch_size=8, warmup_steps=0, checkpoint_every=0)
    weights = []
    for p in (0.0, 0.9):
        model = build_model("digits-cond", seed=0)
        r = train(model, make_scheduler(), data.images, TrainConfig(condition_dropout=p, **cfg), progress=False,
                  labels=data.labels, null_label=10)
        weights.append(torch.cat([v.flatten() for v in r.raw_model.state_dict().values()]))
    assert not torch.equal(weights[0], weights[1])  # the null class was used
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        train(build_model("digits-cond"), make_scheduler(), data.images, TrainConfig(**cfg), progress=False,
              labels=torch.full((16,), 10), null_label=10)


def test_data_and_model_must_agree(tmp_path, models, capsys):
    cases = [
        (["--model", models / "plain.json", "--labels", "true"], "needs a class-conditional model"),
        (["--model", models / "cond.json", "--labels", "false"], "is class-conditional"),
        (["--model", models / "plain.json", "--guidance-scale", "2"], "--guidance-scale needs"),
        (["--model", models / "cond.json", "--guidance-scale", "-1"], "guidance scale must be"),
        (["--model", models / "no_null.json"], "the data has 10 classes but"),
    ]
    for i, (args, needle) in enumerate(cases):
        code, _, err = main(capsys, "run", "--out", tmp_path / f"o{i}", "--limit", "10", "--no-progress", *args)
        assert code == 2 and needle in err[-1] and len(err) == 1, err
        assert not (tmp_path / f"o{i}").exists()


def test_image_folder_labels_are_class_subfolders(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for cls, n in (("zebra", 2), ("ant", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i + (100 if cls == "ant" else 0), np.uint8)).save(
                root / cls / f"{i}.png")
    unlabelled = load_dataset(DataConfig(source=str(root)))
    assert unlabelled.labels is None
    data = load_dataset(DataConfig(source=str(root), labels=True))
    assert data.class_names == ("ant", "zebra") and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.paths[0] == "ant/0.png" and data.fingerprint() != unlabelled.fingerprint()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "loose.png")
    with pytest.raises(DataError, match="loose.png: labelled image folders need one sub-folder per class"):
        load_dataset(DataConfig(source=str(root), labels=True))
    with pytest.raises(DataError, match="labels must be true, false or none"):
        DataConfig(labels="yes")


def test_guided_sampling_mixes_the_conditional_and_null_predictions(one_thread):
    """Scale 0 is sampling under the null class, 1 plain conditional sampling, 2 neither; the noise depends on
    the seed only."""
    from kfac_influence.diffusion.sampling import ddpm_sample

    model, sched = build_model("digits-cond", seed=1), make_scheduler()
    y = torch.tensor([3, 7])
    kw = dict(seed=5, num_inference_steps=3, progress=False, null_label=10)
    null = ddpm_sample(model, sched, 2, (1, 8, 8), class_labels=torch.full((2,), 10), **kw).images
    s0 = ddpm_sample(model, sched, 2, (1, 8, 8), class_labels=y, guidance_scale=0.0, **kw)
    s1 = ddpm_sample(model, sched, 2, (1, 8, 8), class_labels=y, **kw)
    s2 = ddpm_sample(model, sched, 2, (1, 8, 8), class_labels=y, guidance_scale=2.0, **kw)
    assert torch.allclose(s0.images, null, atol=1e-5) and s0.labels.tolist() == [3, 7]
    assert not torch.allclose(s1.images, null, atol=1e-3) and not torch.allclose(s2.images, s1.images, atol=1e-3)
    with pytest.raises(ValueError, match="needs class_labels"):
        ddpm_sample(model, sched, 2, (1, 8, 8), guidance_scale=2.0, **kw)


def test_conditional_training_resumes_exactly_and_refuses_other_labels(tmp_path, monkeypatch, one_thread):
    """Interrupted after step 5 (last checkpoint at step 4) and resumed: the weights of an uninterrupted run,
    condition dropout included; a checkpoint made with other labels is refused."""
    from kfac_influence.diffusion import training

    data = load_dataset(DataConfig(limit=16))
    sched = make_scheduler()
    cfg = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=4, condition_dropout=0.5)
    kw = dict(labels=data.labels, null_label=10, progress=False)
    full = train(build_model(str(_cond_json(tmp_path))), sched, data.images, cfg, **kw)
    update = training.EMA.update

    def interrupt_after_step_5(self, model, step):
        update(self, model, step)
        if step + 1 == 5:
            raise KeyboardInterrupt

    ck = str(tmp_path / "ck")
    with monkeypatch.context() as m:
        m.setattr(training.EMA, "update", interrupt_after_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(build_model(str(_cond_json(tmp_path))), sched, data.images, cfg, checkpoint_dir=ck, **kw)
    resumed = train(build_model(str(_cond_json(tmp_path))), sched, data.images, cfg, checkpoint_dir=ck, **kw)
    assert resumed.resumed_from == 4 and resumed.losses == full.losses[4:]
    for a, b in zip(resumed.raw_model.state_dict().values(), full.raw_model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="labels differ"):
        train(build_model(str(_cond_json(tmp_path))), sched, data.images, cfg, checkpoint_dir=ck,
              labels=(data.labels + 1) % 10, null_label=10, progress=False)


def _cond_json(folder):
    path = folder / "cond.json"
    if not path.exists():
        path.write_text(json.dumps(TINY_COND))
    return path
