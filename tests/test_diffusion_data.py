"""Data loaders and model specs of the diffusion pipeline: shapes, ranges, stable ids, clear errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from kfac_influence.diffusion.data import (DataConfig, DataError, load_dataset, load_digits_dataset,
                                           load_image_folder, load_npz)
from kfac_influence.diffusion.models import ModelError, build_model, load_model, make_scheduler, save_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_range_ids_labels():
    d = load_digits_dataset()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert d.images.min() == -1.0 and d.images.max() == 1.0
    assert torch.equal(d.ids, torch.arange(1797))
    assert d.labels.shape == (1797,) and set(d.labels.tolist()) == set(range(10))
    r = load_digits_dataset(16)
    assert r.images.shape == (1797, 1, 16, 16) and r.images.abs().max() <= 1.0


def test_limit_is_seeded_and_keeps_ids():
    a = load_dataset(DataConfig(limit=100, seed=3))
    b = load_dataset(DataConfig(limit=100, seed=3))
    full = load_digits_dataset()
    assert len(a) == 100 and torch.equal(a.ids, b.ids)
    assert torch.equal(a.images, full.images[a.ids]) and torch.equal(a.labels, full.labels[a.ids])
    assert not torch.equal(a.ids, load_dataset(DataConfig(limit=100, seed=4)).ids)


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_sorted_recursive_resized(tmp_path):
    rng = np.random.default_rng(0)
    arrs = {"b/2.png": rng.integers(0, 256, (10, 12, 3), dtype=np.uint8),
            "a.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "b/1.jpg": rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)}
    for rel, a in arrs.items():
        _png(str(tmp_path / rel), a)
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_image_folder(str(tmp_path), image_size=6)
    assert d.paths == ("a.png", "b/1.jpg", "b/2.png")
    assert d.images.shape == (3, 3, 6, 6) and torch.equal(d.ids, torch.arange(3))
    assert d.images.min() >= -1 and d.images.max() <= 1
    same = load_image_folder(str(tmp_path), image_size=8)
    assert torch.allclose(same.images[0], torch.from_numpy(arrs["a.png"]).permute(2, 0, 1).float() / 127.5 - 1)
    grey = load_image_folder(str(tmp_path), image_size=6, channels=1)
    assert grey.images.shape == (3, 1, 6, 6)


def test_image_folder_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such"):
        load_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_image_folder(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    _png(str(bad / "0.png"), np.zeros((4, 4), dtype=np.uint8))
    (bad / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"1\.png"):
        load_image_folder(str(bad))
    mixed = tmp_path / "mixed"
    _png(str(mixed / "0.png"), np.zeros((4, 4), dtype=np.uint8))
    _png(str(mixed / "1.png"), np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"1\.png.*channel"):
        load_image_folder(str(mixed))
    sizes = tmp_path / "sizes"
    _png(str(sizes / "0.png"), np.zeros((4, 4), dtype=np.uint8))
    _png(str(sizes / "1.png"), np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"1\.png.*size"):
        load_image_folder(str(sizes))
    assert load_image_folder(str(sizes), image_size=4).images.shape == (2, 1, 4, 4)


def test_npz_layouts_ids_and_errors(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    p = tmp_path / "d.npz"
    np.savez(p, images=x, labels=np.arange(5), ids=np.array([10, 11, 12, 13, 14]))
    d = load_npz(str(p))
    assert d.images.shape == (5, 3, 6, 6) and d.ids.tolist() == [10, 11, 12, 13, 14]
    assert d.labels.tolist() == list(range(5)) and d.images.abs().max() <= 1
    f = tmp_path / "f.npz"
    np.savez(f, x=np.full((2, 1, 4, 4), 0.5, dtype=np.float32))
    assert torch.allclose(load_npz(str(f)).images, torch.zeros(2, 1, 4, 4))
    assert load_dataset(DataConfig(source=str(f), image_size=8)).images.shape == (2, 1, 8, 8)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        load_npz(str(bad))
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, foo=np.zeros(3))
    with pytest.raises(DataError, match="no 'images'"):
        load_npz(str(nokey))
    dup = tmp_path / "dup.npz"
    np.savez(dup, images=np.zeros((2, 4, 4), np.uint8), ids=np.array([1, 1]))
    with pytest.raises(DataError, match="not unique"):
        load_npz(str(dup))


def test_config_validation():
    with pytest.raises(DataError):
        DataConfig(image_size=0)
    with pytest.raises(DataError):
        DataConfig(channels=2)


def test_model_presets_json_and_folder(tmp_path):
    cifar = build_model("cifar-ddpm")
    assert 35_000_000 < sum(p.numel() for p in cifar.parameters()) < 36_500_000
    assert cifar.config.block_out_channels == (128, 256, 256, 256) and cifar.config.layers_per_block == 2
    assert cifar.config.down_block_types[1] == "AttnDownBlock2D" and cifar.config.dropout == 0.1
    del cifar
    a, b = build_model("digits-tiny", seed=1), build_model("digits-tiny", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    rgb = build_model("digits-tiny", in_channels=3, sample_size=16)
    assert rgb(torch.zeros(1, 3, 16, 16), torch.tensor([3])).sample.shape == (1, 3, 16, 16)
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps(dict(a.config)))
    c = build_model(str(cfg), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    sched = make_scheduler()
    assert sched.config.num_train_timesteps == 1000 and float(sched.betas[0]) == pytest.approx(1e-4)
    assert float(sched.betas[-1]) == pytest.approx(0.02)
    save_pipeline(a, sched, str(tmp_path / "pipe"))
    m, s = load_model(str(tmp_path / "pipe"))
    assert s is not None and all(torch.equal(p, q) for p, q in zip(a.parameters(), m.parameters()))
    a.save_pretrained(str(tmp_path / "unet"))
    m2, s2 = load_model(str(tmp_path / "unet"))
    assert s2 is None and all(torch.equal(p, q) for p, q in zip(a.parameters(), m2.parameters()))


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not a preset"):
        build_model("no-such-model")
    with pytest.raises(ModelError, match="no such model folder"):
        load_model(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ModelError, match="bad.json"):
        build_model(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"no_such_argument": 3}))
    with pytest.raises(ModelError, match="wrong.json"):
        build_model(str(wrong))
