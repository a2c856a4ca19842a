"""End-to-end `kfac-influence` through subprocesses: outputs, skipping, resuming a killed training, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kfac_influence.report.files import load_tensors

TINY = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4, "attention_head_dim": None}
TRAIN_FAST = ["--limit", "40", "--steps", "6", "--batch-size", "8", "--checkpoint-every", "2", "--no-progress"]
FAST = TRAIN_FAST + ["--num-queries", "3", "--sample-steps", "4", "--fit-draws", "1", "--train-draws", "1", "--query-draws", "2", "--top-k", "2",
        "--fit-batch-size", "64", "--score-batch-size", "64"]


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


def test_killed_training_resumes_to_same_weights(tmp_path, tiny_json):
    args = ["--model", tiny_json, *TRAIN_FAST]
    killed = cli("train", "--out", tmp_path / "a", *args, env={"KFAC_INFLUENCE_ABORT_AFTER_STEP": "5"}, check=False)
    assert killed.returncode == 75, killed.stderr
    assert (tmp_path / "a/train/checkpoints/checkpoint.pt").is_file()
    assert not (tmp_path / "a/train/pipeline").exists()
    cli("train", "--out", tmp_path / "a", *args)
    losses = json.loads((tmp_path / "a/train/losses.json").read_text())
    assert losses["resumed_from"] == 4 and len(losses["losses"]) == 2
    cli("train", "--out", tmp_path / "b", *args)
    wa, _ = load_tensors_unet(tmp_path / "a")
    wb, _ = load_tensors_unet(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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
    from kfac_influence.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for cmd in ("train", "sample", "fit", "score", "report", "run", "demo"):
        text = subs[cmd].format_help()
        assert "(default:" in text and "--out" in text, cmd
    assert "(default: digits-tiny)" in subs["demo"].format_help()
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


def test_max_memory_picks_batch_sizes_or_fails_clearly(tmp_path, tiny_json):
    out = tmp_path / "mm"
    p = cli("run", "--out", out, "--model", tiny_json, *FAST, "--max-memory", "1KiB", check=False)
    _one_line_error(p, "--max-memory 1KiB")
    assert (out / "samples/samples.safetensors").is_file() and not (out / "fit/curvature.safetensors").exists()
    cli("run", "--out", out, "--model", tiny_json, *FAST, "--max-memory", "512MiB")
    assert (out / "scores/scores.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["settings"]["max_memory"] == "512MiB"
