"""The caption pool (the teacher's training captions, de-duplicated) and the DS caption selection.

Reading a pool shard set reads its JSON members only through the shard reader (audio is not
decoded); each rank reads its share of the shards and the caption sets are merged and sorted, so
the pool, and the row order of its embedding matrix, are the same for any number of ranks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from clapscale.curate.similarity import topk_cosine
from clapscale.data.captions import clean_captions, normalise_tags
from clapscale.data.shardio import iter_tar_samples
from clapscale.errors import UserError
from clapscale.eval.gather import gather_objects, gather_rows


class CurationInputError(UserError, ValueError):
    """A curation input (pool, labels, wild shards) is unusable; the message says which and why."""


def _raise_skip(reason: str, where: str, detail: str) -> None:
    raise CurationInputError(f"cannot read shard {where} ({reason}: {detail}); fix or leave it out of the spec")


def shard_metas(url: str) -> list[tuple[str, dict]]:
    """``(key, JSON metadata)`` of every sample of one shard, in file order (audio bytes not kept)."""
    out = []
    for s in iter_tar_samples(url, _raise_skip):
        if "json" not in s:
            continue
        try:
            meta = json.loads(s["json"])
        except ValueError as e:
            raise CurationInputError(f"{url}: sample {s['__key__']!r} has invalid JSON ({e})") from e
        out.append((s["__key__"], meta if isinstance(meta, dict) else {}))
    return out


def _collect(urls: Sequence[str], rank: int, world_size: int, values, empty: str) -> list[str]:
    """Collective: the sorted union of ``values(meta)`` over every sample of ``urls`` (each rank reads
    every world-size-th shard); ``CurationInputError(empty)`` when it is empty."""
    mine: set[str] = set()
    for url in urls[rank::world_size]:
        for _, meta in shard_metas(url):
            mine.update(values(meta))
    merged: set[str] = set()
    for part in gather_objects(sorted(mine), world_size):
        merged.update(part)
    if not merged:
        raise CurationInputError(empty)
    return sorted(merged)


def collect_captions(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Sorted, de-duplicated captions (JSON ``text``) of every sample of ``urls``."""
    return _collect(urls, rank, world_size, lambda meta: clean_captions(meta.get("text")),
                    f"the caption pool ({len(urls)} shard(s)) holds no caption")


def collect_tags(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Sorted set of the tags (JSON ``tag`` / ``tags``) of ``urls``: a downstream label set."""
    return _collect(urls, rank, world_size, lambda meta: normalise_tags(meta)[0],
                    f"the label shards ({len(urls)} shard(s)) carry no tag: give --labels instead")


@torch.inference_mode()
def embed_texts(
    texts: Sequence[str], encode: Callable[[list[str]], Tensor], batch_size: int, rank: int, world_size: int
) -> Tensor:
    """(len(texts), D) embeddings, each rank encoding a contiguous block of whole batches.

    Batches are cut from the global list before they are shared out, so every caption is encoded in
    the same batch (same padding, same numbers) for any number of ranks.
    """
    n_batches = -(-len(texts) // batch_size)
    lo, hi = n_batches * rank // world_size, n_batches * (rank + 1) // world_size
    parts = [encode(list(texts[b * batch_size : (b + 1) * batch_size])) for b in range(lo, hi)]
    if parts:
        local = torch.cat(parts).float()
    else:
        local = encode(["."]).float()[:0]  # the width, for the gather
    return gather_rows(local, world_size).cpu()


def select_ds_captions(
    caption_emb: Tensor, label_emb: Tensor, threshold: float, top_k: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """DS: the pool captions close to some downstream label.

    A caption is kept when its cosine to its nearest label prompt is >= ``threshold``; with
    ``top_k > 0`` only captions among some label's ``top_k`` nearest (and still >= ``threshold``).

    Args:
        caption_emb: (M, D) caption embeddings; label_emb: (L, D) label (prompt) embeddings.

    Returns:
        kept (K,) sorted caption indices; best (M,) each caption's nearest-label cosine;
        nearest (M,) its label index.
    """
    best, nearest = topk_cosine(caption_emb, label_emb, 1, device=device)
    best, nearest = best[:, 0], nearest[:, 0]
    mask = best >= threshold
    if top_k > 0:
        v, i = topk_cosine(label_emb, caption_emb, top_k, device=device)
        in_topk = torch.zeros_like(mask)
        in_topk[i[v >= threshold]] = True
        mask &= in_topk
    return torch.nonzero(mask).flatten(), best, nearest
