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


# ----------------------------------------------------------------------------- the DALI backend


def _texture(size, seed, mode="RGB", tiles=1, orientation=0) -> bytes:
    """A JPEG of smooth random texture (each tile its own), so that a wrong tile, offset or scale
    shows, while JPEG's loss stays small."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    parts = [Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8)).resize((w // tiles, h),
                                                                                Image.Resampling.BICUBIC)
             for _ in range(tiles)]
    strip = Image.new("RGB", (w, h))
    for i, part in enumerate(parts):
        strip.paste(part, (i * (w // tiles), 0))
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:  # a phone photo's rotation tag: PIL (and CLIP's preprocessing) ignore it
        exif[0x0112] = orientation
    strip.convert(mode).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


# (width, height, mode, tiles, EXIF orientation): landscape, portrait, square, grey, video strips,
# frames already 24 x 24 (nothing to scale), and photos tagged as rotated.
PICTURES = [(64, 40, "RGB", 1, 0), (40, 64, "RGB", 1, 0), (33, 33, "RGB", 1, 0), (50, 30, "L", 1, 0),
            (4 * 30, 26, "RGB", 4, 0), (4 * 24, 40, "RGB", 4, 0), (3 * 40, 40, "RGB", 3, 0), (70, 45, "RGB", 1, 0),
            (24, 24, "RGB", 1, 0), (2 * 24, 24, "RGB", 2, 0), (64, 40, "RGB", 1, 6), (40, 56, "RGB", 1, 3)]


@pytest.fixture(scope="module")
def picture_set(tmp_path_factory):
    """Shards with textured pictures of every shape (4 shards), and a shard of bad pictures."""
    from clapscale.shards.writer import write_shards
    from test_data_common import clip, good_members, write_raw_shard

    out = tmp_path_factory.mktemp("pictures")
    records = []
    for i, (w, h, mode, tiles, orientation) in enumerate(PICTURES * 2):
        rec = {"key": f"pic-{i:03d}", "audio": clip(1.0 + 0.1 * i, i), "text": [f"picture {i}"],
               "image": _texture((w, h), i, mode, tiles, orientation)}
        if tiles > 1:
            rec["video_frames"] = tiles
        records.append(rec)
    write_shards(records, out / "good", "train", shard_size=6)
    good_jpg = _texture((40, 30), 99)
    bad = [
        *good_members("bad-a", 1), ("bad-a.jpg", good_jpg),
        *good_members("bad-nopic", 2),  # no .jpg member
        *good_members("bad-cut", 3), ("bad-cut.jpg", good_jpg[: len(good_jpg) // 2]),  # both decoders refuse
        ("bad-frames.flac", good_members("x", 4)[0][1]), ("bad-frames.jpg", good_jpg),
        ("bad-frames.json", json.dumps({"text": ["x"], "sample_rate": 48000, "video_frames": "four"}).encode()),
        ("bad-strip.flac", good_members("x", 5)[0][1]), ("bad-strip.jpg", good_jpg),  # 40 px is not 3 tiles
        ("bad-strip.json", json.dumps({"text": ["x"], "sample_rate": 48000, "video_frames": 3}).encode()),
        *good_members("bad-z", 6), ("bad-z.jpg", good_jpg),
    ]
    write_raw_shard(out / "bad" / "000000.tar", bad)
    return out


def _pictures(loader, epochs=1) -> dict[tuple[int, str], torch.Tensor]:
    out = {}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch["image"].shape[0] == len(batch["keys"])
            for key, image in zip(batch["keys"], batch["image"]):
                out[epoch, key] = image
    return out


@pytest.mark.parametrize("train", [False, True])
def test_dali_pictures_equal_the_webdataset_loaders(picture_set, train):
    """DALI decodes, scales and crops each picture as PIL does in the webdataset backend (to JPEG
    decoder and resampling rounding, ~1 grey level), and draws the same video frame per (seed,
    epoch, key) in training: a wrong tile, offset or scale would differ by far more."""
    from clapscale.data.dali import DaliLoader
    from clapscale.data.specs import parse_spec

    overrides = [f"data.train={picture_set}/good/train/{{000000..000003}}.tar", "data.batch_size=4",
                 "data.workers=0", "data.image_size=24", "data.resampled=false", "data.seed=3"]
    cfg = load_config(None, overrides)
    ref = _pictures(build_loader(cfg, cfg.data.train, train=train), epochs=3 if train else 1)
    got = _pictures(DaliLoader(parse_spec(cfg.data.train), cfg.audio, cfg.data, train=train, features="waveform"),
                    epochs=3 if train else 1)
    common = sorted(set(ref) & set(got))
    assert len(common) >= (48 if train else 24), (len(ref), len(got))
    for where in common:
        diff = (got[where] - ref[where]).abs()
        assert got[where].shape == (3, 24, 24) and got[where].dtype == torch.float32
        assert float(diff.max()) < 0.1 and float(diff.mean()) < 0.01, (where, float(diff.max()), float(diff.mean()))
    if train:  # the strips' frames were drawn, not fixed: some key shows two frames over the epochs
        strips = {key for _, key in common if PICTURES[int(key[4:]) % len(PICTURES)][3] > 1}
        assert any(not torch.allclose(ref[0, k], ref[e, k], atol=0.1) for k in strips for e in (1, 2)
                   if (0, k) in ref and (e, k) in ref)


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_bad_pictures_are_skipped_and_counted_alike_by_both_backends(picture_set, backend):
    cfg = load_config(None, [f"data.train={picture_set}/bad/000000.tar", "data.batch_size=2", "data.workers=0",
                             "data.image_size=16", f"data.backend={backend}"])
    loader = build_loader(cfg, cfg.data.train, train=False)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == ["bad-a", "bad-z"]
    assert loader.skipped == {"missing_image": 1, "bad_image": 3}


def test_dali_images_through_the_cli_path_need_no_other_setting(picture_set):
    """``data.backend=dali`` with ``data.image_size`` is a valid config (it was refused before the DALI
    backend decoded pictures) and the batch carries images beside the mel."""
    cfg = load_config(None, [f"data.train={picture_set}/good/train/000000.tar", "data.batch_size=3",
                             "data.workers=0", "data.image_size=16", "data.backend=dali"])
    batch = next(iter(build_loader(cfg, cfg.data.train, train=False)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["mel"].shape[0] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_pictures_on_the_gpu_equal_the_cpu_decoders(picture_set):
    """With a device, DALI decodes the JPEGs with nvJPEG (``mixed``) and scales them on the GPU: the
    same pictures as PIL's in the webdataset backend, to decoder rounding."""
    from clapscale.data.dali import DaliLoader
    from clapscale.data.specs import parse_spec

    cfg = load_config(None, [f"data.train={picture_set}/good/train/{{000000..000003}}.tar", "data.batch_size=4",
                             "data.workers=1", "data.image_size=24"])
    spec = parse_spec(cfg.data.train)
    gpu = _pictures(DaliLoader(spec, cfg.audio, cfg.data, train=False, device_id=0))
    cpu = _pictures(build_loader(cfg, cfg.data.train, train=False))  # the webdataset backend: PIL
    assert sorted(gpu) == sorted(cpu) and len(cpu) == 24
    for where, image in gpu.items():
        assert image.is_cuda
        diff = (image.cpu() - cpu[where]).abs()
        assert float(diff.max()) < 0.1 and float(diff.mean()) < 0.01, where


def test_dali_isolates_the_rows_it_refuses_whatever_they_are_batched_with():
    """The isolation path of the DALI decoders (clapscale.data.dali._run_isolating), with a stand-in
    for a DALI pipeline (a function that fails its whole batch when it holds row "d" or "p", as a
    DALI pipeline dies on one bad stream): each refused row is skipped -- with the independent
    decoder's reason where it refuses the row too ("p"), else DALI's message ("d") -- and every
    other row is decoded, whatever it was batched with ("t": refused by the other decoder only,
    decoded by DALI, in a clean batch and in a failing one alike)."""
    from clapscale.data.dali import _run_isolating

    message = ("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n"
               "  File \"x.py\", line 1\n\nencountered:\n\ncannot decode {}\n"
               "Current pipeline object is no longer valid.")
    runs, skipped = [], []

    def run(batch):
        runs.append(list(batch))
        bad = [b for b in batch if b in "dp"]
        if bad:
            raise RuntimeError(message.format(bad[0]))
        return [b.upper() for b in batch]

    def check(row):
        return "not an image" if row in "pt" else None

    def skip(row, why):
        skipped.append((row, why))

    assert _run_isolating(["a", "t", "b"], run, lambda: None, check, skip, "image") == ["A", "T", "B"]
    out = _run_isolating(["a", "d", "t", "p", "b"], run, lambda: None, check, skip, "image")
    assert out == ["A", None, "T", None, "B"]
    assert skipped[0][0] == "d" and "cannot decode d" in skipped[0][1]  # DALI's own line, not boilerplate
    assert skipped[1] == ("p", "not an image")
    assert len(skipped) == 2

    # Every row failing alone while the other decoder reads them: not the data's fault -> raised.
    def broken(batch):
        raise RuntimeError("Critical error in pipeline:\nencountered:\n\nout of memory")

    with pytest.raises(RuntimeError, match="not a data problem.*out of memory"):
        _run_isolating(["a", "b"], broken, lambda: None, check, skip, "image")
    # ... but a batch the other decoder refuses whole is bad data: skipped.
    assert _run_isolating(["p", "t"], broken, lambda: None, check, skip, "image") == [None, None]
