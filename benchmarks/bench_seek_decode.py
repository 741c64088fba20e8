"""Decode cost per training sample vs clip length: full decode vs seek-decoding the crop.

    .venv/bin/python benchmarks/bench_seek_decode.py [--lengths 10 30 120] [--clips 6] [--rounds 5]

For each clip length, shards of tone-plus-noise clips are written with ``bench_loader.make_shards``
and their FLAC members timed two ways on the same bytes, rounds interleaved:
  before: ``decode_audio`` (the clip up to ``audio.max_seconds``) + ``apply_length_policy``
  after:  ``wds.decode_crop`` (seek to the drawn offset, decode ``clip_samples``), as both loaders do
Times are CPU milliseconds per sample of this process (``time.process_time``: robust to a shared
machine); the ratio before / after is computed per round and printed as median [min, max].
Training draws (rand_trunc, seeds per round) so offsets are random, as in a training epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_loader import flac_members, make_shards  # benchmarks/ is on sys.path when run as a script

from clapscale.config import load_config
from clapscale.data.policies import apply_length_policy
from clapscale.data.wds import decode_audio, decode_crop


def per_sample_ms(members: list[bytes], fn, seed: int) -> float:
    t0 = time.process_time()
    for i, data in enumerate(members):
        fn(data, np.random.default_rng([seed, i]))
    return 1000.0 * (time.process_time() - t0) / len(members)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=float, nargs="+", default=[10.0, 30.0, 120.0])
    ap.add_argument("--clips", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--policy", default="rand_trunc")
    ap.add_argument("--json", default="", help="also write the table here")
    args = ap.parse_args(argv)
    cfg = load_config(None, [f"audio.length_policy={args.policy}"]).audio

    def before(data, rng):
        return apply_length_policy(decode_audio(data, cfg), cfg, rng)

    def after(data, rng):
        res = decode_crop(data, cfg, rng)
        return res if res is not None else before(data, rng)

    print(f"{args.policy}, clip {cfg.clip_seconds:g} s, max_seconds {cfg.max_seconds:g}; CPU ms per sample, "
          f"{args.clips} clips x {args.rounds} rounds")
    print(f"{'clip s':>7} {'before ms':>10} {'after ms':>9} {'ratio median [min, max]':>26}")
    table = {}
    for seconds in args.lengths:
        with tempfile.TemporaryDirectory(prefix="bench-seek-") as tmp:
            members = flac_members(make_shards(Path(tmp), args.clips, seconds, shard_size=args.clips))
        for fn in (before, after):  # warm caches
            per_sample_ms(members[:1], fn, 0)
        b, a = [], []
        for r in range(args.rounds):
            b.append(per_sample_ms(members, before, r))
            a.append(per_sample_ms(members, after, r))
        ratios = sorted(x / y for x, y in zip(b, a))
        med_b, med_a, med_r = statistics.median(b), statistics.median(a), statistics.median(ratios)
        print(f"{seconds:>7g} {med_b:>10.2f} {med_a:>9.2f} {med_r:>12.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}]")
        table[f"{seconds:g}"] = {"before_ms": med_b, "after_ms": med_a, "ratio_median": med_r,
                                 "ratio_min": ratios[0], "ratio_max": ratios[-1]}
    if args.json:
        Path(args.json).write_text(json.dumps({"policy": args.policy, "lengths": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
