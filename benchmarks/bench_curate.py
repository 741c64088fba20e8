"""Curation rate: the chunked audio x caption top-k, in (clip, caption) pairs per second.

    .venv/bin/python benchmarks/bench_curate.py                       # CPU, 2048 clips x 32768 captions
    .venv/bin/python benchmarks/bench_curate.py --device cuda --clips 65536 --captions 131072

Prints the measured rate and what it implies for the paper's scale (1.9M AudioSet clips x 128k
captions). The similarity stage is one of two costs: the clips must also be embedded by the
teacher's audio tower once each (`clapscale curate` prints the clips/s of a real run), and the
captions once each (128k, minutes).
"""

from __future__ import annotations

import argparse
import time

import torch

from clapscale.curate.similarity import topk_cosine

PAPER_CLIPS, PAPER_CAPTIONS = 1_900_000, 128_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=2048)
    p.add_argument("--captions", type=int, default=32768)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(args.clips, args.dim, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(args.captions, args.dim, generator=g), dim=1).to(args.device)
    topk_cosine(q[:64], k, args.top_k, device=args.device)  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        topk_cosine(q, k, args.top_k, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    pairs = args.clips * args.captions
    rate = pairs / best
    paper_h = PAPER_CLIPS * PAPER_CAPTIONS / rate / 3600
    print(f"device {args.device}, threads {torch.get_num_threads()}: {args.clips} clips x {args.captions} captions "
          f"(D={args.dim}, top-{args.top_k}) in {best:.2f} s = {rate:.3g} pairs/s "
          f"({2 * pairs * args.dim / best / 1e9:.1f} GFLOP/s)")
    print(f"similarity stage at the paper's scale ({PAPER_CLIPS:,} x {PAPER_CAPTIONS:,}): {paper_h:.2f} h at this rate")


if __name__ == "__main__":
    main()
