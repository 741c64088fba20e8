"""Remote shard specs: shards served over HTTP by a local server on 127.0.0.1 and read through a
``pipe:cat`` command read exactly like the same shards on local disk (evaluation split over ranks,
epoch-mode training, resume, nominal epochs); sample counts come from the shard set's sizes.json or
manifest.json fetched through the same opener; the trainer trains and evaluates from HTTP."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clapscale.data import build_loader
from clapscale.data.specs import ShardSpecError, parse_spec
from test_data_common import (  # noqa: F401 - session fixtures
    CLEAN_SHARDS,
    clean_records,
    clean_shards,
    clean_spec,
    make_cfg,
)

REPO = Path(__file__).resolve().parents[1]
ALL_KEYS = sorted(r["key"] for r in clean_records())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, clean_shards):
    """A copy of the clean shard set (``train/`` + ``manifest.json``) served over HTTP on 127.0.0.1;
    yields (root dir on disk, base URL)."""
    root = tmp_path_factory.mktemp("served") / "set"
    shutil.copytree(clean_shards.parent, root)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def remote_spec(kind: str, served) -> str:
    root, base = served
    shards = f"{{000000..{CLEAN_SHARDS - 1:06d}}}.tar"
    if kind == "http":
        return f"{base}/train/{shards}"
    return f"pipe:cat {root}/train/{shards}"


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert keys_of(got) == keys_of(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["waveform"], b["waveform"])
        assert a["texts"] == b["texts"]


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_remote_spec_reads_like_local_paths(served, kind):
    spec, local = remote_spec(kind, served), clean_spec(served[0] / "train")
    over = ("data.batch_size=3", "data.workers=2", "data.shuffle_buffer=4", "audio.length_policy=rand_trunc")

    # Evaluation: the same batches on one rank; every sample once over three ranks, whose runs of
    # 5, 5 and 6 samples end inside shards (a stream left early is no truncated shard).
    cfg = make_cfg(spec, *over)
    assert_same_batches(list(build_loader(cfg, spec, train=False)), list(build_loader(cfg, local, train=False)))
    loaders = [build_loader(cfg, spec, rank=r, world_size=3, train=False) for r in range(3)]
    split = [keys_of(loader) for loader in loaders]
    assert sorted(k for part in split for k in part) == ALL_KEYS
    assert [len(part) for part in split] == [5, 5, 6] and all(not ld.skipped for ld in loaders)

    # Epoch-mode training: the same batches, sample for sample; and a resume from a saved position.
    cfg = make_cfg(spec, *over, "data.resampled=false")
    want = list(build_loader(cfg, local))
    remote = build_loader(cfg, spec)
    assert_same_batches(list(remote), want)
    assert remote.bytes_read > 0
    first = build_loader(cfg, spec)
    taken = [b for _, b in zip(range(2), first)]
    resumed = build_loader(cfg, spec)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(taken + list(resumed), want)

    # Resampled training: the nominal epoch from the fetched counts.
    cfg = make_cfg(spec, *over)
    assert len(build_loader(cfg, spec)) == len(build_loader(cfg, local)) == 16 // 3


def test_remote_counts_come_from_the_manifest_then_say_where_sizes_json_goes(served, tmp_path):
    root, base = served
    spec = remote_spec("http", served)
    cfg = make_cfg(spec, "data.batch_size=4")
    sizes = root / "train" / "sizes.json"
    moved = tmp_path / "sizes.json"
    shutil.move(sizes, moved)
    try:
        assert len(build_loader(cfg, spec)) == 4  # counts from ../manifest.json over HTTP
        manifest = root / "manifest.json"
        shutil.move(manifest, tmp_path / "manifest.json")
        try:
            with pytest.raises(ShardSpecError, match=rf"no sample count for remote shard {base}/train/000000.tar.*"
                                                     rf"{base}/train/sizes.json"):
                build_loader(cfg, spec)
        finally:
            shutil.move(tmp_path / "manifest.json", manifest)
    finally:
        shutil.move(moved, sizes)
    assert json.loads(sizes.read_text())["000000.tar"] == 4


def test_dali_refuses_remote_specs_with_a_clear_error(served):
    from clapscale.data.dali import DaliLoader

    spec = remote_spec("pipe", served)
    cfg = make_cfg(spec, "data.backend=dali")
    with pytest.raises(ShardSpecError, match="data.backend=dali reads local files only.*use data.backend=wds"):
        DaliLoader(parse_spec(spec), cfg.audio, cfg.data)


@pytest.mark.slow
def test_trainer_trains_and_evaluates_from_http(served, tmp_path):
    """The real trainer (one process, DeepSpeed on CPU) on HTTP shards: trains, then evaluates its
    HTTP validation split at the end."""
    _, base = served
    train, val = remote_spec("http", served), f"{base}/train/{{000002..000003}}.tar"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "clapscale.train.cli", "configs/tiny.yaml", f"data.train={train}",
         f"data.val={val}", f"train.out_dir={tmp_path}", "train.name=remote", "data.batch_size=4",
         "data.workers=1", "train.steps=2", "train.eval_every=0", "train.log_every=1", "eval.batch_size=4",
         "model.embed_dim=64"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in (tmp_path / "remote" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "event" not in r] == [1, 2]
    evals = [r["eval"] for r in records if "eval" in r]
    assert evals and "retrieval/t2a/R@1" in evals[-1], records
