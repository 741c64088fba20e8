"""Evaluation bytes read per rank vs world size, and epoch-mode resume cost vs position in the epoch.

    .venv/bin/python benchmarks/bench_eval_io.py [--clips 512] [--shard-size 16] [--seconds 2] [--buffer 64]

Bytes are the kernel's count of what the process read (``rchar`` of ``/proc/self/io``), measured
around the loader alone with ``data.workers=0`` (the reads happen in this process), so the figures
need nothing from the loader itself and the script measures older versions of the code the same way.

(1) Evaluation: for world sizes 1, 2, 4 the evaluation loader of every rank is run in turn (a rank's
    loader needs no process group); printed: bytes read per rank (mean, max), the sum over ranks as a
    multiple of the shard bytes on disk.
(2) Resume (``data.resampled: false``, shuffle buffer ``--buffer``): a loader is stopped after a fraction of
    the epoch, its ``state_dict`` loaded into a fresh loader, and the time and bytes up to that
    loader's first batch are printed, beside the time of the first batch of a fresh epoch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_loader import make_shards  # benchmarks/ is on sys.path when a benchmark runs as a script

from clapscale.config import load_config
from clapscale.data import build_loader



def rchar() -> int:
    """Bytes this process has read through read() calls so far (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def eval_io(spec: str, data_bytes: int) -> None:
    cfg = load_config(None, [f"data.val={spec}", "data.workers=0", "data.batch_size=32"])
    print("(1) evaluation bytes read per rank")
    print(f"{'ranks':>5} {'per rank (mean MB)':>19} {'max MB':>8} {'sum / data':>11} {'clips':>6}")
    for world in (1, 2, 4):
        reads, clips = [], 0
        for rank in range(world):
            loader = build_loader(cfg, spec, rank=rank, world_size=world, train=False)
            before = rchar()
            clips += sum(len(b["keys"]) for b in loader)
            reads.append(rchar() - before)
        print(f"{world:>5} {np.mean(reads) / 1e6:>19.2f} {max(reads) / 1e6:>8.2f} "
              f"{sum(reads) / data_bytes:>11.2f} {clips:>6}")


def resume_cost(spec: str, batch: int, buffer: int) -> None:
    cfg = load_config(None, [f"data.train={spec}", "data.workers=0", f"data.batch_size={batch}",
                             "data.resampled=false", f"data.shuffle_buffer={buffer}", "audio.length_policy=pad"])
    per_epoch = len(build_loader(cfg, spec))
    print(f"(2) epoch-mode resume, {per_epoch} batches of {batch} per epoch, shuffle buffer {buffer}: "
          "time and bytes to the first batch")
    print(f"{'position':>8} {'batches':>7} {'seconds':>8} {'MB read':>8}")
    for frac in (0.0, 0.25, 0.5, 0.75, 0.95):
        stop = int(frac * per_epoch)
        first = build_loader(cfg, spec)
        if stop:
            for n, _ in enumerate(first, 1):
                if n == stop:
                    break
        resumed = build_loader(cfg, spec)
        resumed.load_state_dict(first.state_dict())
        t0, b0 = time.perf_counter(), rchar()
        next(iter(resumed))
        seconds, read = time.perf_counter() - t0, rchar() - b0
        print(f"{frac:>8.0%} {stop:>7} {seconds:>8.2f} {read / 1e6:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--buffer", type=int, default=64, help="data.shuffle_buffer for the resume runs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shards", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.shards or Path(tmp)
        spec = make_shards(out, args.clips, args.seconds, args.shard_size)
        data_bytes = sum(f.stat().st_size for f in (out / "bench").glob("*.tar"))
        print(f"{args.clips} clips of {args.seconds:g} s in shards of {args.shard_size}: {data_bytes / 1e6:.1f} MB")
        eval_io(spec, data_bytes)
        resume_cost(spec, args.batch, args.buffer)


if __name__ == "__main__":
    main()
