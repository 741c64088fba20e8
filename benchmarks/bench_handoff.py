"""Where the webdataset loader's worker hand-off costs: CPU seconds to move decoded batches from one
DataLoader worker to the main process, per way of building and sending them, without decoding.

    .venv/bin/python benchmarks/bench_handoff.py [--batch 16] [--seconds 10] [--batches 12] [--rounds 5]

Each variant yields ``--batches`` batches of ``(batch, seconds * 48000)`` from one worker; CPU is this
process plus its finished workers (as bench_loader), median [min, max] over interleaved rounds. The
in-process row is the fill alone; ``startup`` is a pass of one empty batch (a worker's fork and exit).
  numpy_copy      float32 batch built in numpy, sent as ``torch.from_numpy`` (the loader until now:
                  pickling copies it into a fresh shared segment)
  shared          ``wds.collate_waveforms`` in the worker: built in shared memory, sent as is (kept)
  shared_ring     4 shared buffers reused round-robin: what page faults of fresh segments cost
                  (unsafe for a loader: the consumer may still hold a reused buffer; not kept)
  int16           int16 PCM sent, converted to float32 in the main process (as a CPU consumer must)
  int16_on_device int16 PCM sent, not converted here (the conversion left to the accelerator)
"""

from __future__ import annotations

import argparse
import resource
import statistics

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from clapscale.data.wds import collate_waveforms


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Batches(IterableDataset):
    def __init__(self, mode: str, batches: int, rows: int, samples: int):
        self.mode, self.batches, self.rows, self.samples = mode, batches, rows, samples

    def __iter__(self):
        wave = (0.1 * np.random.default_rng(0).standard_normal(self.samples)).astype(np.float32)
        pcm = np.round(wave * 32768).astype(np.int16)
        ring = ([torch.zeros(self.rows, self.samples).share_memory_() for _ in range(4)]
                if self.mode == "shared_ring" else [])
        for k in range(self.batches):
            if self.mode == "startup":
                yield {}
            elif self.mode in ("numpy_copy", "in_process"):
                out = np.zeros((self.rows, self.samples), np.float32)
                for i in range(self.rows):
                    out[i] = wave
                yield {"waveform": torch.from_numpy(out)}
            elif self.mode == "shared":
                yield {"waveform": collate_waveforms([wave] * self.rows)}
            elif self.mode == "shared_ring":
                out = ring[k % 4]
                buf = out.numpy()
                for i in range(self.rows):
                    buf[i] = wave
                yield {"waveform": out}
            else:
                out16 = np.zeros((self.rows, self.samples), np.int16)
                for i in range(self.rows):
                    out16[i] = pcm
                yield {"pcm": torch.from_numpy(out16)}


def one_pass(mode: str, batches: int, rows: int, samples: int) -> float:
    workers = 0 if mode == "in_process" else 1
    c0 = cpu_seconds()
    for b in DataLoader(Batches(mode, batches, rows, samples), batch_size=None, num_workers=workers):
        if mode == "int16":
            b["waveform"] = b.pop("pcm").to(torch.float32).div_(32768.0)
    return cpu_seconds() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    samples = int(args.seconds * 48000)
    modes = ["startup", "in_process", "numpy_copy", "shared", "shared_ring", "int16", "int16_on_device"]
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            cpu[m].append(one_pass(m, 1 if m == "startup" else args.batches, args.batch, samples))
    clips = args.batches * args.batch
    start = statistics.median(cpu["startup"])
    print(f"{args.batches} batches of {args.batch} x {args.seconds:g} s from one worker; CPU per pass, "
          f"median [min, max] of {args.rounds} rounds; 'per clip' leaves out the start-up")
    print(f"{'variant':<16} {'CPU s':>7} {'[min, max]':>15} {'ms per clip':>12}")
    for m in modes:
        v = sorted(cpu[m])
        med = statistics.median(v)
        per_clip = "" if m == "startup" else f"{1000 * (med - (0 if m == 'in_process' else start)) / clips:12.2f}"
        print(f"{m:<16} {med:7.3f} [{v[0]:6.3f}, {v[-1]:6.3f}] {per_clip}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
