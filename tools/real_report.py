#!/usr/bin/env python3
"""Evaluate a model from `make real` on both held-out sets and write one metrics.json.

- ``test``: the by-file split of the training packages (clips never trained on, same libraries);
- ``heldout``: the whole package never trained on (another game's library).

Each set gets retrieval and zero-shot (top-1, macro recall, mAP) with chance and the majority-class
baseline, printed as tables by ``clapscale eval``; ``--out`` gets ``{"test": ..., "heldout": ...}``.
"""

import argparse
import json
import sys
from pathlib import Path

from clapscale.eval.cli import eval_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/real_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the exported model (runs/real/model)")
    p.add_argument("--shards", type=Path, required=True, help="the shard set of tools/real_corpus.py")
    p.add_argument("--out", type=Path, required=True, help="metrics.json to write")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    report = {}
    for split in ("test", "heldout"):
        part = args.out.with_name(f"{args.out.stem}_{split}.json")
        print(f"\n=== {split} ===", flush=True)
        rc = eval_main(["--checkpoint", args.checkpoint, "--shards", str(args.shards / split / "*.tar"),
                        "--task", "retrieval,zeroshot", "--device", args.device, "--out", str(part)])
        if rc != 0:
            return rc
        report[split] = json.loads(part.read_text())
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
