"""``clapscale k2c``: keyword-to-caption captions for a shard set, or ``--train`` a K2C model.

Runs on one process or under torchrun (each rank captions its share of the shards).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clapscale.errors import UserError
from clapscale.eval.gather import command_ranks, default_device

EPILOG = """\
examples:
  clapscale k2c --train --shards shards/demo --out models/k2c-tiny          (a small T5 from (tags, caption) pairs)
  clapscale k2c --shards shards/audioset --model models/k2c-tiny --out shards/audioset-k2c
  torchrun --nproc_per_node 8 -m clapscale.cli k2c --shards ... --model ... --out ...
Then train with data.caption=text_augment_all on the new shard set.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clapscale k2c", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate captions from tags with a seq2seq (T5-family) model read from a local directory, "
        "de-bias them, and write a new shard set with text_augment_t5 / text_augment_all; or, with --train, train "
        "a small T5 on the (tags -> caption) pairs of captioned shards.")
    p.add_argument("--train", action="store_true", help="train a K2C model instead of generating")
    p.add_argument("--shards", type=Path, nargs="+", required=True,
                   help="input shard set (<dir>/<split>/*.tar); --train takes several")
    p.add_argument("--out", type=Path, required=True, help="new shard set directory (--train: the model directory)")
    p.add_argument("--model", type=Path, help="local seq2seq model directory (config.json, weights, tokenizer)")
    p.add_argument("--prompt", help="input template with {tags} (default: the model's k2c.json, else 'keywords: {tags}')")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("generation")
    g.add_argument("--num-captions", type=int, default=3, help="captions per clip (default 3)")
    g.add_argument("--beams", type=int, default=3, help="beam width (default 3, as the papers' captioners)")
    g.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--batch-size", type=int, default=32, help="clips per generate() call (default 32)")
    g.add_argument("--splits", nargs="+", help="only these splits (default: all)")
    g.add_argument("--no-debias", action="store_true", help="keep gendered words (see clapscale/k2c/debias.py)")
    t = p.add_argument_group("--train")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--train-batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--d-model", type=int, default=128)
    t.add_argument("--d-ff", type=int, default=256)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--num-heads", type=int, default=4)
    t.add_argument("--vocab-size", type=int, default=2000, help="upper bound of the WordPiece vocabulary trained here")
    t.add_argument("--t5-config", type=Path, help="a T5Config JSON file (replaces the size options)")
    t.add_argument("--tokenizer", type=Path, help="reuse this tokenizer directory instead of training one")
    t.add_argument("--init-from", type=Path, help="fine-tune this local seq2seq model instead of a new T5")
    t.add_argument("--split", default="train", help="split of the shard sets to train on (default train)")
    return p


def k2c_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.train:
        return _train(args)
    if args.model is None:
        raise UserError("--model is required to generate (or pass --train to train one)")
    if len(args.shards) != 1:
        raise UserError("generation takes one --shards set; run it once per set")
    return _generate(args)


def _train(args: argparse.Namespace) -> int:
    from clapscale.k2c.model import DEFAULT_PROMPT
    from clapscale.k2c.train import K2CTrainConfig, train_k2c

    cfg = K2CTrainConfig(
        d_model=args.d_model, d_ff=args.d_ff, num_layers=args.num_layers, num_heads=args.num_heads,
        vocab_size=args.vocab_size, steps=args.steps, batch_size=args.train_batch_size, lr=args.lr, seed=args.seed,
        prompt=args.prompt or DEFAULT_PROMPT, split=args.split,
        t5_config=str(args.t5_config) if args.t5_config else None,
        tokenizer=str(args.tokenizer) if args.tokenizer else None,
        init_from=str(args.init_from) if args.init_from else None,
        warmup=min(100, max(args.steps // 10, 1)),
    )
    result = train_k2c(args.shards, args.out, cfg, device=default_device(args.device), progress=not args.quiet)
    print(f"k2c --train: {result.parameters} parameters, {result.pairs} (tags, caption) pairs, "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; saved to {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from clapscale.k2c.model import GenerationOptions, load_k2c_model
    from clapscale.k2c.stage import K2CStageOptions, run_k2c, summary_lines

    with command_ranks(args.device) as (rank, world_size, device):
        k2c = load_k2c_model(args.model, device, args.prompt)
        opts = K2CStageOptions(
            shards=args.shards[0], out=args.out, batch_size=args.batch_size, seed=args.seed, splits=args.splits,
            debias=not args.no_debias, progress=not args.quiet,
            generation=GenerationOptions(num_captions=args.num_captions, beams=args.beams, sample=args.sample,
                                         top_p=args.top_p, temperature=args.temperature,
                                         max_new_tokens=args.max_new_tokens),
        )
        summary = run_k2c(k2c, opts, rank=rank, world_size=world_size)
    if rank == 0:
        print(summary_lines(summary, args.out))
    return 0
