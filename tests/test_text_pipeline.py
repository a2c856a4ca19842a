"""The text-conditional pipeline (issue 14, item 4, captions): captions from an image folder's metadata.jsonl,
token embeddings from a precomputed file or a local CLIP text encoder (a tiny one built here: no download),
training with condition dropout to the empty prompt, queries generated per prompt with classifier-free guidance,
each attributed under its prompt, the report showing the prompts, and the embeddings' identity recorded by every
stage that reads them. A tiny UNet2DConditionModel on 24 digits keeps each run to seconds."""
import contextlib
import io
import json
import tempfile
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kfac_influence.app import cli as app_cli
from kfac_influence.app.fingerprints import fingerprints
from kfac_influence.app.runner import Pipeline
from kfac_influence.app.settings import RunConfig, text_conditional, upgrade_settings
from kfac_influence.curvature import load_curvature
from kfac_influence.diffusion.models import build_model, make_scheduler, save_pipeline
from kfac_influence.diffusion.text import (ClipTextEncoder, EmbeddingsFile, TextConfig, TextError, query_prompts,
                                           read_captions)
from kfac_influence.diffusion.training import TrainConfig, train
from kfac_influence.scoring import pairwise_scores
from kfac_influence.storage import load_tensors

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WIDTH, TOKENS = 16, 5
TINY_TEXT = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
             "block_out_channels": [8, 8], "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 4,
             "cross_attention_dim": WIDTH}
FAST = ["--steps", "6", "--batch-size", "8", "--checkpoint-every", "3", "--no-progress", "--threads", "1",
        "--num-queries", "4", "--sample-steps", "4", "--fit-draws", "1", "--train-draws", "1", "--query-draws", "2",
        "--top-k", "3", "--fit-draws-per-forward", "64", "--score-draws-per-forward", "64"]


def main(capsys, *args):
    code = app_cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


def quiet_main(*args):
    """``main`` from a module-scoped fixture (capsys is function-scoped): (exit status, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = app_cli.main([str(a) for a in args])
    return code, buf.getvalue()


def write_folder(root, n=24):
    """n digits as 8x8 PNGs with captions "a digit <name>" in metadata.jsonl; returns the captions."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root.mkdir(parents=True)
    d = load_digits()
    captions, lines = [], []
    for i in range(n):
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").save(root / f"img_{i:03d}.png")
        captions.append(f"a digit {NAMES[d.target[i]]}")
        lines.append(json.dumps({"file_name": f"img_{i:03d}.png", "text": captions[-1]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return captions


def write_embeddings(path, texts, seed=0, mask=False, file_names=None, width=WIDTH, extra=None):
    """An embeddings file: random (R, TOKENS, width) rows for ``texts``, equal for equal texts (as an encoder's
    are), and optionally a mask hiding the last two tokens."""
    g = torch.Generator().manual_seed(seed)
    distinct = list(dict.fromkeys(texts))
    rows = torch.randn(len(distinct), TOKENS, width, generator=g)
    tensors = {"embeddings": rows[torch.tensor([distinct.index(t) for t in texts])]}
    if mask:
        tensors["mask"] = torch.ones(len(texts), TOKENS, dtype=torch.bool)
        tensors["mask"][:, -2:] = False
    tensors.update(extra or {})
    meta = {"texts": json.dumps(texts)}
    if file_names is not None:
        meta["file_names"] = json.dumps(file_names)
    save_file(tensors, str(path), metadata=meta)
    return tensors


def clip_folder(root, hidden=WIDTH, seed=0):
    """A tiny CLIPTextModel + CLIPTokenizer saved as text_encoder/ and tokenizer/ (byte-level vocabulary, no
    merges): built from a CLIPTextConfig, nothing downloaded."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                        model_max_length=TOKENS + 3)
    tok.save_pretrained(str(root / "tokenizer"))
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    CLIPTextModel(cfg).save_pretrained(str(root / "text_encoder"))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A captioned folder, the tiny model config, and an embeddings file (the distinct captions and "")."""
    base = tmp_path_factory.mktemp("text")
    captions = write_folder(base / "imgs")
    (base / "text.json").write_text(json.dumps(TINY_TEXT))
    texts = list(dict.fromkeys(captions)) + [""]
    write_embeddings(base / "emb.safetensors", texts)
    return {"base": base, "data": base / "imgs", "model": base / "text.json", "emb": base / "emb.safetensors",
            "captions": captions, "texts": texts}


@pytest.fixture(scope="module")
def emb_run(inputs, one_thread):
    """A finished text-conditional run on precomputed embeddings (auto-detected from the model, guided)."""
    out = inputs["base"] / "out"
    code, stdout = quiet_main("run", "--out", out, "--data", inputs["data"], "--model", inputs["model"],
                              "--embeddings", inputs["emb"], *FAST, "--guidance-scale", "2",
                              "--condition-dropout", "0.2")
    assert code == 0
    return out


def test_captions_flow_into_samples_scores_and_report(inputs, emb_run):
    out = emb_run
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["text"]["embeddings"] == str(inputs["emb"]) and run["settings"]["text"]["prompts"] == []
    samples, header = load_tensors(str(out / "samples/samples.safetensors"))
    distinct = list(dict.fromkeys(inputs["captions"]))
    assert header["prompts"] == distinct[:4]  # default: the distinct training captions in file-name order
    t, meta = load_tensors(str(out / "scores/scores.safetensors"))
    assert t["scores"].shape == (4, 24) and torch.isfinite(t["scores"]).all()
    assert meta["query_names"][1] == f'query_001 (seed 10001, prompt "{distinct[1]}")'
    rep = json.loads((out / "report/report.json").read_text())
    assert rep["query_conditions"]["10002"] == {"prompt": distinct[2]} and rep["guidance_scale"] == 2
    shown = {e[0] for q in rep["top_positive"].values() for e in q}
    assert shown and all(rep["train_captions"][str(i)] == inputs["captions"][i] for i in shown)
    md = (out / "report/report.md").read_text()
    assert "Text-conditional model" in md and f'[query 3 "{distinct[3]}"](query_003.png)' in md
    for stage, folder in (("train", "train"), ("sample", "samples"), ("fit", "fit"), ("score", "scores")):
        assert "text" in json.loads((out / folder / "stage.json").read_text())["inputs"], stage


def test_the_model_gets_the_files_embeddings_and_the_prompt_matters(inputs, emb_run, one_thread):
    """The embeddings passed to the model are the file's rows (each training image its caption's, each query its
    prompt's); recomputing the scores with them reproduces the score stage's file, and other query embeddings (an
    unconditional-like zero condition, or other prompts) give other scores: a pipeline that dropped the text
    condition would fail each check."""
    out = emb_run
    config = RunConfig.from_dict(upgrade_settings(json.loads((out / "run.json").read_text())["settings"]))
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    f = EmbeddingsFile(str(inputs["emb"]))
    row = {t: f.embeddings[i] for i, t in enumerate(f.texts)}
    images, emb = ctx.train_data()
    assert torch.equal(emb, torch.stack([row[c] for c in inputs["captions"]]))
    model, _ = ctx.trained()
    curvature = load_curvature(str(out / "fit/curvature.safetensors"), model)
    samples = ctx.samples()
    q_emb = torch.stack([row[p] for p in samples["prompts"]])
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach()),
                                           with_kwargs=True)
    try:
        def scores(e):
            return pairwise_scores(model, ctx.task(), curvature, (samples["images"], e), (images, emb),
                                   draws_per_forward=64, damping=config.score.damping, progress=False).float()

        saved = load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]
        assert torch.allclose(scores(q_emb), saved, rtol=1e-4, atol=1e-6 * saved.abs().max())
    finally:
        hook.remove()
    allowed = torch.cat([emb, q_emb]).flatten(1)
    for batch in seen:  # every row the model saw is a caption's or a prompt's row of the file
        assert all(bool((allowed == r).all(1).any()) for r in batch.flatten(1))
    for other in (torch.zeros_like(q_emb), q_emb.roll(1, 0)):
        s = scores(other)
        assert not torch.allclose(s, saved, rtol=1e-2, atol=1e-3 * saved.abs().max())


def test_changed_embeddings_invalidate_the_stages_that_read_them(inputs, emb_run, tmp_path):
    out = emb_run
    settings = upgrade_settings(json.loads((out / "run.json").read_text())["settings"])

    def why(emb):
        config = RunConfig.from_dict(settings).merged({"text": {"embeddings": str(emb)}})
        pipe = Pipeline(str(out), config, progress=False, log=lambda m: None)
        return {st: pipe.why_not_done(st) for st in ("train", "sample", "fit", "score", "report")}

    f = EmbeddingsFile(str(inputs["emb"]))
    # the same rows plus an unused one (another prompt): nothing reruns
    more = tmp_path / "more.safetensors"
    save_file({"embeddings": torch.cat([f.embeddings, torch.ones(1, TOKENS, WIDTH)])}, str(more),
              metadata={"texts": json.dumps(list(f.texts) + ["an unused prompt"])})
    assert set(why(more).values()) == {None}
    # one caption's row changed: every stage reading the training embeddings reruns, the log says why
    changed = tmp_path / "changed.safetensors"
    e = f.embeddings.clone()
    e[f.texts.index(inputs["captions"][5])] += 0.5
    save_file({"embeddings": e}, str(changed), metadata={"texts": json.dumps(list(f.texts))})
    reasons = why(changed)
    for st in ("train", "fit", "score"):
        assert reasons[st] and reasons[st].startswith("the token embeddings"), (st, reasons[st])
    # only the empty prompt's row changed: the stages that use the null condition (train, sample) rerun
    null = tmp_path / "null.safetensors"
    e = f.embeddings.clone()
    e[f.texts.index("")] += 0.5
    save_file({"embeddings": e}, str(null), metadata={"texts": json.dumps(list(f.texts))})
    reasons = why(null)
    assert reasons["train"].startswith("the token embeddings") and reasons["sample"].startswith("the token")
    assert reasons["fit"] is None and reasons["score"] is None and reasons["report"] is None
    # fingerprints: a run without text ignores the text settings; prompts enter the sample stage only
    base = RunConfig()
    assert fingerprints(base) == fingerprints(base.merged({"text": {"prompts": ["x"], "max_length": 3}}))
    cfg = RunConfig.from_dict(settings)
    assert text_conditional(cfg) and not text_conditional(cfg.merged({"text": {"captions": False}}))
    p = fingerprints(cfg.merged({"text": {"prompts": ["a digit one"]}}))
    assert p["train"] == fingerprints(cfg)["train"] and p["sample"] != fingerprints(cfg)["sample"]


def test_embeddings_by_file_name_with_a_mask_and_explicit_prompts(inputs, tmp_path, capsys, one_thread):
    """Rows matched by file_names (in another order, with extra rows), a mask, prompts from --prompt and
    --prompts: the training conditions are the named rows, the queries cycle through the prompts."""
    captions = inputs["captions"]
    names = [f"img_{i:03d}.png" for i in range(24)][::-1] + [None, None]
    texts = captions[::-1] + ["", "a digit seven"]
    emb = tmp_path / "byname.safetensors"
    tensors = write_embeddings(emb, texts, seed=3, mask=True, file_names=names)
    (tmp_path / "prompts.txt").write_text("a digit seven\n\n")
    out = tmp_path / "out"
    code, _, err = main(capsys, "run", "--out", out, "--data", inputs["data"], "--model", inputs["model"],
                        "--embeddings", emb, *FAST, "--steps", "2", "--prompt", "a digit one", "--prompts",
                        tmp_path / "prompts.txt", "--num-queries", "3")
    assert code == 0, err
    header = load_tensors(str(out / "samples/samples.safetensors"))[1]
    assert header["prompts"] == ["a digit one", "a digit seven", "a digit one"]
    config = RunConfig.from_dict(upgrade_settings(json.loads((out / "run.json").read_text())["settings"]))
    assert config.text.prompts == ("a digit one", "a digit seven")
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    _, e, m = ctx.train_data()
    assert torch.equal(e, tensors["embeddings"][:24].flip(0)) and torch.equal(m, tensors["mask"][:24])
    q = ctx.text().queries()
    assert torch.equal(q.embeddings[1], tensors["embeddings"][25]) and q.mask.shape == (3, TOKENS)


def test_local_clip_text_encoder(inputs, tmp_path, capsys, one_thread):
    """Captions through a tiny local CLIPTextModel + CLIPTokenizer: --text-encoder, and a diffusers pipeline
    folder (--model) holding unet/, scheduler/, text_encoder/ and tokenizer/."""
    pytest.importorskip("transformers")
    enc_dir = clip_folder(tmp_path / "clip")
    enc = ClipTextEncoder(str(enc_dir), max_length=6)
    e = enc.encode(["a digit one", "a digit one", ""]).embeddings
    assert e.shape == (3, 6, WIDTH) and torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])
    out = tmp_path / "out"
    code, _, err = main(capsys, "run", "--out", out, "--data", inputs["data"], "--model", "text-tiny",
                        "--text-encoder", enc_dir, "--max-length", "6", *FAST, "--steps", "2",
                        "--guidance-scale", "1.5")
    assert code == 0, err
    config = RunConfig.from_dict(upgrade_settings(json.loads((out / "run.json").read_text())["settings"]))
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    _, emb = ctx.train_data()
    assert torch.allclose(emb, enc.encode(inputs["captions"]).embeddings)
    model, _ = ctx.trained()
    assert model.config.cross_attention_dim == WIDTH  # the preset follows the encoder's width
    stage = json.loads((out / "train/stage.json").read_text())
    assert stage["inputs"]["text"].startswith("encoder ")
    # a pipeline folder: unet/ + scheduler/ from the trained run, text_encoder/ + tokenizer/ beside them
    folder = tmp_path / "pipe"
    shutil.copytree(out / "train/pipeline", folder)
    shutil.copytree(enc_dir / "text_encoder", folder / "text_encoder")
    shutil.copytree(enc_dir / "tokenizer", folder / "tokenizer")
    out2 = tmp_path / "out2"
    code, _, err = main(capsys, "train", "--out", out2, "--data", inputs["data"], "--model", folder, "--steps", "0",
                        "--no-progress", "--threads", "1", "--max-length", "6")
    assert code == 0, err
    config2 = RunConfig.from_dict(upgrade_settings(json.loads((out2 / "run.json").read_text())["settings"]))
    ctx2 = Pipeline(str(out2), config2, progress=False, log=lambda m: None).ctx
    assert ctx2.text().kind == "encoder" and torch.allclose(ctx2.train_data()[1], emb)
    # the encoder's weights changed: the stages that read embeddings rerun
    other = clip_folder(tmp_path / "clip2", seed=1)
    pipe = Pipeline(str(out), config.merged({"text": {"encoder": str(other)}}), progress=False, log=lambda m: None)
    assert pipe.why_not_done("train").startswith("the token embeddings")


def test_clip_encoder_needs_transformers(tmp_path, monkeypatch):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "enc" / "vocab.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    enc = ClipTextEncoder(str(tmp_path / "enc"))
    assert enc.width == 8
    with pytest.raises(TextError, match="needs the transformers package"):
        enc.encode(["a"])


METADATA_CASES = [
    ('{"file_name": "img_000.png", "text": "a"}\nnot json\n', "line 2: not valid JSON"),
    ('["img_000.png", "a"]\n', "line 1: not a JSON object"),
    ('{"text": "a"}\n', "line 1: needs a 'file_name' string"),
    ('{"file_name": "img_000.png"}\n', "line 1: no 'text'"),
    ('{"file_name": "img_000.png", "text": 3}\n', "'text' of 'img_000.png' must be a string"),
    ('{"file_name": "img_000.png", "text": "  "}\n', "the caption of 'img_000.png' is empty"),
    ('{"file_name": "nope.png", "text": "a"}\n', "'nope.png' is not an image of the folder"),
    ('{"file_name": "../img_000.png", "text": "a"}\n', "is outside the folder"),
    ('{"file_name": "img_000.png", "text": "a"}\n{"file_name": "./img_000.png", "text": "b"}\n',
     "line 2: a second caption for 'img_000.png' (the first: "),
    ('{"file_name": "img_000.png", "text": "a"}\n', "2 image(s) have no caption in metadata.jsonl, e.g. "
                                                     "'img_001.png'"),
]


@pytest.mark.parametrize("text,needle", METADATA_CASES)
def test_bad_metadata_is_refused_in_one_line(tmp_path, text, needle):
    write_folder(tmp_path / "d", n=3)
    (tmp_path / "d" / "metadata.jsonl").write_text(text)
    with pytest.raises(TextError) as err:
        read_captions(str(tmp_path / "d"))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_captions_in_sub_folders_and_a_missing_metadata_file(tmp_path):
    write_folder(tmp_path / "d" / "sub", n=2)
    with pytest.raises(TextError, match="captions need an image folder with a metadata.jsonl"):
        read_captions(str(tmp_path / "e"))  # not a folder
    (tmp_path / "d" / "sub" / "metadata.jsonl").unlink()
    with pytest.raises(TextError, match="no metadata.jsonl; captions need one JSON line per image"):
        read_captions(str(tmp_path / "d"))
    (tmp_path / "d" / "sub" / "metadata.jsonl").write_text(
        '{"file_name": "img_001.png", "text": "one"}\n{"file_name": "img_000.png", "text": "zero", "x": 1}\n')
    assert read_captions(str(tmp_path / "d")) == ("zero", "one")
    assert read_captions(str(tmp_path / "d"), ["sub/img_001.png"]) == ("one",)


def bad_files(tmp, texts):
    """(writer, expected message) pairs of broken embeddings files."""
    n = len(texts)

    def raw(path):
        path.write_bytes(b"not a safetensors file")

    def emb(e, meta=None, **more):
        return lambda path: save_file({"embeddings": e, **more}, str(path),
                                      metadata=meta if meta is not None else {"texts": json.dumps(texts)})

    nan = torch.randn(n, TOKENS, WIDTH)
    nan[2, 1, 0] = float("nan")
    return [
        (raw, "not a readable safetensors file"),
        (lambda p: save_file({"x": torch.zeros(1)}, str(p)), "no 'embeddings' tensor (R, L, E) (found: x)"),
        (emb(torch.randn(n, WIDTH)), "'embeddings' must be float (R, L, E)"),
        (emb(torch.zeros(n, TOKENS, WIDTH, dtype=torch.int32)), "'embeddings' must be float (R, L, E)"),
        (emb(nan), f"embedding row 2 ('{texts[2]}') has NaN or infinite values"),
        (emb(torch.randn(n, TOKENS, WIDTH), meta={}), "no 'texts' metadata"),
        (emb(torch.randn(n, TOKENS, WIDTH), meta={"texts": json.dumps(texts[:-1])}),
         f"metadata 'texts' has {n - 1} entries for {n} embedding rows"),
        (emb(torch.randn(n, TOKENS, WIDTH), meta={"texts": "[1, 2"}), "metadata 'texts' is not valid JSON"),
        (emb(torch.randn(n, TOKENS, WIDTH), mask=torch.ones(n, TOKENS + 1, dtype=torch.bool)),
         "'mask' must be (R, L)"),
        (emb(torch.randn(n, TOKENS, WIDTH), mask=torch.full((n, TOKENS), 2)), "'mask' must be bool or hold only"),
        (emb(torch.randn(n, TOKENS, WIDTH), mask=torch.zeros(n, TOKENS, dtype=torch.bool)),
         "mask row 0 ('a digit zero') attends to no token"),
    ]


def test_bad_embeddings_files_are_refused_in_one_line(inputs, tmp_path):
    for i, (write, needle) in enumerate(bad_files(tmp_path, inputs["texts"])):
        path = tmp_path / f"bad{i}.safetensors"
        write(path)
        with pytest.raises(TextError) as err:
            EmbeddingsFile(str(path))
        assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value), needle


def test_rows_must_match_the_captions(inputs, tmp_path):
    captions = inputs["captions"]
    names = [f"img_{i:03d}.png" for i in range(24)]
    f = EmbeddingsFile(str(inputs["emb"]))
    assert f.rows_for(names, captions).tolist() == [f.texts.index(c) for c in captions]
    missing = tmp_path / "missing.safetensors"
    write_embeddings(missing, inputs["texts"][1:])
    with pytest.raises(TextError, match="no row embeds the caption of 'img_000.png', 'a digit zero'"):
        EmbeddingsFile(str(missing)).rows_for(names, captions)
    stale = tmp_path / "stale.safetensors"
    write_embeddings(stale, ["a digit one"] + captions[1:], file_names=names)
    with pytest.raises(TextError, match="row 0 of 'img_000.png' embeds 'a digit one' but its caption is 'a digit "
                                        "zero' \\(a stale embeddings file\\?\\)"):
        EmbeddingsFile(str(stale)).rows_for(names, captions)
    twice = tmp_path / "twice.safetensors"
    write_embeddings(twice, captions[:2], file_names=[names[0], names[0]])
    with pytest.raises(TextError, match="rows 0 and 1 both belong to file 'img_000.png'"):
        EmbeddingsFile(str(twice)).rows_for(names, captions)
    ambiguous = tmp_path / "ambiguous.safetensors"
    save_file({"embeddings": torch.randn(2, TOKENS, WIDTH)}, str(ambiguous),
              metadata={"texts": json.dumps(["a digit zero", "a digit zero"])})
    with pytest.raises(TextError, match="rows 0 and 1 embed the same text 'a digit zero' differently"):
        EmbeddingsFile(str(ambiguous)).text_row("a digit zero", "the prompt")
    assert query_prompts((), ["b", "a", "b"], 5) == ("b", "a", "b", "a", "b")
    with pytest.raises(TextError, match="a prompt is blank"):
        TextConfig(prompts=[" "])
    with pytest.raises(TextError, match="not both"):
        TextConfig(embeddings="a", encoder="b")


def test_runs_that_cannot_work_stop_before_writing(inputs, tmp_path, capsys):
    base, data, model = inputs["base"], inputs["data"], inputs["model"]
    no_null = tmp_path / "no_null.safetensors"
    write_embeddings(no_null, inputs["texts"][:-1])
    wide = tmp_path / "wide.safetensors"
    write_embeddings(wide, inputs["texts"], width=WIDTH + 1)
    no_prompt = ["--prompt", "a cat"]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({k: v for k, v in TINY_TEXT.items() if k not in ("_class_name",
                                                                                 "cross_attention_dim")}
                                | {"down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                                   "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}))
    cases = [
        (["--model", model, "--embeddings", wide], "the token embeddings have width 17 but --model"),
        (["--model", model, "--embeddings", no_null, "--guidance-scale", "2", "--condition-dropout", "0"],
         "no row for the empty prompt (text \"\"), the null condition that --guidance-scale needs"),
        (["--model", model, "--embeddings", no_null], "that --condition-dropout needs; add one, or use"),
        (["--model", model, "--embeddings", inputs["emb"], *no_prompt], "no row embeds the prompt 'a cat'"),
        (["--model", model], "needs token embeddings: --embeddings FILE"),
        (["--model", model, "--text-encoder", tmp_path], "not a text encoder folder (no config.json"),
        (["--model", plain, "--captions", "true", "--embeddings", inputs["emb"]],
         "--captions needs a text-conditional model"),
        (["--model", model, "--embeddings", inputs["emb"], "--data", "digits"],
         "captions need an image folder with a metadata.jsonl"),
        (["--model", model, "--embeddings", base / "nope.safetensors"], "no such embeddings file"),
        (["--model", model, "--embeddings", inputs["emb"], "--captions", "false"], "but --captions is off"),
        (["--model", model, "--embeddings", inputs["emb"], "--max-length", "4"], "--max-length is for a text "
                                                                                 "encoder"),
    ]
    for i, (args, needle) in enumerate(cases):
        code, _, err = main(capsys, "run", "--out", tmp_path / f"o{i}", "--data", data, "--no-progress", *args)
        assert code == 2 and needle in err[-1] and len(err) == 1, (needle, err)
        assert not (tmp_path / f"o{i}").exists()


def test_text_training_and_sampling_use_the_null_condition(inputs, one_thread):
    """Condition dropout replaces the embeddings by the null row (other weights than without it); guided
    sampling at scale 0 is sampling under the null condition; the noise depends on the seed only."""
    from kfac_influence.diffusion.sampling import ddpm_sample

    images = torch.randn(8, 1, 8, 8).clamp(-1, 1)
    cond = {"encoder_hidden_states": torch.randn(8, TOKENS, WIDTH)}
    null = {"encoder_hidden_states": torch.zeros(1, TOKENS, WIDTH)}
    weights = []
    for p in (0.0, 0.9):
        model = build_model(str(inputs["model"]), seed=0)
        r = train(model, make_scheduler(), images, TrainConfig(steps=2, batch_size=4, warmup_steps=0,
                                                               checkpoint_every=0, condition_dropout=p),
                  progress=False, condition=cond, null_condition=null)
        weights.append(torch.cat([v.flatten() for v in r.raw_model.state_dict().values()]))
    assert not torch.equal(weights[0], weights[1])
    # a text-conditional checkpoint records its dropout: resuming under another is refused
    from kfac_influence.engine import CheckpointMismatch
    ck = tempfile.mkdtemp()
    cfg = dict(batch_size=4, warmup_steps=0, checkpoint_every=1)
    train(build_model(str(inputs["model"]), seed=0), make_scheduler(), images,
          TrainConfig(steps=1, condition_dropout=0.5, **cfg), progress=False, condition=cond, null_condition=null,
          checkpoint_dir=ck)
    with pytest.raises(CheckpointMismatch, match="config"):
        train(build_model(str(inputs["model"]), seed=0), make_scheduler(), images,
              TrainConfig(steps=1, condition_dropout=0.0, **cfg), progress=False, condition=cond,
              null_condition=null, checkpoint_dir=ck)
    with pytest.raises(ValueError, match="condition dropout > 0 needs null_condition"):
        train(build_model(str(inputs["model"])), make_scheduler(), images, TrainConfig(steps=1), progress=False,
              condition=cond)
    model, sched = build_model(str(inputs["model"]), seed=1).eval(), make_scheduler()
    kw = dict(seed=5, num_inference_steps=3, progress=False)
    q = {"encoder_hidden_states": torch.randn(2, TOKENS, WIDTH)}
    under_null = ddpm_sample(model, sched, 2, (1, 8, 8), condition={k: v.expand(2, -1, -1) for k, v in null.items()},
                             **kw).images
    s0 = ddpm_sample(model, sched, 2, (1, 8, 8), condition=q, null_condition=null, guidance_scale=0.0, **kw).images
    s1 = ddpm_sample(model, sched, 2, (1, 8, 8), condition=q, **kw).images
    assert torch.allclose(s0, under_null, atol=1e-5) and not torch.allclose(s1, under_null, atol=1e-3)
    with pytest.raises(ValueError, match="needs null_condition"):
        ddpm_sample(model, sched, 2, (1, 8, 8), condition=q, guidance_scale=2.0, **kw)


def test_text_preset_and_saved_pipeline_round_trip(tmp_path):
    model = build_model("text-tiny", cross_attention_dim=24)
    assert type(model).__name__ == "UNet2DConditionModel" and model.config.cross_attention_dim == 24
    save_pipeline(model, make_scheduler(), str(tmp_path / "p"))
    from kfac_influence.diffusion.models import load_model

    loaded, sched = load_model(str(tmp_path / "p"))
    assert type(loaded).__name__ == "UNet2DConditionModel" and sched is not None
    assert text_conditional(RunConfig().merged({"model": {"spec": "text-tiny"}}))
    assert text_conditional(RunConfig().merged({"model": {"spec": str(tmp_path / "p")}}))


def test_stable_diffusion_like_folder_latents_and_text(inputs, tmp_path, capsys, one_thread):
    """A diffusers pipeline folder like Stable Diffusion's (model_index.json, unet/ a UNet2DConditionModel, vae/,
    scheduler/, text_encoder/, tokenizer/; tiny, built here): its encoder embeds the captions, its VAE the images,
    and train / fit / score take (latents, embeddings)."""
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    class TinySD(DiffusionPipeline):
        def __init__(self, unet, vae, scheduler):
            super().__init__()
            self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), latent_channels=1,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.7)
    unet = UNet2DConditionModel(**{k: v for k, v in TINY_TEXT.items() if not k.startswith("_")})
    folder = tmp_path / "sd"
    TinySD(unet=unet, vae=vae, scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False)).save_pretrained(
        str(folder), safe_serialization=True)
    clip = clip_folder(tmp_path / "clip")
    shutil.copytree(clip / "text_encoder", folder / "text_encoder")
    shutil.copytree(clip / "tokenizer", folder / "tokenizer")
    out = tmp_path / "out"
    code, _, err = main(capsys, "run", "--out", out, "--data", inputs["data"], "--image-size", "16", "--model",
                        folder, *FAST, "--steps", "2", "--max-length", "6", "--guidance-scale", "2",
                        "--encode-batch-size", "8")
    assert code == 0, err
    config = RunConfig.from_dict(upgrade_settings(json.loads((out / "run.json").read_text())["settings"]))
    ctx = Pipeline(str(out), config, progress=False, log=lambda m: None).ctx
    latents, emb = ctx.train_data()
    assert ctx.latent and torch.equal(latents, ctx.latents()) and latents.shape == (24, 1, 8, 8)
    assert torch.allclose(emb, ClipTextEncoder(str(clip), max_length=6).encode(inputs["captions"]).embeddings)
    assert json.loads((out / "train/stage.json").read_text())["inputs"]["text"].startswith("encoder ")
    header = load_tensors(str(out / "samples/samples.safetensors"))[1]
    assert header["prompts"] == list(dict.fromkeys(inputs["captions"]))[:4]
    assert torch.isfinite(load_tensors(str(out / "scores/scores.safetensors"))[0]["scores"]).all()
