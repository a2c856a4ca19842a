"""``kfac-influence lds`` and ``retrain-top`` on a class-conditional pipeline run (issue 14): every retraining uses the
run's labels and condition dropout, and the ground truth measures each query under the class it was generated for.
The references below pass the labels themselves (``train(..., labels=...)``, ``model(x_t, t, class_labels=...)``),
so a CLI that dropped or mixed up the labels, the null class or the dropout in retraining or measurement fails."""
import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import save_file

from kfac_influence.app import cli as app_cli
from kfac_influence.diffusion.data import DataConfig, load_dataset
from kfac_influence.diffusion.models import build_model, make_scheduler
from kfac_influence.diffusion.training import TrainConfig, train
from kfac_influence.evaluation.lds import make_subsets, LDSConfig
from kfac_influence.storage import load_tensors
from kfac_influence.tasks import DiffusionTask

TINY_COND = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": None,
             "num_class_embeds": 11}
LIMIT, DROPOUT = 24, 0.5
RUN = ["--limit", str(LIMIT), "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--no-progress",
       "--threads", "1", "--num-queries", "3", "--sample-steps", "3", "--fit-draws", "1", "--train-draws", "1",
       "--query-draws", "2", "--top-k", "2", "--fit-draws-per-forward", "64", "--score-draws-per-forward", "64",
       "--condition-dropout", str(DROPOUT)]
# retraining settings of the evaluation commands (tiny): 3 steps of batch 8, ground truth on 6 draws per query; the
# condition dropout is not given: it is the run's (0.5, from run.json), which the reference retraining passes itself
EVAL = ["--data", "digits", "--limit", str(LIMIT), "--steps", "3", "--batch-size", "8", "--gt-draws", "6",
        "--gt-seed", "5", "--no-progress"]


def cli(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = app_cli.main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A finished class-conditional pipeline run (condition dropout 0.5): (folder, model json)."""
    base = tmp_path_factory.mktemp("lds_cond")
    (base / "cond.json").write_text(json.dumps(TINY_COND))
    code, _ = cli("run", "--out", base / "out", "--model", base / "cond.json", *RUN)
    assert code == 0
    return base, base / "cond.json"


def reference_model(model_json, kept, seed):
    """The retraining a class-conditional run needs, with the labels passed here: ``kept (n,)`` examples, their
    digits as labels, null class 10, condition dropout 0.5 (the run's)."""
    data = load_dataset(DataConfig(limit=LIMIT))
    cfg = TrainConfig(steps=3, batch_size=8, lr=2e-3, ema_decay=0.999, checkpoint_every=0, seed=seed,
                      condition_dropout=DROPOUT)
    return train(build_model(str(model_json), seed=seed), make_scheduler(), data.images[kept], cfg, progress=False,
                 labels=data.labels[kept], null_label=10).model


def reference_measurement(model, queries, labels):
    """``(Q,)``: mean over 6 draws of ``mean((eps - model(x_t, t, class_labels=label)) ** 2)``, with the (t, eps) of
    an UNconditional task (conditions change no draw) and each query's label passed here."""
    plain = DiffusionTask(make_scheduler(), num_query_draws=6, seed=5)
    out = []
    with torch.no_grad():
        for q in range(len(queries)):
            rows = plain.draws(queries[q:q + 1], torch.tensor([q]), "query", num_draws=6, seed=5)
            y = torch.full((len(rows),), int(labels[q]), dtype=torch.long)
            pred = model(rows.data["x_t"], rows.data["t"], class_labels=y).sample
            out.append(float((pred.double() - rows.data["target"].double()).pow(2).mean()))
    return torch.tensor(out, dtype=torch.float64)


def assert_same_weights(model, path):
    saved = load_tensors(str(path))[0]
    state = model.state_dict()
    assert set(saved) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(saved[k], v.detach(), rtol=0, atol=0, msg=k)


def test_lds_retrains_with_labels_and_measures_each_query_under_its_class(run, one_thread):
    base, model_json = run
    out = base / "out"
    samples = load_tensors(str(out / "samples/samples.safetensors"))[0]
    assert samples["labels"].tolist() == [0, 1, 2]
    code, text = cli("lds", "--out", base / "lds", "--scores", out / "scores/scores.safetensors", "--queries",
                     out / "samples/samples.safetensors", "--model", model_json, "--subsets", "2", "--seeds", "1",
                     *EVAL)
    assert code == 0 and "LDS (loss)" in text
    res = json.loads((base / "lds/lds.json").read_text())
    assert res["num_queries"] + sum(v != v for v in res["per_query"]) == 3
    keep = make_subsets(LIMIT, LDSConfig(num_subsets=2, num_seeds=1))
    models = base / "lds/lds/models"
    for j in range(2):
        kept = torch.nonzero(keep[j]).flatten()
        ref = reference_model(model_json, kept, seed=0)
        assert_same_weights(ref, models / f"s{j:04d}_k0.safetensors")  # labels and dropout 0.5 of the run
        [folder] = (base / "lds/lds/measurements").iterdir()
        assert folder.name.startswith("loss_d6_s5_q")  # keyed by the queries and their labels
        saved = load_tensors(str(folder / f"s{j:04d}_k0.safetensors"))[0][folder.name]
        truth = reference_measurement(ref, samples["images"], samples["labels"])
        torch.testing.assert_close(saved, truth, rtol=1e-5, atol=1e-7)
        other = reference_measurement(ref, samples["images"], (samples["labels"] + 4) % 10)
        assert not torch.allclose(other, truth, rtol=1e-3, atol=1e-6)  # the query's class matters
        if j == 0:
            first = ref
    # the dropout is part of what the cached models pin: without it the first retraining differs
    cfg = TrainConfig(steps=3, batch_size=8, lr=2e-3, ema_decay=0.999, checkpoint_every=0, condition_dropout=0.0)
    data = load_dataset(DataConfig(limit=LIMIT))
    kept = torch.nonzero(keep[0]).flatten()
    no_drop = train(build_model(str(model_json), seed=0), make_scheduler(), data.images[kept], cfg, progress=False,
                    labels=data.labels[kept], null_label=10).model
    assert any(not torch.equal(a, b) for a, b in zip(no_drop.state_dict().values(), first.state_dict().values()))


def test_retrain_top_on_a_conditional_run(run, one_thread):
    base, model_json = run
    out = base / "out"
    samples = load_tensors(str(out / "samples/samples.safetensors"))[0]
    scores = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]
    code, text = cli("retrain-top", "--out", base / "top", "--scores", out / "scores/scores.safetensors",
                     "--queries", out / "samples/samples.safetensors", "--model", model_json, "--percents", "10",
                     "--query-index", "1", *EVAL)
    assert code == 0 and "top - random" in text
    removed = torch.sort(scores[1].double(), descending=True, stable=True).indices[:3]  # ceil(10% of 24)
    keep = torch.ones(LIMIT, dtype=torch.bool)
    keep[removed] = False
    ref = reference_model(model_json, torch.nonzero(keep).flatten(), seed=0)
    assert_same_weights(ref, base / "top/models/top_p10_q1_k0.safetensors")
    saved = load_tensors(str(base / "top/measurements/top_p10_q1_k0.safetensors"))[0]["m"]
    torch.testing.assert_close(saved, reference_measurement(ref, samples["images"], samples["labels"]),
                               rtol=1e-5, atol=1e-7)


def test_conditional_evaluation_refusals(run, tmp_path, capsys):
    base, model_json = run
    out = base / "out"
    samples = load_tensors(str(out / "samples/samples.safetensors"))[0]
    no_labels = tmp_path / "queries.safetensors"
    save_file({"images": samples["images"].contiguous()}, str(no_labels))
    bad_labels = tmp_path / "labels.safetensors"
    save_file({"labels": torch.tensor([0, 1, 11])}, str(bad_labels))
    common = ["--scores", out / "scores/scores.safetensors", "--model", model_json, "--subsets", "2", *EVAL]
    cases = [(["--queries", no_labels], 'no "labels" entry'),
             (["--queries", no_labels, "--query-labels", bad_labels], "must lie in [0, 10]"),
             (["--queries", out / "samples/samples.safetensors", "--labels", "false"], "is class-conditional"),
             (["--queries", out / "samples/samples.safetensors", "--condition-dropout", "0.2"],
              f"was trained with {DROPOUT}")]
    for i, (args, needle) in enumerate(cases):
        code = app_cli.main([str(a) for a in ["lds", "--out", tmp_path / f"o{i}", *common, *args]])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and needle in err[-1] and len(err) == 1, err
