"""End-to-end `kfac-influence` through subprocesses: outputs, skipping, resuming an interrupted training, a damping
sweep on one fit, settings of earlier versions, bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from kfac_influence.app import cli as app_cli
from kfac_influence.diffusion import training
from kfac_influence.storage import load_tensors

TINY = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4, "attention_head_dim": None}
TRAIN_FAST = ["--limit", "40", "--steps", "6", "--batch-size", "8", "--checkpoint-every", "2", "--no-progress"]
FAST = TRAIN_FAST + ["--num-queries", "3", "--sample-steps", "4", "--fit-draws", "1", "--train-draws", "1",
                     "--query-draws", "2", "--top-k", "2", "--fit-draws-per-forward", "64",
                     "--score-draws-per-forward", "64"]


def cli(*args, env=None, check=True):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "kfac_influence", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_json):
    out = tmp_path_factory.mktemp("run") / "out"
    p = cli("run", "--out", out, "--model", tiny_json, *FAST)
    return out, p


def test_run_writes_every_output(finished_run):
    out, p = finished_run
    for rel in ["run.json", "train/pipeline/model_index.json", "train/pipeline/unet/config.json",
                "train/pipeline/scheduler/scheduler_config.json", "train/losses.json", "samples/samples.safetensors",
                "samples/samples.png", "fit/curvature.safetensors", "scores/scores.safetensors", "report/report.md",
                "report/summary.png", "report/queries.png", "report/report.json", "report/query_000.png",
                "report/query_002.png"]:
        assert (out / rel).is_file(), rel
    t, meta = load_tensors(str(out / "scores/scores.safetensors"))
    assert t["scores"].shape == (3, 40) and t["scores"].dtype == torch.float32
    assert torch.isfinite(t["scores"]).all() and t["scores"].abs().sum() > 0
    from kfac_influence.diffusion.data import DataConfig, load_dataset
    assert torch.equal(t["train_ids"], load_dataset(DataConfig(limit=40)).ids)
    assert t["query_ids"].tolist() == [10000, 10001, 10002] and meta["measurement"] == "loss"
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["train"]["steps"] == 6 and run["settings"]["model"]["spec"].endswith("tiny.json")
    assert set(run["stages"]) == {"train", "sample", "fit", "score", "report"}
    assert all(s["status"] == "done" for s in run["stages"].values())
    assert run["versions"]["torch"] == torch.__version__ and "train" in run["seeds"]
    rep = json.loads((out / "report/report.json").read_text())
    assert 0 <= rep["class_match"]["top_positive_same_class"] <= 1 and 0 < rep["class_match"]["chance"] < 1
    md = (out / "report/report.md").read_text()
    for link in ("summary.png", "query_000.png", "../scores/scores.safetensors", "../run.json"):
        assert f"({link})" in md
    assert "report:" in p.stdout and "chance" in p.stdout


def test_second_run_skips_and_changed_setting_reruns_downstream(finished_run):
    out, _ = finished_run
    p = cli("run", "--out", out, "--no-progress")  # settings come from run.json
    assert p.stderr.count("up to date") == 5, p.stderr
    p = cli("report", "--out", out, "--top-k", "3", "--no-progress")
    assert "[report] running" in p.stderr
    assert json.loads((out / "report/report.json").read_text())["top_k"] == 3
    p = cli("run", "--out", out, "--no-progress")
    assert p.stderr.count("up to date") == 5, p.stderr


def test_interrupted_training_resumes_to_same_weights(tmp_path, tiny_json, monkeypatch, capsys, one_thread):
    """Ctrl-C after step 5 (last checkpoint: step 4) ends the command with status 130; the same command resumes
    and gives the weights of an uninterrupted run (one thread here, as in the subprocesses: same arithmetic)."""
    args = ["--model", tiny_json, *TRAIN_FAST]
    update = training.EMA.update

    def interrupt_after_step_5(self, model, step):
        update(self, model, step)
        if step + 1 == 5:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(training.EMA, "update", interrupt_after_step_5)
        assert app_cli.main(["train", "--out", str(tmp_path / "a"), *args]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (tmp_path / "a/train/checkpoints/checkpoint.safetensors").is_file()
    assert not (tmp_path / "a/train/pipeline").exists()
    cli("train", "--out", tmp_path / "a", *args)
    losses = json.loads((tmp_path / "a/train/losses.json").read_text())
    assert losses["resumed_from"] == 4 and len(losses["losses"]) == 2
    cli("train", "--out", tmp_path / "b", *args)
    wa, _ = load_tensors_unet(tmp_path / "a")
    wb, _ = load_tensors_unet(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_damping_sweep_reuses_one_fit(tmp_path, finished_run):
    """Damping is a score setting: three `score --damping` runs on a finished run leave the fit alone and give
    three different score matrices; `run` then finds every stage up to date."""
    out = tmp_path / "sweep"
    shutil.copytree(finished_run[0], out)
    fit_state = (out / "fit/stage.json").read_text()
    fit_mtime = (out / "fit/curvature.safetensors").stat().st_mtime_ns
    scores = []
    for damping, mode in (("1e-3", "absolute"), ("10", "absolute"), ("0.1", "relative")):
        p = cli("score", "--out", out, "--damping", damping, "--damping-mode", mode, "--no-progress")
        assert "[score] running" in p.stderr and "[fit]" not in p.stderr, p.stderr
        t, meta = load_tensors(str(out / "scores/scores.safetensors"))
        assert meta["settings"]["damping"] == float(damping) and meta["settings"]["damping_mode"] == mode
        scores.append(t["scores"])
    assert (out / "fit/stage.json").read_text() == fit_state
    assert (out / "fit/curvature.safetensors").stat().st_mtime_ns == fit_mtime
    assert not torch.allclose(scores[0], scores[1]) and not torch.allclose(scores[1], scores[2])
    p = cli("run", "--out", out, "--no-progress")
    assert "[fit] up to date" in p.stderr and "[score] up to date" in p.stderr and "[report] running" in p.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["score"]["damping"] == 0.1 and "damping" not in run["settings"]["fit"]
    assert "0.1 relative" in (out / "report/report.md").read_text()


def test_settings_of_earlier_versions(tmp_path, capsys):
    """A run.json with the earlier flat fit section (damping in fit, batch_size for draws per forward) is read
    into the nested form; one that cannot be is refused with one line; so is a tensor file of the earlier
    layout (metadata key "json")."""
    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "settings": {
        "fit": {"method": "kfac", "approx": "reduce", "fisher": "empirical", "num_draws": 3, "damping": 0.01,
                "damping_mode": "relative", "batch_size": 48, "seed": 5},
        "score": {"measurement": "loss", "num_train_draws": 2, "batch_size": 24}}}))
    args = app_cli.build_parser().parse_args(["score", "--out", str(tmp_path), "--fit-seed", "6"])
    config = app_cli._resolve(args)
    c = config.fit.curvature
    assert (c.method, c.approx, c.fisher, c.num_draws, c.seed) == ("kfac", "reduce", "empirical", 3, 6)
    assert config.fit.draws_per_forward == 48 and config.score.draws_per_forward == 24
    assert (config.score.damping, config.score.damping_mode) == (0.01, "relative")

    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "settings": {"fit": {"curvature": 3}}}))
    assert app_cli.main(["score", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json" in err[0] and "fit.curvature" in err[0], err

    from safetensors.torch import save_file
    save_file({"images": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"json": "{}"})
    with pytest.raises(ValueError, match="earlier version"):
        load_tensors(tmp_path / "old.safetensors")


def test_renamed_flags_keep_their_old_names():
    """--fit-batch-size / --score-batch-size are hidden aliases of the draws-per-forward flags; damping flags
    belong to the score options and are accepted by fit, score, run and demo."""
    parser = app_cli.build_parser()
    args = parser.parse_args(["fit", "--out", "x", "--fit-batch-size", "7", "--score-batch-size", "9",
                              "--damping", "0.5"])
    assert vars(args)["fit.draws_per_forward"] == 7 and vars(args)["score.draws_per_forward"] == 9
    assert vars(args)["score.damping"] == 0.5
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    text = subs["run"].format_help()
    assert "--fit-draws-per-forward" in text and "--fit-batch-size" not in text
    score_group = text[text.index("score options"):text.index("report options")]
    assert "--damping " in score_group and "--damping-mode" in score_group


def load_tensors_unet(out):
    from safetensors.torch import load_file

    return load_file(str(out / "train/pipeline/unet/diffusion_pytorch_model.safetensors")), None


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("kfac-influence: error:"), p.stderr
    assert p.stderr.strip().splitlines()[-1] == errors[0]  # the last line (after any stage log lines)
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


def test_bad_inputs_exit_with_one_line(tmp_path, tiny_json, finished_run):
    from PIL import Image

    from kfac_influence.diffusion.models import build_model, make_scheduler, save_pipeline

    missing = tmp_path / "no_such_folder"
    _one_line_error(cli("train", "--out", tmp_path / "o1", "--data", missing, check=False), str(missing))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(corrupt / "a.png")
    (corrupt / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _one_line_error(cli("train", "--out", tmp_path / "o2", "--data", corrupt, check=False), "b.png")

    rgb = tmp_path / "rgb_model"
    save_pipeline(build_model(tiny_json, in_channels=3), make_scheduler(), str(rgb))
    _one_line_error(cli("train", "--out", tmp_path / "o3", "--model", rgb, "--limit", "8", check=False),
                    "channel")

    # factors fitted on another model: a run whose model differs (another init seed, no training)
    out, _ = finished_run
    other = tmp_path / "other"
    p = cli("run", "--out", other, "--model", tiny_json, *FAST, "--model-seed", "1", "--steps", "0",
            "--curvature", out / "fit/curvature.safetensors", check=False)
    _one_line_error(p, "curvature.safetensors")
    assert (other / "samples/samples.safetensors").is_file()

    _one_line_error(cli("sample", "--out", tmp_path / "o4", check=False), "train")  # stage order


def test_help_lists_defaults():
    parser = app_cli.build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for cmd in ("train", "sample", "fit", "score", "report", "run", "demo"):
        text = subs[cmd].format_help()
        assert "(default:" in text and "--out" in text, cmd
    assert "(default: digits-tiny)" in " ".join(subs["demo"].format_help().split())  # however argparse wraps it
    p = cli("demo", "--help")  # and through the console entry point
    assert "optimiser steps (0: use the model as it is) (default: 1200)" in " ".join(p.stdout.split())


def test_class_match_statistic():
    from kfac_influence.report.classes import class_match

    scores = torch.tensor([[5.0, 4.0, -3.0, 0.0], [1.0, -2.0, 3.0, 2.0]])
    labels = torch.tensor([0, 1, 0, 1])
    cm = class_match(scores, labels, torch.tensor([0, 1]), k=2)
    # query 0 (class 0): top-2 positive ids 0, 1 -> labels 0, 1 -> 0.5; query 1 (class 1): ids 2, 3 -> 0, 1 -> 0.5
    assert cm.positive == 0.5 and cm.chance == 0.5 and cm.k == 2
    # bottom-2: query 0 -> ids 2, 3 -> labels 0, 1 -> 0.5; query 1 -> ids 1, 0 -> labels 1, 0 -> 0.5
    assert cm.negative == 0.5 and cm.per_query.tolist() == [0.5, 0.5]


def test_max_memory_picks_draws_per_forward_or_fails_clearly(tmp_path, tiny_json):
    out = tmp_path / "mm"
    p = cli("run", "--out", out, "--model", tiny_json, *FAST, "--max-memory", "1KiB", check=False)
    _one_line_error(p, "--max-memory 1KiB")
    assert (out / "samples/samples.safetensors").is_file() and not (out / "fit/curvature.safetensors").exists()
    cli("run", "--out", out, "--model", tiny_json, *FAST, "--max-memory", "512MiB")
    assert (out / "scores/scores.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["settings"]["max_memory"] == "512MiB"


def test_run_config_round_trips_through_json_and_fingerprints_follow_the_stages():
    """run.json's settings (FitConfig embedding a CurvatureConfig) read back to the same RunConfig; damping
    changes the score fingerprint only (and the report's, which reads the scores), the curvature config the fit's."""
    from kfac_influence import CurvatureConfig
    from kfac_influence.app import FitConfig, RunConfig, ScoreConfig
    from kfac_influence.app.fingerprints import fingerprints

    config = RunConfig(fit=FitConfig(CurvatureConfig(method="kfac", num_draws=3, dtype=torch.float64,
                                                     modules=("down*",), exclude=("*attn*",), seed=4),
                                     draws_per_forward=8),
                       score=ScoreConfig(damping=0.5, damping_mode="relative", draws_per_forward=16))
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.to_dict()["fit"]["curvature"]["dtype"] == "float64"
    base = fingerprints(config)
    damped = fingerprints(config.merged({"score": {"damping": 0.25}}))
    assert [st for st in base if base[st] != damped[st]] == ["score", "report"]
    refit = fingerprints(config.merged({"fit": {"curvature": {"fisher": "empirical"}}}))
    assert [st for st in base if base[st] != refit[st]] == ["fit", "score", "report"]
    with pytest.raises(ValueError, match="damping"):
        ScoreConfig(damping=-1.0)
    with pytest.raises(ValueError, match="draws per forward"):
        FitConfig(draws_per_forward=0)


def test_max_memory_partitions_the_fit_and_scores_queries_in_blocks(tmp_path, tiny_json, monkeypatch):
    """A budget too small for the whole fit state and for every query at once: the fit runs in layer partitions
    (memory.plan_fit), the scores in query blocks (memory.plan_scores), and the scores equal the unbudgeted ones."""
    from kfac_influence.app import RunConfig
    from kfac_influence.app.context import RunContext
    from kfac_influence.memory import plan_fit, plan_scores
    from kfac_influence.storage import load_tensors

    out = tmp_path / "mm"
    cli("run", "--out", out, "--model", tiny_json, *FAST)
    ref = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]
    # the budget from the memory model on this run's model, task and data: the smallest at which one query fits
    config = RunConfig.from_dict(json.loads((out / "run.json").read_text())["settings"])
    ctx = RunContext(str(out), config, False, lambda _: None)
    model, _ = ctx.trained()
    task = ctx.task()
    sample = ctx.train_data()[:2]
    n = len(ctx.data().images)
    budget = next(b for b in (int(1.05 ** k * 2 ** 16) for k in range(400))
                  if _fits(plan_scores, model, task, sample, b, num_queries=3, num_examples=n,
                           config=config.fit.curvature) and _fits(plan_fit, model, task, sample, b,
                                                                  config=config.fit.curvature))
    fit_plan = plan_fit(model, task, sample, budget, config=config.fit.curvature)
    score_plan = plan_scores(model, task, sample, budget, num_queries=3, num_examples=n,
                             config=config.fit.curvature)
    assert len(fit_plan.partitions) > 1 and score_plan.query_batch < 3, (fit_plan, score_plan)
    # max_memory changes no result beyond rounding, so it is in no fingerprint: --force reruns the two stages, here
    # in this process, recording what the stages ask the library for
    import kfac_influence.app.stages as stages
    asked = {}

    def recording(name):
        real = getattr(stages, name)

        def call(*args, **kwargs):
            asked[name] = kwargs
            return real(*args, **kwargs)
        monkeypatch.setattr(stages, name, call)

    recording("fit_curvature")
    recording("pairwise_scores")
    for stage in ("fit", "score"):
        assert app_cli.main([stage, "--out", str(out), "--max-memory", str(budget), "--force", "--no-progress"]) == 0
    assert asked["fit_curvature"]["max_memory"] == str(budget)
    assert asked["pairwise_scores"]["query_batch"] == score_plan.query_batch
    assert asked["pairwise_scores"]["draws_per_forward"] == score_plan.draws_per_forward
    budgeted = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]
    # float32 sums in another order (other chunks, partitions), amplified by the small default damping: ~5e-4 of the
    # largest score here; a lost or misplaced query block would be off by the whole row
    torch.testing.assert_close(budgeted, ref, rtol=0, atol=2e-3 * float(ref.abs().max()))
    assert torch.equal(budgeted.argmax(1), ref.argmax(1)) and torch.equal(budgeted.argmin(1), ref.argmin(1))


def _fits(plan, *args, **kwargs) -> bool:
    try:
        plan(*args, **kwargs)
        return True
    except MemoryError:
        return False
