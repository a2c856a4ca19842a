"""Issue 12: never lose a user's data, never return a stale result. One test (or more) per numbered case of the
issue, the fault-injection and full-disk tests, the pickle traps, the run-folder lock and the README snippet.

Most CLI runs are in-process (``app_cli.main``: no interpreter start-up); subprocesses only where a process must
die (SIGKILL, a lock holder)."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_influence.app import cli as app_cli
from kfac_influence.storage import load_tensors

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TINY = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4, "attention_head_dim": None}
TRAIN_FAST = ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--no-progress", "--threads", "1"]
FAST = TRAIN_FAST + ["--num-queries", "2", "--sample-steps", "3", "--fit-draws", "1", "--train-draws", "1",
                     "--query-draws", "2", "--top-k", "2", "--fit-draws-per-forward", "64",
                     "--score-draws-per-forward", "64"]


class Evil:
    """A pickle whose loading creates ``marker``: if any loader unpickles it, the marker file appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": Evil(marker)}, str(path))


def main(capsys, *args):
    """``kfac-influence ARGS`` in this process: (exit status, stderr lines)."""
    code = app_cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err.strip().splitlines()


def assert_one_line_error(code, lines, *needles):
    assert code == 2, lines
    errors = [ln for ln in lines if ln.startswith("kfac-influence: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in ln for ln in lines)
    assert len(errors[0]) < 600, errors[0]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: size, mtime and content hash."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def write_pngs(folder: Path, n: int, size: int = 8) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits().images[:n]
    for i, d in enumerate(digits):
        img = np.kron((d * 15).astype(np.uint8), np.ones((size // 8 or 1, size // 8 or 1), np.uint8))
        Image.fromarray(img[:size, :size]).save(folder / f"digit_{i:02d}.png")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_json):
    """A finished run on an image folder of 24 digits: (base folder holding data/ and out/)."""
    base = tmp_path_factory.mktemp("finished")
    write_pngs(base / "data", 24)
    code = app_cli.main(["run", "--out", str(base / "out"), "--data", str(base / "data"), "--model", str(tiny_json),
                         *FAST])
    assert code == 0
    return base


@pytest.fixture
def run_copy(tmp_path, finished):
    """A private copy of the finished run (its data folder copied too; run.json points at the copy's data)."""
    shutil.copytree(finished, tmp_path / "c", symlinks=True)
    base = tmp_path / "c"
    run = json.loads((base / "out/run.json").read_text())
    run["settings"]["data"]["source"] = str(base / "data")
    (base / "out/run.json").write_text(json.dumps(run))
    return base


# -- case 1: stage folders belong to the pipeline --------------------------------------------------------------------
def test_case1_stage_never_deletes_foreign_files(tmp_path, tiny_json, capsys, one_thread):
    """`cd proj && kfac-influence train --out . --data train` used to delete proj/train/*.png."""
    proj = tmp_path / "proj"
    write_pngs(proj / "train", 8)
    before = snapshot(proj)
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        code, lines = main(capsys, "train", "--out", ".", "--data", "train", "--model", tiny_json, *TRAIN_FAST)
    finally:
        os.chdir(cwd)
    assert_one_line_error(code, lines, "train", "digit_00.png", "did not write")
    assert snapshot(proj) == before  # nothing deleted, nothing written (no run.json, no lock)


def test_out_inside_the_data_folder_is_refused(tmp_path, capsys):
    write_pngs(tmp_path / "imgs", 4)
    code, lines = main(capsys, "run", "--out", tmp_path / "imgs/run", "--data", tmp_path / "imgs")
    assert_one_line_error(code, lines, "inside the training data folder")
    assert not (tmp_path / "imgs/run").exists()


def test_case1_foreign_file_in_report_survives(run_copy, capsys, one_thread):
    out = run_copy / "out"
    notes = out / "report" / "notes.txt"
    notes.write_text("my notes")
    code, lines = main(capsys, "report", "--out", out, "--top-k", "1", "--no-progress")
    assert_one_line_error(code, lines, "notes.txt", "move it out")
    assert notes.read_text() == "my notes"
    shutil.move(str(notes), str(run_copy / "notes.txt"))
    code, lines = main(capsys, "report", "--out", out, "--top-k", "1", "--no-progress")
    assert code == 0, lines
    stage = json.loads((out / "report/stage.json").read_text())
    assert set(stage["manifest"]) == {p.name for p in (out / "report").iterdir()} - {"stage.json"}


# -- case 2: invalid settings change nothing; a failed stage keeps the previous outputs ------------------------------
@pytest.mark.parametrize("flag", [["--damping=-1"], ["--fit-draws", "0"], ["--fit-draws-per-forward", "0"],
                                  ["--checkpoint-seconds", "0"]])
def test_case2_invalid_value_changes_no_file(run_copy, capsys, flag):
    out = run_copy / "out"
    before = snapshot(out)
    code, lines = main(capsys, "fit", "--out", out, *flag, "--no-progress")
    assert_one_line_error(code, lines)
    assert snapshot(out) == before


@pytest.mark.parametrize("flag", [["--sample-steps", "0"], ["--image-size", "0"], ["--limit", "0"]])
def test_zero_is_refused_not_unset(tmp_path, capsys, flag):
    code, lines = main(capsys, "run", "--out", tmp_path / "o", *flag)
    assert_one_line_error(code, lines)
    assert not (tmp_path / "o").exists()
    args = app_cli.build_parser().parse_args(["run", "--out", "x", flag[0], "none"])
    assert app_cli._resolve(args) is not None  # 'none' is the explicit "unset"


# -- case 3: changed inputs are noticed; file names travel with the scores -------------------------------------------
def test_case3_deleted_images_rerun_the_stages_and_say_why(run_copy, capsys, one_thread):
    out = run_copy / "out"
    t, meta = load_tensors(out / "scores/scores.safetensors")
    assert meta["train_names"] == [f"digit_{i:02d}.png" for i in range(24)]
    assert meta["query_names"] == ["query_000 (seed 10000)", "query_001 (seed 10001)"]
    for i in (0, 5, 6, 23):
        (run_copy / "data" / f"digit_{i:02d}.png").unlink()
    code, lines = main(capsys, "run", "--out", out, "--no-progress", "--threads", "1")
    assert code == 0, lines
    text = "\n".join(lines)
    for stage in ("train", "fit", "score", "report"):
        assert re.search(rf"\[{stage}\] running .*training data changed|\[{stage}\] running .*trained model "
                         rf"changed", text), (stage, text)
    t, meta = load_tensors(out / "scores/scores.safetensors")
    assert t["scores"].shape == (2, 20)
    assert meta["train_names"] == [f"digit_{i:02d}.png" for i in range(24) if i not in (0, 5, 6, 23)]
    rep = json.loads((out / "report/report.json").read_text())
    assert rep["num_train"] == 20
    names = {e[1] for lst in rep["top_positive"].values() for e in lst} | \
        {e[1] for lst in rep["top_negative"].values() for e in lst}
    assert names and all(n.startswith("digit_") and n.endswith(".png") for n in names)
    code, lines = main(capsys, "run", "--out", out, "--no-progress")
    assert code == 0 and sum("up to date" in ln for ln in lines) == 5, lines


def test_case3_dataset_fingerprint_is_content_and_names():
    from kfac_influence.diffusion.data import DataConfig, load_dataset
    from kfac_influence.identity import data_fingerprint

    a = load_dataset(DataConfig(limit=10))
    b = load_dataset(DataConfig(limit=10))
    assert a.fingerprint() == b.fingerprint() == data_fingerprint(a)
    assert load_dataset(DataConfig(limit=9)).fingerprint() != a.fingerprint()
    assert load_dataset(DataConfig(limit=10, seed=1)).fingerprint() != a.fingerprint()
    assert a.names()[0].startswith("digits#")


def test_case3_modified_output_reruns(run_copy, capsys, one_thread):
    """An output changed behind the pipeline's back (here the samples) is not trusted: sample reruns (same
    seeds: same queries), and the stages after it are checked against what it produced."""
    out = run_copy / "out"
    p = out / "samples/samples.png"
    p.write_bytes(p.read_bytes() + b"\0")
    code, lines = main(capsys, "run", "--out", out, "--no-progress", "--threads", "1")
    assert code == 0, lines
    assert any("[sample] running" in ln and "modified" in ln for ln in lines), lines
    assert any("[score] up to date" in ln for ln in lines), lines  # same queries: nothing stale, nothing redone


# -- case 5: no pickle is ever loaded --------------------------------------------------------------------------------
def test_case5_no_unsafe_loader_in_the_sources():
    bad = re.compile(r"weights_only\s*=\s*False|pickle\.load|allow_pickle\s*=\s*True")
    hits = [f"{p}:{i}" for base in ("python", "kfac_kernels") for p in (ROOT / base).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_case5_planted_pickles_never_run(tmp_path, tiny_json, capsys, one_thread):
    from kfac_influence import load_curvature
    from kfac_influence.diffusion import TrainConfig, build_model, load_model, make_scheduler, train
    from kfac_influence.diffusion.models import ModelError, save_pipeline

    marker = tmp_path / "PWNED"
    # 1. the training checkpoint (new name and the old checkpoint.pt)
    ck = tmp_path / "ck"
    plant_pickle(ck / "checkpoint.safetensors", marker)
    plant_pickle(ck / "checkpoint.pt", marker)
    model = build_model(str(tiny_json))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        train(model, make_scheduler(), torch.zeros(4, 1, 8, 8), TrainConfig(steps=1, batch_size=2),
              checkpoint_dir=str(ck), progress=False)
    # 2. the curvature, samples and scores files the pipeline reads
    for name in ("curvature.safetensors", "samples.safetensors", "scores.safetensors"):
        plant_pickle(tmp_path / name, marker)
        with pytest.raises(ValueError):
            load_tensors(tmp_path / name)
    with pytest.raises(ValueError):
        load_curvature(tmp_path / "curvature.safetensors")
    # 3. a --model folder whose weights are a pickle (.bin: diffusers' torch.load(weights_only=True))
    folder = tmp_path / "model"
    save_pipeline(model, make_scheduler(), str(folder))
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    plant_pickle(folder / "unet/diffusion_pytorch_model.bin", marker)
    with pytest.raises(ModelError):
        load_model(str(folder))
    # 4. `lds --scores evil.pt` (and --queries): one line, nothing run
    plant_pickle(tmp_path / "evil.pt", marker)
    code, lines = main(capsys, "lds", "--out", tmp_path / "lds", "--scores", tmp_path / "evil.pt", "--queries",
                       tmp_path / "evil.pt", "--limit", "8", "--no-progress")
    assert_one_line_error(code, lines, "evil.pt", "not a readable tensor file")
    assert not marker.exists()


# -- case 6: non-finite weights and samples --------------------------------------------------------------------------
def test_case6_nan_weight_fails_at_load_naming_it(tmp_path, tiny_json, capsys, one_thread):
    from kfac_influence.diffusion.models import build_model, make_scheduler, save_pipeline

    model = build_model(str(tiny_json))
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
    save_pipeline(model, make_scheduler(), str(tmp_path / "nan_model"))
    out = tmp_path / "o"
    write_pngs(tmp_path / "d", 8)
    code, lines = main(capsys, "run", "--out", out, "--data", tmp_path / "d", "--model", tmp_path / "nan_model",
                       *FAST, "--steps", "0")
    assert_one_line_error(code, lines, "conv_in.weight", "NaN")
    assert not (out / "samples").exists() and not (out / "train/pipeline").exists()


def test_case6_diverged_sampling_is_refused():
    from kfac_influence.diffusion import ddpm_sample

    from helpers import scheduler

    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return x * self.w * float("nan")

    with pytest.raises(FloatingPointError, match=r"sample 0 \(seed 3\)"):
        ddpm_sample(Diverged(), scheduler(10), 2, (1, 4, 4), seed=3, progress=False)


# -- case 7: one line for every error a user can cause ---------------------------------------------------------------
def test_case7_diverging_training(tmp_path, tiny_json, capsys, one_thread):
    write_pngs(tmp_path / "d", 8)
    code, lines = main(capsys, "train", "--out", tmp_path / "o", "--data", tmp_path / "d", "--model", tiny_json,
                       *TRAIN_FAST, "--lr", "1e8", "--grad-clip", "0", "--warmup-steps", "0", "--steps", "30")
    assert_one_line_error(code, lines, "numerical failure", "learning rate")


def test_case7_image_sizes_the_unet_cannot_take(tmp_path, tiny_json, capsys):
    write_pngs(tmp_path / "d15", 4, size=15)
    from PIL import Image
    for p in (tmp_path / "d15").glob("*.png"):
        Image.open(p).resize((15, 15)).save(p)
    for args in (["--data", tmp_path / "d15"], ["--image-size", "7"]):
        code, lines = main(capsys, "run", "--out", tmp_path / "o", "--model", tiny_json, *args, *FAST)
        assert_one_line_error(code, lines, "multiples of 2")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_case7_cuda_on_a_cpu_only_torch(tmp_path, capsys):
    code, lines = main(capsys, "run", "--out", tmp_path / "o", "--device", "cuda")
    assert_one_line_error(code, lines, "--device cuda", "torch.cuda.is_available()")
    assert not (tmp_path / "o").exists()


def test_case7_truncated_and_corrupt_files(run_copy, capsys, one_thread):
    out = run_copy / "out"
    # a corrupt curvature header (about 10 KB of JSON): one short line, not the header
    data = (out / "fit/curvature.safetensors").read_bytes()
    i = data.index(b"specs")
    (run_copy / "corrupt.safetensors").write_bytes(data[:i] + b'"' + data[i + 1:])
    code, lines = main(capsys, "score", "--out", out, "--curvature", run_copy / "corrupt.safetensors",
                       "--no-progress")
    assert_one_line_error(code, lines, "corrupt.safetensors")
    # truncated outputs: the stage that wrote them is no longer done (the later stages say so)
    scores = out / "scores/scores.safetensors"
    scores.write_bytes(scores.read_bytes()[:100])
    code, lines = main(capsys, "report", "--out", out, "--force", "--no-progress")
    assert_one_line_error(code, lines, "stage 'score' is not done", "modified")
    # corrupted in place with size and mtime kept: the reader refuses it in one line
    samples = out / "samples/samples.safetensors"
    st = samples.stat()
    raw = bytearray(samples.read_bytes())
    raw[8:40] = b"!" * 32
    samples.write_bytes(bytes(raw))
    os.utime(samples, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, lines = main(capsys, "score", "--out", out, "--force", "--no-progress")
    assert_one_line_error(code, lines, "samples.safetensors", "--force")


def test_case7_error_lines():
    from kfac_influence.app.cli import error_line

    assert error_line(OSError(errno.ENOSPC, "No space left on device")).startswith("disk full")
    assert error_line(AssertionError("Torch not compiled with CUDA enabled")).startswith("internal error")
    long = error_line(ValueError("x" * 20_000))
    assert len(long) < 500 and "\n" not in long


# -- case 8: --force clears the stage's checkpoints --------------------------------------------------------------
def test_case8_force_clears_a_corrupt_checkpoint(run_copy, capsys, one_thread):
    out = run_copy / "out"
    ck = out / "fit/checkpoints/fit_state.safetensors"
    ck.parent.mkdir()
    ck.write_bytes(b"garbage")
    rec = json.loads((out / "fit/stage.json").read_text())
    code, lines = main(capsys, "fit", "--out", out, "--fit-draws", "2", "--no-progress")  # clears: other settings
    assert code == 0 and any("cleared its checkpoints (made for other settings" in ln for ln in lines), lines
    ck.parent.mkdir()
    ck.write_bytes(b"garbage")  # a corrupt checkpoint of the very attempt being resumed
    import hashlib
    done2 = json.loads((out / "fit/stage.json").read_text())  # pretend the --fit-draws 2 attempt was interrupted
    pending = hashlib.sha256(json.dumps([done2["fingerprint"], done2["inputs"]], sort_keys=True).encode())
    (out / "fit/stage.json").write_text(json.dumps({**rec, "pending": pending.hexdigest()[:16]}))
    code, lines = main(capsys, "fit", "--out", out, "--fit-draws", "2", "--no-progress")
    assert_one_line_error(code, lines, "fit_state.safetensors", "--force")
    code, lines = main(capsys, "fit", "--out", out, "--fit-draws", "2", "--force", "--no-progress")
    assert code == 0, lines
    assert any("cleared its checkpoints (--force)" in ln for ln in lines)
    assert not ck.parent.exists()


# -- case 9: the negative column holds only negative scores ----------------------------------------------------------
def test_case9_report_columns_keep_their_sign(tmp_path):
    from kfac_influence.app import RunConfig
    from kfac_influence.diffusion.data import ImageDataset
    from kfac_influence.report.figures import signed_top
    from kfac_influence.report.writer import write_report

    S = torch.tensor([[3.0, 2.0, 1.0, -0.5, 0.5, 4.0], [-1.0, -2.0, -3.0, -4.0, -5.0, 1.0]])
    assert signed_top(S[0], 3) == ([5, 0, 1], [3])
    assert signed_top(S[1], 3) == ([5], [4, 3, 2])
    data = ImageDataset(images=torch.zeros(6, 1, 8, 8), ids=torch.arange(6) + 100,
                        paths=tuple(f"img{i}.png" for i in range(6)))
    summary = write_report(str(tmp_path), {"scores": S, "train_ids": data.ids, "query_ids": torch.tensor([7, 8]),
                                           "meta": {}},
                           {"images": torch.zeros(2, 1, 8, 8), "seeds": torch.tensor([7, 8])}, data,
                           RunConfig().merged({"report": {"top_k": 3}}), str(tmp_path))
    assert summary["top_negative"][7] == [[103, "img3.png", -0.5]]
    assert [e[2] for e in summary["top_positive"][8]] == [1.0]
    assert all(e[2] < 0 for lst in summary["top_negative"].values() for e in lst)
    assert "fewer than" in (tmp_path / "report.md").read_text()


# -- case 10: checkpoint seconds, Ctrl-C saves and exits 130 ---------------------------------------------------------
def test_case10_ctrl_c_during_fit_saves_and_resumes(run_copy, capsys, monkeypatch, one_thread):
    from kfac_influence.tasks import DiffusionTask

    out = run_copy / "out"
    args = app_cli.build_parser().parse_args(["fit", "--out", str(out), "--checkpoint-seconds", "2.5"])
    assert app_cli._resolve(args).checkpoint_seconds == 2.5
    draws = DiffusionTask.draws
    calls = {"n": 0}

    def ctrl_c_at_the_second_group(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return draws(self, *a, **kw)

    before = (out / "fit/curvature.safetensors").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(DiffusionTask, "draws", ctrl_c_at_the_second_group)
        code, lines = main(capsys, "fit", "--out", out, "--force", "--fit-draws-per-forward", "4",
                           "--no-progress")
    assert code == 130 and lines[-1] == "kfac-influence: interrupted; rerun the same command to resume", lines
    assert (out / "fit/checkpoints/fit_state.safetensors").is_file()
    assert (out / "fit/curvature.safetensors").read_bytes() == before  # the previous result is still in place
    assert not (out / ".lock").exists()
    code, lines = main(capsys, "fit", "--out", out, "--fit-draws-per-forward", "4", "--no-progress")
    assert code == 0 and not any("cleared" in ln for ln in lines), lines


# -- fault injection: SIGKILL inside and between checkpoint writes, SIGINT; bit-identical after resuming -------------
@pytest.fixture(scope="module")
def references(one_thread):
    import fault_driver

    return {"fit": fault_driver.fit(), "score": fault_driver.score()}


def _driver(mode, ck, action, k):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, str(HERE / "fault_driver.py"), mode, str(ck), action, str(k)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("mode,action,k", [("fit", "kill-inside", 3), ("fit", "stall", 7), ("fit", "sigint", 4),
                                           ("score", "kill-inside", 2), ("score", "sigint", 3)])
def test_killed_fit_and_score_resume_bit_identically(tmp_path, references, mode, action, k, one_thread):
    import fault_driver

    ck = tmp_path / "ck"
    p = _driver(mode, ck, action, k)
    if action == "stall":
        line = p.stdout.readline()
        assert line.strip() == f"saved {k}", (line, p.stderr.read())
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=120)
    if action == "sigint":
        assert p.returncode != 0 and "KeyboardInterrupt" in p.stderr.read()
    else:
        assert p.returncode == -signal.SIGKILL
    state = ck / ("fit_state.safetensors" if mode == "fit" else "score_state.safetensors")
    assert state.is_file()
    if action == "kill-inside":
        assert list(ck.glob(".*.tmp"))  # the half-written file the kill left
    resumed = getattr(fault_driver, mode)(ck)
    ref = references[mode]
    if mode == "fit":
        for n in ref.module_names:
            for key in ref.factors[n]:
                assert torch.equal(ref.factors[n][key], resumed.factors[n][key]), (n, key)
    else:
        assert torch.equal(ref, resumed)


def test_full_disk_during_fit_and_score_keeps_previous_outputs(run_copy, capsys, monkeypatch, one_thread):
    """ENOSPC in the middle of writing (half the bytes written, then the error): exit 2 with one line, the
    previous curvature / scores and their stage.json byte-identical, and the run still reports."""
    import kfac_influence.storage as storage

    out = run_copy / "out"
    real = storage.write_tensor_bytes
    before_stage = {f: (out / f / "stage.json").read_text() for f in ("fit", "scores")}

    def full_disk(f, tensor):  # the first tensor's bytes half written, then the disk is full
        f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", f.name)

    for stage, args in (("fit", ["--fit-draws", "2"]), ("score", ["--damping", "0.5"])):
        before = snapshot(out)
        with monkeypatch.context() as m:
            m.setattr(storage, "write_tensor_bytes", full_disk)
            code, lines = main(capsys, stage, "--out", out, *args, "--no-progress")
        assert_one_line_error(code, lines, "disk full")
        after = snapshot(out)
        folder = "fit" if stage == "fit" else "scores"
        for rel, sig in before.items():
            if rel != f"{folder}/stage.json":  # it only gained the running attempt's "pending" entry
                assert after.get(rel) == sig, rel
        assert set(after) == set(before)  # no half-written file anywhere
        now = json.loads((out / folder / "stage.json").read_text())
        assert now["done"] and now["fingerprint"] == json.loads(before_stage[folder])["fingerprint"]
    assert storage.write_tensor_bytes is real
    code, lines = main(capsys, "report", "--out", out, "--no-progress")
    assert code == 0 and any("[report] up to date" in ln for ln in lines), lines


# -- the concurrency guard -------------------------------------------------------------------------------------------
def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
    from kfac_influence.app.lock import RunLock

    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kfac_influence.app.lock import RunLock; "
         "l = RunLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = json.loads((out / ".lock").read_text())
        assert owner["pid"] == holder.pid and owner["host"]
        code, lines = main(capsys, "report", "--out", out, "--no-progress")
        assert_one_line_error(code, lines, f"process {holder.pid}", ".lock")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").exists()  # a dead owner's lock stays behind ...
    with RunLock(str(out)) as lock:   # ... and is taken over
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid() and lock.held
    assert not (out / ".lock").exists()


# -- the README's API snippet runs as written ------------------------------------------------------------------------
def test_readme_api_snippet_runs(tmp_path, monkeypatch, one_thread):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    assert env["scores"].shape == (len(env["generated_images"]), len(env["data"]))
    assert torch.isfinite(env["scores"]).all()
    assert time.time() - t0 < 120


def test_lds_refuses_scores_of_other_training_images(run_copy, capsys):
    out = run_copy / "out"
    code, lines = main(capsys, "lds", "--out", run_copy / "lds", "--scores", out / "scores/scores.safetensors",
                       "--queries", out / "samples/samples.safetensors", "--data", "digits", "--limit", "24",
                       "--no-progress")
    assert_one_line_error(code, lines, "other training images")


def test_evaluation_help_is_for_users_and_matches_the_run_layout():
    parser = app_cli.build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for command in ("lds", "retrain-top"):
        text = subs[command].format_help()
        assert "Registered by" not in text and "add_subcommands" not in text
        assert "runs/x/scores/scores.safetensors" in text and "runs/x/samples/samples.safetensors" in text
    out_help = subs["fit"].format_help()
    assert "--checkpoint-seconds" in out_help and "--force" in out_help
    assert "--checkpoint-every" in subs["train"].format_help()


def test_run_folder_of_an_earlier_version_is_taken_over_safely(run_copy, capsys, one_thread):
    """stage.json files without manifests (earlier versions): the files those versions wrote are recognised by
    name, the stages rerun saying why, and an old pickled training checkpoint is removed, never loaded."""
    out = run_copy / "out"
    for folder in ("train", "samples", "fit", "scores", "report"):
        rec = json.loads((out / folder / "stage.json").read_text())
        (out / folder / "stage.json").write_text(json.dumps({k: rec[k] for k in ("fingerprint", "done", "seconds")}))
    marker = run_copy / "PWNED"
    plant_pickle(out / "train/checkpoints/checkpoint.pt", marker)
    code, lines = main(capsys, "run", "--out", out, "--no-progress", "--threads", "1")
    assert code == 0, lines
    assert sum("earlier version" in ln for ln in lines) == 5, lines
    assert not marker.exists() and not (out / "train/checkpoints").exists()
    assert "manifest" in json.loads((out / "report/stage.json").read_text())
