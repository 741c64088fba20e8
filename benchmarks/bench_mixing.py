"""Realised vs configured source shares for sources with uneven shard sizes, on both backends.

    .venv/bin/python benchmarks/bench_mixing.py [--samples 4096] [--weights 0.5::0.5] [--big 512] [--small 100]

``--weights ""`` leaves data.train_weights unset (equal weights, the default).

Two sources written by the project's shard writer: "big" (4 shards of ``--big`` samples) and
"small" (4 shards of ``--small`` samples), 50 ms clips so that decoding costs nothing. Each backend's
training loader (``data.resampled: true``, ``data.train_weights = --weights``) runs until it has
yielded ``--samples`` samples; the share of each source is counted from the sample keys of the
batches (not from the loader's own counters, so the script also measures code that has none).
DALI runs with ``features="waveform"`` (the mel is irrelevant here). A backend that refuses the
configuration prints the reason instead of a share.

The binomial tolerance printed is 3 standard deviations of a share over that many samples; a
per-shard pick would instead give the big source ``w * big / (w * big + (1 - w) * small)``, which
the table prints as the "per-shard model" column.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np

from clapscale.config import load_config
from clapscale.data.specs import parse_spec
from clapscale.shards.writer import write_shards


def records(prefix: str, n: int):
    rng = np.random.default_rng(len(prefix))
    for i in range(n):
        yield {"key": f"{prefix}-{i:05d}", "audio": (0.1 * rng.standard_normal(2400)).astype(np.float32),
               "text": [f"{prefix} clip {i}"]}


def measure(backend: str, spec: str, weights: str, samples: int) -> tuple[float, int] | str:
    """(share of "big" among the samples yielded, samples counted), or the loader's refusal."""
    try:  # ConfigError is a ValueError too
        mix = [f"data.train_weights={weights}"] if weights else []
        cfg = load_config(None, [f"data.train={spec}", f"data.backend={backend}", *mix, "data.batch_size=32",
                                 "data.workers=1", "data.shuffle_buffer=256", "audio.clip_seconds=1",
                                 "audio.max_seconds=1", "audio.length_policy=pad"])
        sources = parse_spec(spec, weights)
        if backend == "dali":
            from clapscale.data.dali import DaliLoader

            loader = DaliLoader(sources, cfg.audio, cfg.data, features="waveform")
        else:
            from clapscale.data.wds import WdsLoader

            loader = WdsLoader(sources, cfg.audio, cfg.data)
    except ValueError as e:
        return f"refused: {str(e).splitlines()[0][:70]}"
    keys: list[str] = []
    while len(keys) < samples:
        for batch in loader:
            keys += batch["keys"]
            if len(keys) >= samples:
                break
    keys = keys[:samples]
    return sum(k.startswith("big-") for k in keys) / len(keys), len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--weights", default="0.5::0.5")
    ap.add_argument("--big", type=int, default=512, help="samples per shard of the big source")
    ap.add_argument("--small", type=int, default=100, help="samples per shard of the small source")
    args = ap.parse_args()
    w_big, w_small = (float(w) for w in (args.weights or "1::1").split("::"))
    want = w_big / (w_big + w_small)
    per_shard = want * args.big / (want * args.big + (1 - want) * args.small)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(records("big", 4 * args.big), root / "big", "train", shard_size=args.big)
        write_shards(records("small", 4 * args.small), root / "small", "train", shard_size=args.small)
        spec = f"{root}/big/train/{{000000..000003}}.tar::{root}/small/train/{{000000..000003}}.tar"
        print(f"sources: big = 4 shards x {args.big}, small = 4 shards x {args.small}; "
              f"weights {args.weights or 'unset (equal)'}")
        print(f"{'backend':8} {'configured big':>15} {'per-shard model':>16} {'realised big':>13} "
              f"{'realised small':>15} {'samples':>8} {'3-sigma tol':>12}")
        for backend in ("wds", "dali"):
            got = measure(backend, spec, args.weights, args.samples)
            if isinstance(got, str):
                print(f"{backend:8} {want:15.3f} {per_shard:16.3f}  {got}")
                continue
            share, n = got
            tol = 3 * math.sqrt(want * (1 - want) / n)
            print(f"{backend:8} {want:15.3f} {per_shard:16.3f} {share:13.3f} {1 - share:15.3f} {n:8d} "
                  f"{tol:12.3f}")


if __name__ == "__main__":
    main()
