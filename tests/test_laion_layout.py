"""Shards exactly as LAION publishes them (``laion_layout``: nested PAX members in shuffled order,
``0.tar, 1.tar, ...``, ``sizes.json``, no ``.idx``, ``text`` a string or a list):

- ``clapscale shards index`` writes the same index as DALI's own ``wds2idx`` (the reference), for
  member names with dotted directories and names longer than a ustar header holds;
- after that one command, both backends read the same samples, keys and captions, and DALI without
  it stops with a message naming the command;
- a short real training run through the trainer CLI trains and evaluates on each backend.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clapscale.data import build_loader
from clapscale.shards.cli import main as shards_main
from clapscale.shards.index import index_tar, split_member_name
from clapscale.shards.synthetic import generate
from laion_layout import PROCESSED, laion_spec, write_laion_split
from test_data_common import make_cfg

REPO = Path(__file__).resolve().parents[1]


def _clips(split: str, n: int, seed: int) -> list[dict]:
    return [{"audio": r["audio"], "text": r["text"]} for r in generate(split, n, seed=seed)]


@pytest.fixture(scope="module")
def laion(tmp_path_factory) -> dict[str, Path]:
    """A LAION-layout set: train (24 clips, 3 shards) and valid (6 clips, 2 shards), never indexed."""
    root = tmp_path_factory.mktemp("laion-layout")
    return {
        "root": root,
        "train": write_laion_split(root, "clotho", "train", _clips("train", 24, 5), per_shard=8, seed=1),
        "valid": write_laion_split(root, "clotho", "valid", _clips("valid", 6, 5), per_shard=3, seed=2),
    }


def _indexed_copy(laion: dict[str, Path], dst: Path) -> dict[str, Path]:
    """The set copied to ``dst`` and indexed with the documented command (the module's copy stays bare)."""
    shutil.copytree(laion["root"] / "laion", dst / "laion")
    assert shards_main(["index", str(dst / "laion")]) == 0
    return {s: dst / "laion" / "clotho" / s for s in ("train", "valid")}


def test_fixture_has_laion_layout(laion):
    train = laion["train"]
    assert sorted(p.name for p in train.iterdir()) == ["0.tar", "1.tar", "2.tar", "sizes.json"]
    assert json.loads((train / "sizes.json").read_text()) == {"0.tar": 8, "1.tar": 8, "2.tar": 8}
    raw = (train / "0.tar").read_bytes()
    with tarfile.open(train / "0.tar") as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert all(n.startswith(str(laion["root"] / PROCESSED).lstrip("/")) for n in names)
    assert [n.rsplit(".", 1)[1] for n in names[:4]] == ["flac", "json", "flac", "json"]
    numbers = [int(n.rsplit("/", 1)[1].split(".")[0]) for n in names[::2]]
    assert numbers != sorted(numbers)  # shuffled
    assert all(m.pax_headers for m in members)  # PAX extended headers, as Python writes by default
    assert raw[257:263] == b"ustar\0"  # POSIX, not GNU


def test_index_equals_dali_wds2idx(laion, tmp_path):
    """Our index of LAION-layout tars equals the one DALI's own wds2idx writes (GNU tar parses the
    PAX headers), including a member whose name is longer than 100 characters."""
    wds2idx = shutil.which("wds2idx", path=str(Path(sys.executable).parent))
    if wds2idx is None or shutil.which("tar") is None:
        pytest.fail("DALI's wds2idx and GNU tar are both installed in CI; one is missing here")
    long_dir = tmp_path / ("d" * 60) / "x.y"
    write_laion_split(long_dir, "s", "train", _clips("train", 2, 9), per_shard=2)
    tars = sorted(laion["train"].glob("*.tar")) + [long_dir / "laion" / "s" / "train" / "0.tar"]
    with tarfile.open(tars[-1]) as tf:
        assert any(len(m.name) > 100 and "path" in m.pax_headers for m in tf.getmembers())
    for tar in tars:
        ref = tmp_path / "ref.idx"
        subprocess.run([wds2idx, str(tar), str(ref)], check=True, capture_output=True, timeout=60)
        assert index_tar(tar).text() == ref.read_text(), tar


def test_member_names_split_at_the_basenames_first_dot():
    assert split_member_name("mnt/processed.v2/clotho/12.flac") == ("mnt/processed.v2/clotho/12", "flac")
    assert split_member_name("a/b.c/k.seg1.JSON") == ("a/b.c/k", "seg1.json")
    assert split_member_name("a.b/noext") == ("a.b/noext", "")


def test_index_command(laion, tmp_path, capsys):
    sets = _indexed_copy(laion, tmp_path)
    tars = sorted(sets["train"].glob("*.tar")) + sorted(sets["valid"].glob("*.tar"))
    assert all(t.with_suffix(".idx").is_file() for t in tars)
    assert "indexed 5 shard(s), 30 samples" in capsys.readouterr().out
    # Existing indexes are kept unless --force; an interrupted run is finished by rerunning.
    (sets["train"] / "1.idx").unlink()
    (sets["train"] / "0.idx").write_text("stale")
    assert shards_main(["index", str(tmp_path / "laion")]) == 0
    assert "indexed 1 shard(s), 8 samples; 4 already had an index" in capsys.readouterr().out
    assert (sets["train"] / "0.idx").read_text() == "stale"
    assert shards_main(["index", "--force", str(sets["train"] / "0.tar")]) == 0
    assert (sets["train"] / "0.idx").read_text() == index_tar(sets["train"] / "0.tar").text()
    # A truncated download: the complete samples are indexed, the command says so and exits 1.
    data = (sets["valid"] / "1.tar").read_bytes()
    (sets["valid"] / "1.tar").write_bytes(data[: len(data) // 2])
    assert shards_main(["index", "--force", str(sets["valid"])]) == 1
    err = capsys.readouterr().err
    assert f"{sets['valid'] / '1.tar'}: the file ends inside a sample" in err
    assert (sets["valid"] / "1.idx").read_text().startswith("v1.2 1\n")
    # Not a tar, nothing to index, a path that does not exist: one line each, no traceback.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "0.tar").write_bytes(b"not a tar" * 100)
    assert shards_main(["index", str(tmp_path / "junk")]) == 1
    assert "0.tar: not a readable tar" in capsys.readouterr().err
    assert shards_main(["index", str(tmp_path / "junk" / "none")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "junk")
    (tmp_path / "junk").mkdir()
    assert shards_main(["index", str(tmp_path / "junk")]) == 2
    assert "no *.tar under" in capsys.readouterr().err


def test_index_refuses_member_names_with_whitespace(tmp_path, capsys):
    """The index is whitespace-separated (DALI reads `ext offset size name` groups): a member path with a
    space would be mis-read as the next field, so the shard is refused with what to do instead."""
    split = write_laion_split(tmp_path / "my data", "s", "train", _clips("train", 2, 9), per_shard=2)
    assert shards_main(["index", str(split)]) == 1
    err = capsys.readouterr().err
    assert "0.tar: member" in err and "has whitespace in its name" in err and "data.backend=wds" in err
    assert not (split / "0.idx").exists()


def test_index_is_documented_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        shards_main(["index", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "clapscale shards index" in out and "LAION" in out and "--force" in out
    with pytest.raises(SystemExit):
        shards_main(["--help"])
    assert "make_shards.py index" in capsys.readouterr().out


def _eval_batches(spec: str, backend: str) -> list[dict]:
    cfg = make_cfg(spec, f"data.backend={backend}", "data.batch_size=5", "data.workers=1")
    loader = build_loader(cfg, cfg.data.train, train=False)
    batches = list(loader)
    assert loader.skipped == {}
    return batches


def test_both_backends_read_laion_shards_alike(laion, tmp_path):
    pytest.importorskip("nvidia.dali")
    spec = laion_spec(laion["train"])
    with pytest.raises(FileNotFoundError, match="clapscale shards index"):
        _eval_batches(spec, "dali")
    sets = _indexed_copy(laion, tmp_path)
    spec = laion_spec(sets["train"])
    wds, dali = _eval_batches(spec, "wds"), _eval_batches(spec, "dali")
    keys = [k for b in wds for k in b["keys"]]
    assert sorted(keys, key=int) == [str(i) for i in range(24)]  # the basename, as LAION numbers its files
    assert [k for b in dali for k in b["keys"]] == keys
    for field in ("texts", "all_texts"):
        assert [t for b in dali for t in b[field]] == [t for b in wds for t in b[field]], field
    assert all(isinstance(t, str) and t for b in wds for t in b["texts"])
    assert torch.equal(torch.cat([b["lengths"] for b in dali]), torch.cat([b["lengths"] for b in wds]))


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_stereo_clip_that_cancels_is_skipped_as_silent(tmp_path, backend):
    """A stereo clip whose channels are phase-inverted is silence after the loaders' downmix: skipped
    and counted as ``silent`` (make_shards rejects such a clip with the same code), not trained on."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    clips = _clips("train", 4, 7)
    wave = np.asarray(clips[1]["audio"], dtype=np.float32)
    clips[1]["audio"] = np.stack([wave, -wave], axis=1)
    split = write_laion_split(tmp_path, "stereo", "train", clips, per_shard=4)
    assert shards_main(["index", str(split)]) == 0
    cfg = make_cfg(laion_spec(split), f"data.backend={backend}", "data.batch_size=4", "data.workers=1")
    loader = build_loader(cfg, cfg.data.train, train=False)
    keys = sorted(k for b in loader for k in b["keys"])
    assert keys == ["0", "2", "3"]
    assert loader.skipped == {"silent": 1}


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:5]} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_laion_shards_train_and_evaluate(laion, tmp_path, backend):
    """The user's path: index once, train a few steps with periodic and final evaluation on the
    LAION valid split, then `clapscale eval` the exported model on it."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from test_inference import _tiny_text_dir

    sets = _indexed_copy(laion, tmp_path)
    text = _tiny_text_dir(tmp_path / "text")
    _run([
        sys.executable, "-m", "clapscale.cli", "train", str(REPO / "configs" / "tiny.yaml"),
        f"data.train={laion_spec(sets['train'])}", f"data.val={laion_spec(sets['valid'])}",
        f"data.backend={backend}", "data.batch_size=4", "data.workers=1", "eval.batch_size=4",
        f"model.text.path={text}", "model.text.pretrained=false", "model.embed_dim=64",
        "train.steps=3", "train.checkpoint_every=3", "train.eval_every=2", "train.log_every=1",
        f"train.out_dir={tmp_path}/runs", "train.name=laion",
    ], tmp_path)
    run = tmp_path / "runs" / "laion"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 3]
    assert not any(r.get("skipped_samples") for r in records)
    final = evals[-1]["eval"]
    assert "retrieval/t2a/R@1" in final and "retrieval/a2t/mAP@10" in final, final
    out = tmp_path / "eval.json"
    _run([sys.executable, "-m", "clapscale.cli", "eval", "--checkpoint", str(run / "model"),
          "--shards", laion_spec(sets["valid"]), "--task", "retrieval", "--device", "cpu",
          "--set", f"data.backend={backend}", "--out", str(out)], tmp_path)
    got = {f"{r['task']}/{k}": v for r in json.loads(out.read_text())["results"] for k, v in r["metrics"].items()}
    assert "retrieval/t2a/R@1" in got
    for k, v in got.items():  # the exported model scores what the trainer logged at its last step
        assert v == pytest.approx(final[k], abs=1e-6), k
