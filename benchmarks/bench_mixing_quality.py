"""How mixed a training batch is, for a folder-per-class tree, with make_shards' shuffle and without.

    .venv/bin/python benchmarks/bench_mixing_quality.py [--classes 32] [--per-class 64] [--shard-size 128]
        [--batch 32] [--buffers 0,100,1000,3000] [--batches 64]

A class-clustered folder (``<class>/take_<k>.wav``, distinct 0.15 s tones) is turned into shards by
make_shards twice: with ``--no-shuffle`` (the source's sorted path order: what make_shards wrote
before it shuffled) and with its default seeded shuffle. The real webdataset training loader
(``data.resampled`` as configured by default, one worker) then reads ``--batches`` batches for each
shuffle-buffer size in ``--buffers`` (the config default is 1000), and the table gives the mean number
of distinct shards and of distinct classes (= distinct captions: the caption is the folder name plus
"take") per batch. The last row is what independent uniform draws would give: classes
``C (1 - (1 - 1/C)^B)`` and shards likewise with the shard count.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from clapscale.config import load_config
from clapscale.data import build_loader
from clapscale.shards.cli import main as make_shards

SR = 48000
WORDS = ["dog", "rain", "bell", "wind", "car", "bird", "door", "drum", "horn", "siren", "clock", "frog", "train",
         "water", "fire", "glass", "steps", "cough", "laugh", "phone", "knock", "saw", "cat", "cow", "sheep", "bee",
         "hammer", "engine", "thunder", "whistle", "piano", "guitar", "violin", "flute", "crowd", "baby", "typing",
         "keys", "wave", "crow"]


def class_tree(root: Path, classes: int, per_class: int) -> None:
    """``classes`` folders of ``per_class`` distinct tones each (distinct, so none is a duplicate)."""
    t = np.arange(int(0.15 * SR)) / SR
    for c in range(classes):
        folder = root / (WORDS[c] if c < len(WORDS) else f"{WORDS[c % len(WORDS)]}{'x' * (c // len(WORDS))}")
        folder.mkdir(parents=True)
        for k in range(per_class):
            freq = 100.0 + 13.0 * (c * per_class + k)
            sf.write(folder / f"take_{k}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR)


def key_maps(out: Path) -> tuple[dict[str, str], dict[str, str], int]:
    """key -> shard name, key -> class (the clip's folder), and the number of shards."""
    shard_of, class_of = {}, {}
    tars = sorted((out / "train").glob("*.tar"))
    for tar_path in tars:
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    key = m.name[:-5]
                    shard_of[key] = tar_path.name
                    class_of[key] = json.loads(tf.extractfile(m).read())["original"].split("/")[0]
    return shard_of, class_of, len(tars)


def mixing(out: Path, buffer: int, batch: int, batches: int) -> tuple[float, float]:
    """Mean distinct shards and distinct classes per batch of the webdataset training loader."""
    shard_of, class_of, n = key_maps(out)
    spec = f"{out}/train/{{000000..{n - 1:06d}}}.tar"
    cfg = load_config(None, [f"data.train={spec}", f"data.batch_size={batch}", "data.workers=1",
                             f"data.shuffle_buffer={buffer}", "audio.length_policy=pad"])
    loader = build_loader(cfg, spec, train=True)
    shards, classes = [], []
    while len(shards) < batches:
        for b in loader:
            shards.append(len({shard_of[k] for k in b["keys"]}))
            classes.append(len({class_of[k] for k in b["keys"]}))
            if len(shards) == batches:
                break
    return float(np.mean(shards)), float(np.mean(classes))


def expected_distinct(kinds: int, draws: int) -> float:
    return kinds * (1 - (1 - 1 / kinds) ** draws)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=32)
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--buffers", default="0,100,1000,3000")
    ap.add_argument("--batches", type=int, default=64, help="batches measured per configuration")
    args = ap.parse_args(argv)
    buffers = [int(b) for b in args.buffers.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-mixing-") as tmp:
        src = Path(tmp) / "src"
        class_tree(src, args.classes, args.per_class)
        layouts = {"sorted (--no-shuffle)": ["--no-shuffle"], "shuffled (default)": []}
        outs = {}
        for name, extra in layouts.items():
            outs[name] = Path(tmp) / name.split()[0]
            with contextlib.redirect_stdout(io.StringIO()):  # its summary would split the table
                rc = make_shards(["--from-dir", str(src), "--out", str(outs[name]), "--shard-size",
                                  str(args.shard_size), "--workers", "2", "--quiet", *extra])
            assert rc == 0, f"make_shards failed for {name}"
        n_shards = key_maps(next(iter(outs.values())))[2]
        print(f"{args.classes} classes x {args.per_class} clips = {args.classes * args.per_class} clips in "
              f"{n_shards} shards of {args.shard_size}; batch {args.batch}; mean over {args.batches} batches "
              "of the webdataset training loader")
        print(f"{'shard order':24s} {'buffer':>7s} {'shards/batch':>13s} {'classes/batch':>14s}")
        for name, out in outs.items():
            for buffer in buffers:
                shards, classes = mixing(out, buffer, args.batch, args.batches)
                print(f"{name:24s} {buffer:7d} {shards:13.1f} {classes:14.1f}")
        print(f"{'independent draws':24s} {'':>7s} {expected_distinct(n_shards, args.batch):13.1f} "
              f"{expected_distinct(args.classes, args.batch):14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
