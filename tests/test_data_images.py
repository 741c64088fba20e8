"""The image modality: make_shards stores a manifest's ``image`` column as ``<key>.jpg`` (verified,
indexed), and the webdataset loader returns CLIP-normalised pictures when ``data.image_size`` asks."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from clapscale.config import ConfigError, load_config
from clapscale.data import build_loader
from clapscale.data.images import CLIP_MEAN, CLIP_STD
from clapscale.shards.cli import main as make_shards
from clapscale.shards.verify import verify_shards

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}


def _jpeg(rgb, size=(48, 32)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("img_src")
    rows = ["path,caption,image"]
    for i, (name, rgb) in enumerate(COLOURS.items()):
        tone = 0.3 * np.sin(2 * np.pi * (300 + 100 * i) * np.arange(24000) / 48000)
        sf.write(root / f"{name}.wav", tone, 48000)
        (root / f"{name}.jpg").write_bytes(_jpeg(rgb))
        rows.append(f"{name}.wav,a {name} thing,{name}.jpg")
    sf.write(root / "nopic.wav", 0.3 * np.sin(np.arange(24000) / 7), 48000)
    rows.append("nopic.wav,no picture on disk,gone.jpg")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "png.png", format="PNG")
    sf.write(root / "png.wav", 0.3 * np.sin(np.arange(24000) / 5), 48000)
    rows.append("png.wav,a png is not a jpeg,png.png")
    (root / "clips.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("img_out") / "set"
    assert make_shards(["--from-manifest", str(root / "clips.csv"), "--root", str(root), "--out", str(out),
                        "--quiet"]) == 0
    return out


def test_make_shards_stores_jpg_between_flac_and_json_and_verifies(image_set):
    rejects = [json.loads(line) for line in (image_set / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["code"] for r in rejects) == ["error", "missing_image"]
    assert any("JPEG" in r["reason"] for r in rejects if r["code"] == "error")
    (tar_path,) = sorted((image_set / "train").glob("*.tar"))
    with tarfile.open(tar_path) as tf:
        names = tf.getnames()
        stored = {n: tf.extractfile(n).read() for n in names}
    keys = sorted({n.split(".")[0] for n in names})
    assert len(keys) == 3
    assert names == [f"{k}.{ext}" for k in keys for ext in ("flac", "jpg", "json")]
    for k in keys:
        caption = json.loads(stored[f"{k}.json"])["text"][0]
        colour = caption.split()[1]
        assert stored[f"{k}.jpg"] == _jpeg(COLOURS[colour])  # the file's bytes, unchanged
    idx = tar_path.with_suffix(".idx").read_text().splitlines()
    assert all(" jpg " in line for line in idx[1:])
    report = verify_shards(image_set)
    assert report.problems == []


def test_verify_catches_a_corrupted_jpg(image_set, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(image_set, bad)
    (tar_path,) = sorted((bad / "train").glob("*.tar"))
    with tarfile.open(tar_path) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(tar_path.read_bytes())
    data[member.offset_data + 3 : member.offset_data + 200] = b"\0" * 197
    tar_path.write_bytes(bytes(data))
    problems = verify_shards(bad).problems
    assert any(member.name.split(".")[0] in p and "image" in p for p in problems), problems


def test_wds_loader_returns_clip_normalised_images(image_set):
    cfg = load_config(None, [f"data.train={image_set}/train/000000.tar", "data.batch_size=3", "data.workers=0",
                             "data.image_size=24"])
    (batch,) = list(build_loader(cfg, cfg.data.train, train=False))
    assert batch["image"].shape == (3, 3, 24, 24) and batch["image"].dtype == torch.float32
    for i, text in enumerate(batch["texts"]):
        rgb = np.asarray(COLOURS[text.split()[1]], dtype=np.float32) / 255.0
        expected = (rgb - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)  # a flat colour survives resize + crop
        got = batch["image"][i].mean(dim=(1, 2)).numpy()
        np.testing.assert_allclose(got, expected, atol=0.05)  # JPEG is lossy


def test_wds_loader_without_image_size_has_no_images_and_with_it_skips_clips_without(image_set, tmp_path):
    cfg = load_config(None, [f"data.train={image_set}/train/000000.tar", "data.batch_size=3", "data.workers=0"])
    (batch,) = list(build_loader(cfg, cfg.data.train, train=False))
    assert "image" not in batch
    audio_only = tmp_path / "audio_only"
    assert make_shards(["--synthetic", "4", "--out", str(audio_only), "--quiet"]) == 0
    cfg = load_config(None, [f"data.train={audio_only}/train/000000.tar", "data.batch_size=2", "data.workers=0",
                             "data.image_size=24"])
    loader = build_loader(cfg, cfg.data.train, train=False)
    assert [b for b in loader if "image" in b] == []
    assert loader.skipped.get("missing_image", 0) > 0


def test_dali_backend_refuses_images_with_a_config_error():
    with pytest.raises(ConfigError, match=r"data.image_size=224 but data.backend=dali does not decode"):
        load_config(None, ["data.backend=dali", "data.image_size=224"])
