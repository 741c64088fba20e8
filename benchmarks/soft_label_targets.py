"""How much of the soft-label targets lands off the diagonal, and where, at each temperature.

The soft-label loss (``loss.kind=soft_label``) mixes a one-hot label with ``softmax(teacher
cosines / T)`` over the batch. This measures, on a trained model's own embeddings of held-out
clips, for batches of ``--batch`` clips and a grid of T:

- ``self``: the mass the soft row keeps on the sample itself (1.0 = the soft part is one-hot);
- ``n_eff``: the effective number of targets, exp(entropy) of the row (1 = one-hot, B = uniform);
- ``same``: of the off-diagonal mass, the share on clips whose tag set equals the row's
  (the neighbours a soft label should credit; the synthetic corpus knows them);
- ``chance``: that share if the off-diagonal mass were spread uniformly (same-tag pairs / pairs).

Usage::

    python benchmarks/soft_label_targets.py --model runs/demo/model \\
        --shards 'shards/demo/valid/000000.tar::shards/demo/test/000000.tar'

The model's own learned scale (1/T at its clamp, 100 when fully trained) is printed beside the grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch


def target_stats(emb: torch.Tensor, tags: list[tuple[str, ...]], temperature: float, batch: int,
                 batches: int, seed: int) -> dict[str, float]:
    """Mean ``self``, ``n_eff``, ``same`` and ``chance`` over ``batches`` random batches of ``batch`` rows of ``emb`` (N, D)."""
    g = torch.Generator().manual_seed(seed)
    self_mass, n_eff, same, chance = [], [], [], []
    for _ in range(batches):
        idx = torch.randperm(emb.shape[0], generator=g)[:batch]
        e = emb[idx].double()
        p = torch.softmax(e @ e.T / temperature, dim=-1)
        eq = torch.tensor([[tags[i] == tags[j] for j in idx.tolist()] for i in idx.tolist()], dtype=torch.bool)
        off = ~torch.eye(len(idx), dtype=torch.bool)
        self_mass.append(p.diagonal().mean().item())
        n_eff.append(torch.exp(-(torch.xlogy(p, p)).sum(-1)).mean().item())
        off_mass = (p * off).sum(-1)
        same.append(((p * (eq & off)).sum(-1) / off_mass.clamp_min(1e-300)).mean().item())
        chance.append(((eq & off).sum(-1).double() / off.sum(-1)).mean().item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"self": mean(self_mass), "n_eff": mean(n_eff), "same": mean(same), "chance": mean(chance)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model directory (runs/<name>/model)")
    p.add_argument("--shards", required=True, help="held-out shard spec with tags")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--temperatures", default="0.01,0.02,0.05,0.07,0.1,0.2,0.5")
    args = p.parse_args()

    from clapscale.eval.embedding import embed_split
    from clapscale.features import AudioFrontend
    from clapscale.models import build_tokenizer, load_model
    from clapscale.data import build_loader

    model, cfg = load_model(args.model)
    model.eval()
    tokenizer = build_tokenizer(cfg.model.text)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=32, workers=0))
    loader = build_loader(cfg, args.shards, tokenizer=tokenizer, rank=0, world_size=1, train=False)
    with torch.inference_mode():
        es = embed_split(model, AudioFrontend(cfg.audio), tokenizer, loader, world_size=1, device="cpu",
                         with_captions=True)
    # One caption per clip for the text side: the first of each clip's captions.
    first = torch.zeros(len(es.keys), dtype=torch.long)
    for c in reversed(range(es.caption_to_audio.numel())):
        first[es.caption_to_audio[c]] = c
    sides = {"audio": es.audio.float(), "text": es.captions[first].float()}
    tags = [tuple(sorted(t)) for t in es.tags]
    scale = math.exp(min(float(model.logit_scale.detach()), math.log(cfg.model.max_logit_scale)))
    print(f"{len(tags)} clips, batches of {args.batch}; the model's own scale {scale:.1f} (T = {1 / scale:.3f})")
    # 0.01: a fully trained model's own temperature (scale at its clamp, 100).
    temperatures = [float(t) for t in args.temperatures.split(",")] + [1 / scale, 0.01]
    for side, emb in sides.items():
        off = emb @ emb.T
        off = off[~torch.eye(len(off), dtype=torch.bool)]
        print(f"\n{side}: off-diagonal cosines: median {off.median():.3f}, 90th pct {off.quantile(0.9):.3f}, "
              f"99th {off.quantile(0.99):.3f}")
        print(f"  {'T':>7} {'self':>7} {'n_eff':>7} {'same':>7} {'chance':>7}")
        for t in sorted({round(t, 4) for t in temperatures}):
            s = target_stats(emb, tags, t, args.batch, args.batches, seed=0)
            print(f"  {t:>7.3f} {s['self']:>7.3f} {s['n_eff']:>7.2f} {s['same']:>7.3f} {s['chance']:>7.3f}")


if __name__ == "__main__":
    main()
