"""`clapscale curate`: make an Improvement-Set (DU, DS or ADS) with a teacher CLAP.

Runs on one process or under torchrun / srun (every rank takes its share of the shards; the output
is the same for any number of ranks). A rerun with the same parameters and ``--out`` resumes: the
shards already done are skipped.
"""

from __future__ import annotations

import argparse
import os

from clapscale.curate.run import STRATEGIES, CurateParams, Curator, format_summary


def _labels(arg: str | None) -> list[str]:
    from clapscale.errors import UserError
    from clapscale.eval.cli import _read_labels
    from clapscale.eval.zeroshot import check_label_set

    if arg is None:
        return []
    try:
        return check_label_set(_read_labels(arg) or [])
    except ValueError as e:
        raise UserError(str(e)) from e


def curate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clapscale curate",
        description="Align unpaired audio with captions using a teacher CLAP and write the confident pairs as a "
        "new shard set (papers/clap-unsupervised-curation-soft-labels.txt). DU: wild audio x all pool captions; "
        "DS: the pool pairs whose caption is close to a downstream label; ADS: wild audio x DS's captions.",
    )
    p.add_argument("--teacher", required=True, help="exported model dir, trainer checkpoint dir or run dir")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--pool", required=True, help="shard spec of the teacher's training pairs (the caption pool)")
    p.add_argument("--wild", default="", help="shard spec of the unpaired audio (DU, ADS); its captions are ignored")
    p.add_argument("--labels", help="DS/ADS downstream labels: a,b,c or @file")
    p.add_argument("--label-shards", default="", help="DS/ADS: take the labels from these shards' tags instead")
    p.add_argument("--sigma", type=float, default=0.7, help="DU/ADS audio-caption cosine threshold (default 0.7)")
    p.add_argument("--top-k", type=int, default=1, help="DU/ADS: at most this many captions per clip (default 1)")
    p.add_argument("--ds-threshold", type=float, default=0.65,
                   help="DS/ADS caption-label cosine threshold (paper: 0.6-0.75; default 0.65)")
    p.add_argument("--ds-top-k", type=int, default=0, help="DS/ADS: at most this many captions per label (0: no cap)")
    p.add_argument("--template", action="append", help="label prompt with {label} (default: the teacher's eval.templates)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="loader workers for the wild audio (0 or 1)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output directory (a new shard set; rerun to resume)")
    args = p.parse_args(argv)

    from clapscale.eval.cli import check_writable
    from clapscale.eval.gather import command_ranks
    from clapscale.models.loading import load_trained_model

    params = CurateParams(
        strategy=args.strategy, pool=args.pool, wild=args.wild, labels=_labels(args.labels),
        label_shards=args.label_shards, sigma=args.sigma, top_k=args.top_k, ds_threshold=args.ds_threshold,
        ds_top_k=args.ds_top_k, templates=args.template or [], batch_size=args.batch_size, workers=args.workers,
    ).validate()
    check_writable(os.path.join(args.out, "params.json"), "--out")
    model, cfg = load_trained_model(args.teacher)
    with command_ranks(args.device) as (rank, world_size, device):
        summary = Curator(model, cfg, params, args.out, teacher_path=args.teacher, rank=rank,
                          world_size=world_size, device=device).run()
    if rank == 0:
        print(format_summary(summary))
        print(f"wrote {args.out} (manifest.json, summary.txt, {summary['counts']['kept_clips']} samples under train/)")
    return 0
