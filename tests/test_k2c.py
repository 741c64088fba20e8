"""Keyword-to-caption: de-biasing, `clapscale k2c --train` and `clapscale k2c` on real shards.

A tiny T5 is trained here (no weights exist offline); its quality is measured against the same
architecture untrained with sacrebleu's BLEU and the share of tags the captions mention.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import sacrebleu

from clapscale.cli import main as clapscale
from clapscale.k2c.debias import GENDERED_WORDS, debias
from clapscale.k2c.model import GenerationOptions, K2CModel, generate_captions, load_k2c_model, model_checksum
from clapscale.k2c.train import K2CTrainConfig, new_t5, read_json_members
from clapscale.shards import synthetic
from clapscale.shards.verify import verify_shards
from clapscale.shards.writer import write_shards

TONE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(4800) / 48000)).astype(np.float32)


def test_debias_known_sentences():
    text, counts = debias("A man and a woman talk while two boys play; the Lady's dog barks at MEN.")
    assert text == "A person and a person talk while two children play; the Person's dog barks at PEOPLE."
    assert counts == {"man": 1, "woman": 1, "boys": 1, "lady": 1, "men": 1}
    # Whole words only: no rewriting inside other words; pronouns are left alone (see the module).
    assert debias("Manchester's humane mandolin; she hums") == ("Manchester's humane mandolin; she hums", {})
    assert all(" " not in w for w in GENDERED_WORDS)


# ----------------------------------------------------------------------------- stage

PAIRS = {
    ("Male speech, man speaking",): "A man speaks loudly.",
    ("Female speech, woman speaking",): "A woman talks quietly.",
    ("Dog",): "A dog barks twice.",
    ("Rain",): "Rain falls on a roof.",
    ("Dog", "Rain"): "A dog barks in the rain.",
}


def _records(items, prefix):
    for i, (tags, text) in enumerate(items):
        yield {"key": f"{prefix}{i:04d}", "audio": TONE, "text": [text], "tag": list(tags), "source": "fixture"}


@pytest.fixture(scope="module")
def tiny_k2c(tmp_path_factory):
    """A tiny T5 that has learned PAIRS (gendered captions included), trained by the CLI."""
    root = tmp_path_factory.mktemp("k2c")
    write_shards(_records([(t, c) for t, c in PAIRS.items()] * 8, "p"), root / "pairs", "train", shard_size=16)
    model = root / "model"
    assert clapscale(["k2c", "--train", "--shards", str(root / "pairs"), "--out", str(model), "--steps", "120",
                      "--d-model", "32", "--d-ff", "64", "--num-heads", "2", "--train-batch-size", "20", "--lr", "5e-3",
                      "--quiet"]) == 0
    return model


def _tars(root):
    out = {}
    for tar in sorted(root.glob("*/*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                out[(tar.parent.name, tar.name, m.name)] = tf.extractfile(m).read()
    return out


def test_k2c_stage_writes_debiased_captions_resumably(tiny_k2c, tmp_path, capsys):
    clips = [(("Male speech, man speaking",), "The sound of Male speech, man speaking"), (("Dog",), "The sound of Dog"),
             (("Dog", "Rain"), "The sound of Dog and Rain"), ((), "an untagged clip")]
    src = tmp_path / "audioset"
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(jpeg, format="JPEG")
    records = list(_records(clips, "t"))
    records[1]["image"] = jpeg.getvalue()  # a clip's picture (trimodal shards) travels with it
    write_shards(records, src, "train", shard_size=2)
    write_shards(_records([(("Female speech, woman speaking",), "The sound of Female speech")], "e"), src, "eval")
    out = tmp_path / "k2c"
    argv = ["k2c", "--shards", str(src), "--model", str(tiny_k2c), "--out", str(out), "--num-captions", "2",
            "--beams", "3", "--batch-size", "2", "--quiet"]
    assert clapscale(argv) == 0
    printed = capsys.readouterr().out
    assert verify_shards(out).ok
    before, after = _tars(src), _tars(out)
    copied = [k for k in before if k[2].endswith((".flac", ".jpg"))]
    assert len(copied) == 6 and copied == [k for k in after if k[2].endswith((".flac", ".jpg"))]
    assert all(after[k] == before[k] for k in copied)  # audio and pictures copied byte for byte
    metas = {json.loads(v)["key"] if "key" in json.loads(v) else k[2]: json.loads(v)
             for k, v in after.items() if k[2].endswith(".json")}
    tagged = [m for m in metas.values() if m["tag"]]
    assert len(tagged) == 4
    for m in tagged:
        t5 = m["text_augment_t5"]
        assert 1 <= len(t5) <= 2 and m["text_augment_all"] == m["text"] + t5
        assert not any(w in GENDERED_WORDS for c in t5 for w in c.lower().replace(".", " ").split()), t5
    untagged = [m for m in metas.values() if not m["tag"]]
    assert len(untagged) == 1 and "text_augment_t5" not in untagged[0]
    speech = next(m for m in tagged if m["tag"] == ["Male speech, man speaking"])
    assert "person speaks loudly" in speech["text_augment_t5"][0].lower()  # the learnt "a man speaks loudly", de-biased
    manifest = json.loads((out / "manifest.json").read_text())
    k2c = manifest["k2c"]
    assert k2c["model_sha256"] == model_checksum(tiny_k2c) and k2c["input"] == str(src.resolve())
    assert k2c["debiased"].get("man", 0) >= 1 and k2c["debiased"].get("woman", 0) >= 1
    assert k2c["totals"] == {"clips": 5, "captioned": 4, "no_tags": 1, "unreadable": 0}
    assert manifest["splits"]["train"]["samples"] == 4 and manifest["splits"]["eval"]["samples"] == 1
    assert f"de-biased {k2c['debiased_total']} gendered word(s)" in printed

    # Resume: a shard lost in a crash (tar written, done-record missing) is redone, the rest kept.
    first = (out / "train" / "000000.tar").read_bytes()
    (out / ".k2c" / "train" / "000001.tar.done.json").unlink()
    (out / "train" / "000001.tar").unlink()
    assert clapscale(argv) == 0
    assert _tars(out) == after and (out / "train" / "000000.tar").read_bytes() == first
    # A tar lost after its record was written (an output copied without .k2c/) is redone too.
    (out / "train" / "000001.tar").unlink()
    assert clapscale(argv) == 0
    assert _tars(out) == after
    # Other parameters into the same --out: refused, one line.
    assert clapscale(argv[:-1] + ["--num-captions", "3", "--quiet"]) == 2
    assert "another model or parameters" in capsys.readouterr().err


def test_k2c_bad_input_is_one_line_error(tiny_k2c, tmp_path, capsys):
    assert clapscale(["k2c", "--shards", str(tmp_path), "--model", str(tiny_k2c), "--out", str(tmp_path / "o")]) == 2
    assert "no <split>/*.tar" in capsys.readouterr().err
    assert clapscale(["k2c", "--shards", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    write_shards(_records([(("Dog",), "x")], "d"), tmp_path / "set", "train")
    assert clapscale(["k2c", "--shards", str(tmp_path / "set"), "--model", str(tiny_k2c), "--out", str(tmp_path / "set")]) == 2
    assert "never rewritten in place" in capsys.readouterr().err
    assert clapscale(["k2c", "--shards", str(tmp_path / "set"), "--out", str(tmp_path / "o")]) == 2
    assert "--model is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training quality

def _tag_recall(tag_lists, captions):
    hits = sum(tag.lower() in cap.lower() for tags, cap in zip(tag_lists, captions) for tag in tags)
    return hits / sum(len(tags) for tags in tag_lists)


def test_trained_k2c_beats_untrained_on_held_out_tags(tmp_path):
    def records(split, n):
        for r in synthetic.generate(split, n):
            yield {**r, "audio": TONE}

    write_shards(records("train", 240), tmp_path / "syn", "train", shard_size=120)
    model_dir = tmp_path / "model"
    assert clapscale(["k2c", "--train", "--shards", str(tmp_path / "syn"), "--out", str(model_dir), "--steps", "160",
                      "--d-model", "64", "--d-ff", "128", "--train-batch-size", "32", "--lr", "3e-3", "--quiet"]) == 0
    # Held out = tag sets that never occur in training (the test split shares some sets with train).
    seen = {tuple(m["tag"]) for t in (tmp_path / "syn" / "train").glob("*.tar") for m in read_json_members(t)}
    held_out = [r for r in synthetic.generate("test", 80) if tuple(r["tag"]) not in seen]
    assert len(held_out) >= 20
    tags = [r["tag"] for r in held_out]
    refs = [[r["text"][0] for r in held_out], [r["text"][1] for r in held_out]]
    opts = GenerationOptions(num_captions=1, beams=3)

    trained = load_k2c_model(model_dir)
    cfg = K2CTrainConfig(**{k: v for k, v in json.loads((model_dir / "k2c.json").read_text())["config"].items()})
    untrained = K2CModel(new_t5(cfg, trained.tokenizer).eval(), trained.tokenizer, trained.prompt, model_dir)
    scores = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        captions = [c[0] if c else "" for c in generate_captions(model, tags, opts)]
        scores[name] = (sacrebleu.corpus_bleu(captions, refs, lowercase=True).score, _tag_recall(tags, captions))
    print(scores)
    (bleu, recall), (bleu0, recall0) = scores["trained"], scores["untrained"]
    assert bleu > bleu0 + 25 and recall > recall0 + 0.5 and recall > 0.6


@pytest.mark.slow
def test_two_ranks_write_the_same_shard_set_as_one(tiny_k2c, tmp_path):
    import socket
    import subprocess
    import sys

    from tests.test_train_runs import REPO, _env

    clips = [((t,), f"The sound of {t}") for t in ("Dog", "Rain", "Male speech, man speaking")] + [(("Dog", "Rain"), "x")]
    write_shards(_records(clips * 2, "c"), tmp_path / "src", "train", shard_size=3)  # 3 shards: 2 on rank 0, 1 on rank 1
    common = ["--shards", str(tmp_path / "src"), "--model", str(tiny_k2c), "--sample", "--num-captions", "2",
              "--batch-size", "2", "--quiet"]
    assert clapscale(["k2c", *common, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "clapscale.cli", "k2c", *common, "--out", str(tmp_path / "two")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("k2c: 8 of 8 clips captioned") == 1  # printed by rank 0 only
    assert _tars(tmp_path / "two") == _tars(tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert one["splits"] == two["splits"] and one["k2c"]["totals"] == two["k2c"]["totals"]
