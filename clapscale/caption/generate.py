"""``clapscale caption generate``: one synthetic caption per clip, written as a new shard set.

Input shards (any spec) are split over ranks by whole shards (shard ``i`` of the spec to rank
``i mod world_size``); output shard ``i`` holds the generated samples of input shard ``i``, so the
output does not depend on the number of ranks, and a rerun skips the shards already written
(resumable at shard granularity: each finished shard leaves a small ``.done/NNNNNN.json`` record).

Per clip, as in papers/clap-synthetic-captions-audioset.txt (4): clips with a tag that never
occurs in the captioner's training data are skipped (and counted), as are clips without tags;
the others get one caption by beam search (size 3; 1 = greedy) from their audio and tags. The
output sample keeps the input's FLAC bytes and JSON, with the synthetic caption as ``text`` and
the input's captions (if any) under ``original_text``. ``manifest.json`` records, per split, the
captioner's checksum, the input spec, the beam size and the counts.

This stage reads shards and a captioner and writes shards; it never imports the trainer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clapscale.caption.export import captioner_checksum, hf_tokenizer_of, load_captioner
from clapscale.caption.model import generate
from clapscale.shards.writer import EncodedSample, ShardInfo, shard_name, update_manifest, write_json, write_shard

DONE_DIR = ".done"


@dataclass
class GenerateSummary:
    written: int = 0
    skipped_unseen_tag: int = 0
    skipped_no_tag: int = 0
    unreadable: int = 0
    shards_resumed: int = 0
    unseen_tags: dict[str, int] = field(default_factory=dict)


def _read_clip(raw: dict[str, Any], cfg) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Raw tar sample -> (its JSON, the decoded sample for the front end); None when unreadable."""
    from clapscale.data.captions import normalise_tags
    from clapscale.data.policies import apply_length_policy
    from clapscale.data.wds import SkipSample, decode_audio

    try:
        meta = json.loads(raw.get("json") or b"")
        if not isinstance(meta, dict) or not raw.get("flac"):
            return None
        wave = decode_audio(raw["flac"], cfg.audio)
    except (ValueError, SkipSample):
        return None
    res = apply_length_policy(wave, cfg.audio, None)  # deterministic: the evaluation choices
    tags = normalise_tags(meta)[0]
    return meta, {"key": raw["__key__"], "waveform": res.waveform, "length": res.length, "is_longer": res.is_longer,
                  "fusion_starts": res.fusion_starts, "text": "", "all_texts": [], "tags": tags}


def _caption_shard(url: str, model, cfg, vocab, hf_tok, frontend, *, beam: int, batch_size: int,
                   device, summary: GenerateSummary, checksum: str, bar) -> list[EncodedSample]:
    from clapscale.data.shardio import iter_tar_samples
    from clapscale.data.wds import collate

    def unreadable(reason: str, where: str, detail: str) -> None:
        summary.unreadable += 1

    out: list[EncodedSample] = []
    pending: list[tuple[dict[str, Any], bytes, dict[str, Any]]] = []

    def flush() -> None:
        if not pending:
            return
        batch = collate([p[2] for p in pending])
        mel, is_longer = frontend({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        tags = vocab.tag_batch(batch["tags"], cfg.model.max_tags).to(device)
        for (meta, flac, sample), ids in zip(pending, generate(model, mel, is_longer, tags, beam=beam)):
            meta = dict(meta)
            if "text" in meta:
                meta["original_text"] = meta["text"]
            meta["text"] = [vocab.decode_caption(hf_tok, ids) or "."]
            meta["caption_source"] = f"captioner:{checksum[:16]}"
            out.append(EncodedSample(key=sample["key"], flac=flac, meta=meta))
        summary.written += len(pending)
        bar.update(len(pending))
        pending.clear()

    for raw in iter_tar_samples(url, unreadable):
        clip = _read_clip(raw, cfg)
        if clip is None:
            summary.unreadable += 1
            bar.update(1)
            continue
        meta, sample = clip
        unseen = [t for t in sample["tags"] if not vocab.has_tag(t)]
        if not sample["tags"] or unseen:
            if unseen:
                summary.skipped_unseen_tag += 1
                for t in unseen:
                    summary.unseen_tags[t] = summary.unseen_tags.get(t, 0) + 1
            else:
                summary.skipped_no_tag += 1
            bar.update(1)
            continue
        pending.append((meta, raw["flac"], sample))
        if len(pending) >= batch_size:
            flush()
    flush()
    return out


@torch.inference_mode()
def generate_shards(captioner: str | Path, spec: str, out_dir: str | Path, split: str, *, beam: int = 3,
                    batch_size: int = 32, rank: int = 0, world_size: int = 1, device: str = "cpu",
                    progress: bool = True) -> GenerateSummary:
    """Caption every clip of ``spec`` into ``out_dir/split``. Every rank calls it (collective at the end).

    Returns the summary over all ranks (also in ``manifest.json``).
    """
    from tqdm import tqdm

    from clapscale.data.specs import all_urls, check_shards_exist, parse_spec, shard_sizes
    from clapscale.features import AudioFrontend

    if beam < 1:
        raise ValueError(f"--beam must be >= 1 (1 = greedy), got {beam}")
    urls = all_urls(check_shards_exist(parse_spec(spec)))
    model, cfg, vocab = load_captioner(captioner)
    model = model.to(device).eval()
    checksum = captioner_checksum(Path(captioner))
    hf_tok = hf_tokenizer_of(cfg)
    frontend = AudioFrontend(cfg.audio).to(device)
    out_dir = Path(out_dir)
    done_dir = out_dir / split / DONE_DIR
    mine = [(i, u) for i, u in enumerate(urls) if i % world_size == rank]
    try:
        sizes = shard_sizes([u for _, u in mine])
        total = sum(sizes.get(u, 0) for _, u in mine)
    except Exception:  # noqa: BLE001 - the bar is only a display: no total then
        sizes, total = {}, None
    summary = GenerateSummary()
    bar = tqdm(total=total, unit="clip", disable=not progress or rank != 0, desc="caption generate")
    for i, url in mine:
        record = done_dir / f"{i:06d}.json"
        if record.is_file():
            previous = json.loads(record.read_text())
            if previous.get("captioner") == checksum and previous.get("beam") == beam and previous.get("url") == url:
                summary.shards_resumed += 1
                bar.update(sizes.get(url, 0))
                continue
        part = GenerateSummary()
        samples = _caption_shard(url, model, cfg, vocab, hf_tok, frontend, beam=beam, batch_size=batch_size,
                                 device=device, summary=part, checksum=checksum, bar=bar)
        info = write_shard(out_dir / split / shard_name(i), samples) if samples else None
        done_dir.mkdir(parents=True, exist_ok=True)
        write_json(record, {"url": url, "captioner": checksum, "beam": beam, "summary": asdict(part),
                            "shard": asdict(info) if info else None})
    bar.close()
    if world_size > 1:
        dist.barrier()
    records = [json.loads((done_dir / f"{i:06d}.json").read_text()) for i in range(len(urls))]
    for r in records:
        part = r["summary"]
        for k in ("written", "skipped_unseen_tag", "skipped_no_tag", "unreadable"):
            setattr(summary, k, getattr(summary, k) + part[k])
        for t, n in part["unseen_tags"].items():
            summary.unseen_tags[t] = summary.unseen_tags.get(t, 0) + n
    if rank == 0:
        shards = [ShardInfo(**r["shard"]) for r in records if r["shard"]]
        update_manifest(out_dir, split, shards, extra={
            "captioner": str(captioner), "captioner_sha256": checksum, "input": spec, "beam": beam,
            "written": summary.written, "skipped_unseen_tag": summary.skipped_unseen_tag,
            "skipped_no_tag": summary.skipped_no_tag, "unreadable": summary.unreadable,
        })
    if world_size > 1:
        dist.barrier()
    return summary


@torch.inference_mode()
def caption_split(captioner: str | Path, spec: str, *, beam: int = 3, batch_size: int = 32, device: str = "cpu",
                  max_clips: int = 0) -> tuple[list[str], list[str], list[list[str]], list[list[str]]]:
    """Caption the clips of ``spec`` in one process (for scoring): ``(keys, captions, references, tags)``.

    Every readable clip with captions is captioned (no tag filter: a held-out split is scored whole;
    tags outside the vocabulary are simply not given as guidance). ``max_clips`` > 0 stops early.
    """
    from clapscale.data.captions import clean_captions
    from clapscale.data.shardio import iter_tar_samples
    from clapscale.data.specs import all_urls, check_shards_exist, parse_spec
    from clapscale.data.wds import collate
    from clapscale.features import AudioFrontend

    model, cfg, vocab = load_captioner(captioner)
    model = model.to(device).eval()
    hf_tok = hf_tokenizer_of(cfg)
    frontend = AudioFrontend(cfg.audio).to(device)
    keys, hyps, refs, tags = [], [], [], []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if pending:
            batch = collate(pending)
            mel, is_longer = frontend({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
            ids = generate(model, mel, is_longer, vocab.tag_batch(batch["tags"], cfg.model.max_tags).to(device), beam=beam)
            hyps.extend(vocab.decode_caption(hf_tok, i) for i in ids)
            pending.clear()

    for url in all_urls(check_shards_exist(parse_spec(spec))):
        for raw in iter_tar_samples(url, lambda *a: None):
            clip = _read_clip(raw, cfg)
            if clip is None or not clean_captions(clip[0].get("text")):
                continue
            meta, sample = clip
            keys.append(sample["key"])
            refs.append(clean_captions(meta.get("text")))
            tags.append(sample["tags"])
            pending.append(sample)
            if len(pending) >= batch_size:
                flush()
            if max_clips and len(keys) >= max_clips:
                break
        if max_clips and len(keys) >= max_clips:
            break
    flush()
    return keys, hyps, refs, tags
