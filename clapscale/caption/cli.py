"""``clapscale caption train|generate|score``.

- ``train CONFIG [a.b=c ...]``: one process, or under ``torchrun`` / ``srun`` (launch/) like
  ``clapscale train``; writes ``runs/<name>/captioner``.
- ``generate --captioner DIR --shards SPEC --out DIR``: one process or under ``torchrun`` (ranks
  split the shards); resumable; a new shard set with the synthetic captions.
- ``score --captioner DIR --shards SPEC``: BLEU-4, ROUGE-L and tag recall on a held-out split
  (one process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_USAGE = "usage: clapscale caption {train,generate,score} ...  (`clapscale caption COMMAND --help`)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    commands = {"train": train_main, "generate": generate_main, "score": score_main}
    if argv[0] not in commands:
        print(f"clapscale caption: unknown command {argv[0]!r}\n{_USAGE}", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clapscale caption train",
                                description="Train the tag-guided captioner (torchrun / srun for several ranks).")
    p.add_argument("config", help="YAML recipe, e.g. configs/caption/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    args = p.parse_args(argv)
    from clapscale.caption.config import load_caption_config
    from clapscale.caption.train import CaptionTrainer

    cfg = load_caption_config(args.config, args.overrides)
    trainer = CaptionTrainer(cfg)
    out = trainer.train()
    if out is None:  # SIGTERM / SIGUSR1: checkpoint written; ask launch/pretrain.sh to requeue
        from clapscale.train.cli import EXIT_REQUEUE
        from clapscale.train.distributed import request_requeue

        request_requeue(trainer.denv)
        if trainer.denv.is_main:
            print(f"clapscale caption train: stopped by signal at step {trainer.step}; rerun (or requeue) "
                  "to resume from its checkpoint", flush=True)
        return EXIT_REQUEUE
    if trainer.denv.is_main:
        print(f"clapscale caption train: done at step {trainer.step}; captioner {out}", flush=True)
    return 0


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clapscale caption generate",
                                description="Caption every clip of a shard set (with tags) into a new shard set.")
    p.add_argument("--captioner", required=True, help="runs/<name>/captioner of `clapscale caption train`")
    p.add_argument("--shards", required=True, help="input shard spec")
    p.add_argument("--out", required=True, help="output shard set directory")
    p.add_argument("--split", default="train", help="output split name (default: train)")
    p.add_argument("--beam", type=int, default=3, help="beam size (default 3; 1 = greedy)")
    p.add_argument("--greedy", action="store_true", help="same as --beam 1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import torch

    from clapscale.caption.generate import generate_shards

    # torchrun sets RANK / WORLD_SIZE; srun (launch/pretrain.sh) sets SLURM_PROCID / SLURM_NTASKS
    # and pretrain.sh exports MASTER_ADDR / MASTER_PORT.
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    device = _device(args.device)
    if world_size > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world_size)
    try:
        summary = generate_shards(args.captioner, args.shards, args.out, args.split, beam=1 if args.greedy else args.beam,
                                  batch_size=args.batch_size, rank=rank, world_size=world_size, device=device,
                                  progress=not args.no_progress)
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        print(f"clapscale caption generate: wrote {summary.written} captions to {args.out}/{args.split}; skipped "
              f"{summary.skipped_unseen_tag} clips with tags unseen by the captioner, {summary.skipped_no_tag} "
              f"without tags, {summary.unreadable} unreadable")
    return 0


def score_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clapscale caption score",
                                description="BLEU-4, ROUGE-L and tag recall of a captioner on a held-out split.")
    p.add_argument("--captioner", required=True)
    p.add_argument("--shards", required=True, help="held-out shard spec (clips with captions)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-clips", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--out", help="write the metrics (and the captions) as JSON here")
    args = p.parse_args(argv)
    from clapscale.caption.generate import caption_split
    from clapscale.caption.metrics import caption_metrics

    keys, hyps, refs, tags = caption_split(args.captioner, args.shards, beam=args.beam, batch_size=args.batch_size,
                                           device=_device(args.device), max_clips=args.max_clips)
    if not keys:
        raise ValueError(f"--shards {args.shards!r} has no clips with captions to score against")
    metrics = caption_metrics(hyps, refs, tags)
    print(json.dumps(metrics, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"metrics": metrics, "captions": dict(zip(keys, hyps))}, f, indent=1)
    return 0


if __name__ == "__main__":
    # torchrun / srun start this module directly: the same user-error rule as `clapscale caption`.
    from clapscale.errors import debug_enabled, run_command

    sys.exit(run_command("clapscale caption", main, sys.argv[1:], debug=debug_enabled()))
