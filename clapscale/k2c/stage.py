"""``clapscale k2c``: keyword-to-caption captions for every tagged clip of a shard set.

Output: a **new shard set** (DESIGN.md: pair-making stages never edit shards in place), the same
splits, shard names and samples as the input, each sample's FLAC (and picture, if any) copied byte
for byte and its JSON
given ``text_augment_t5`` (the de-biased K2C captions) and ``text_augment_all`` (the sample's own
captions followed by them), the fields ``data.caption`` already reads. A sidecar merged at load time
would save the copy of the audio, but every loader (webdataset, DALI, LAION's own tools) would need
to learn the merge, and a shard set could silently train without its captions when the sidecar is
missing; a self-contained set needs nothing new downstream and can be verified by ``--verify``.
Clips without tags are copied unchanged (counted as ``no_tags``).

Distributed like evaluation: rank r of W takes the input shards r, r+W, ... (whole shards, so batch
composition, and with it every caption, is the same for any world size); results are gathered,
and rank 0 writes ``manifest.json``, which records the input, the parameters, the model's checksum
and the de-biasing counts. Resumable per shard: a shard is done when its tar (written atomically)
and ``.k2c/<split>/<name>.done.json`` exist; a rerun skips done shards, and a rerun with another
model or other parameters into the same ``--out`` is refused.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clapscale.data.captions import clean_captions, normalise_tags
from clapscale.data.shardio import iter_tar_samples
from clapscale.errors import UserError
from clapscale.eval.gather import RankFailedError, gather_objects
from clapscale.k2c.debias import debias
from clapscale.k2c.model import GenerationOptions, K2CModel, generate_captions, model_checksum
from clapscale.shards.writer import MANIFEST_NAME, EncodedSample, ShardInfo, update_manifest, write_json, write_shard

STATE_DIR = ".k2c"


@dataclass
class K2CStageOptions:
    shards: Path  # input shard set: <shards>/<split>/*.tar
    out: Path
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    batch_size: int = 32
    seed: int = 0
    splits: list[str] | None = None  # None: every split
    debias: bool = True
    progress: bool = True


@dataclass
class ShardResult:
    """What one output shard's done-record holds."""

    split: str
    info: dict[str, Any]  # ShardInfo as a dict
    clips: int = 0
    captioned: int = 0
    no_tags: int = 0
    unreadable: int = 0
    debiased: dict[str, int] = field(default_factory=dict)  # word -> replacements


def input_shards(root: Path, splits: list[str] | None) -> list[tuple[str, Path]]:
    """``(split, tar)`` for every ``<root>/<split>/*.tar``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"clapscale k2c: --shards {root}: not a directory")
    found = sorted((tar.parent.name, tar) for tar in root.glob("*/*.tar"))
    if splits:
        missing = [s for s in splits if s not in {s for s, _ in found}]
        if missing:
            raise UserError(f"clapscale k2c: --splits {', '.join(missing)}: no {missing[0]}/*.tar under {root}")
        found = [(s, t) for s, t in found if s in splits]
    if not found:
        raise UserError(f"clapscale k2c: --shards {root}: no <split>/*.tar inside; give a shard set directory")
    return found


def _done_path(out: Path, split: str, name: str) -> Path:
    return out / STATE_DIR / split / f"{name}.done.json"


def _shard_seed(seed: int, split: str, name: str, batch: int) -> int:
    return zlib.crc32(f"{seed}:{split}:{name}:{batch}".encode())


def caption_shard(k2c: K2CModel, split: str, tar: Path, out_tar: Path, opts: K2CStageOptions, bar=None) -> ShardResult:
    """Read one input shard, generate K2C captions for its tagged clips in batches, write the new shard."""
    problems: list[str] = []
    samples: list[EncodedSample] = []
    for raw in iter_tar_samples(str(tar), lambda reason, where, detail: problems.append(f"{reason}: {where} {detail}")):
        if "flac" not in raw or "json" not in raw:
            problems.append(f"incomplete sample {raw['__key__']} in {tar}")
            continue
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            problems.append(f"bad JSON in sample {raw['__key__']} of {tar}")
            continue
        samples.append(EncodedSample(key=raw["__key__"], flac=raw["flac"], meta=meta, jpg=raw.get("jpg")))
    if problems and not samples:
        raise UserError(f"clapscale k2c: {tar}: no readable sample ({problems[0]})")
    result = ShardResult(split=split, info={}, clips=len(samples), unreadable=len(problems))
    debiased: Counter[str] = Counter()
    tagged = [s for s in samples if normalise_tags(s.meta)[0]]
    result.no_tags = len(samples) - len(tagged)
    for b, start in enumerate(range(0, len(tagged), opts.batch_size)):
        batch = tagged[start:start + opts.batch_size]
        captions = generate_captions(k2c, [normalise_tags(s.meta)[0] for s in batch], opts.generation,
                                     _shard_seed(opts.seed, split, tar.name, b))
        for sample, caps in zip(batch, captions):
            if opts.debias:
                fixed = []
                for c in caps:
                    c, counts = debias(c)
                    debiased.update(counts)
                    fixed.append(c)
                caps = list(dict.fromkeys(fixed))
            if caps:
                sample.meta["text_augment_t5"] = caps
                sample.meta["text_augment_all"] = clean_captions(sample.meta.get("text")) + caps
                result.captioned += 1
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.update(result.no_tags)
    info = write_shard(out_tar, samples)
    result.info = asdict(info)
    result.debiased = dict(sorted(debiased.items()))
    return result


def _plan(opts: K2CStageOptions, checksum: str, k2c: K2CModel) -> dict[str, Any]:
    return {"input": str(Path(opts.shards).resolve()), "model": str(Path(k2c.path).resolve()), "model_sha256": checksum,
            "prompt": k2c.prompt, "generation": asdict(opts.generation), "seed": opts.seed, "debias": opts.debias,
            "splits": opts.splits, "batch_size": opts.batch_size}


def run_k2c(k2c: K2CModel, opts: K2CStageOptions, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Caption this rank's shards, gather, and (rank 0) write the manifest; returns the run summary
    (the same on every rank). ``torch.distributed`` must be initialised when ``world_size > 1``."""
    from tqdm import tqdm

    opts.generation.validate()
    if opts.batch_size < 1:
        raise UserError(f"clapscale k2c: --batch-size must be >= 1, got {opts.batch_size}")
    out = Path(opts.out)
    if out.resolve() == Path(opts.shards).resolve():
        raise UserError(f"clapscale k2c: --out {out} is the input shard set; shards are never rewritten in place, "
                        "choose a new --out")
    tars = input_shards(opts.shards, opts.splits)
    checksum = model_checksum(k2c.path)
    plan = _plan(opts, checksum, k2c)
    plan_path = out / STATE_DIR / "plan.json"
    error: str | None = None
    if rank == 0:
        if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
            error = (f"--out {out} holds a K2C run with another model or parameters (see {plan_path}); "
                     "choose a new --out or delete it")
        elif (out / MANIFEST_NAME).exists() and not plan_path.exists():
            error = f"--out {out} already holds a shard set that this command did not write; choose a new --out"
        else:
            write_json(plan_path, plan)
    error = gather_objects(error, world_size)[0]
    if error:
        raise UserError(f"clapscale k2c: {error}")

    mine = tars[rank::world_size]
    # Done = its record and its tar: a tar lost after the record (copied without .k2c/) is redone.
    todo = [(s, t) for s, t in mine if not (_done_path(out, s, t.name).exists() and (out / s / t.name).exists())]
    own_error: Exception | None = None
    with tqdm(total=sum(_count(t) for _, t in todo), desc="k2c", unit="clip",
              disable=not opts.progress or rank != 0) as bar:
        try:
            for split, tar in todo:
                result = caption_shard(k2c, split, tar, out / split / tar.name, opts, bar)
                write_json(_done_path(out, split, tar.name), asdict(result))
        except Exception as e:  # noqa: BLE001 - every rank learns of it below, then it is re-raised
            if world_size == 1:
                raise
            own_error = e
    # One collective after the work: a failure on one rank stops every rank instead of leaving
    # the others waiting for it (done shards stay done; a rerun continues).
    failures = gather_objects(None if own_error is None else f"{type(own_error).__name__}: {own_error}", world_size)
    if own_error is not None:
        raise own_error
    failed = [r for r, f in enumerate(failures) if f]
    if failed:
        raise RankFailedError(failed[0], failures[failed[0]])
    summary = summarise(out, tars, plan)
    if rank == 0:
        _write_manifest(out, summary)
    gather_objects(None, world_size)  # the manifest exists on return, on every rank
    return summary


def _count(tar: Path) -> int:
    sizes = tar.parent / "sizes.json"
    if sizes.is_file():
        try:
            return int(json.loads(sizes.read_text()).get(tar.name, 0))
        except (ValueError, AttributeError):
            return 0
    return 0


def summarise(out: Path, tars: list[tuple[str, Path]], plan: dict[str, Any]) -> dict[str, Any]:
    """The run's totals from every shard's done-record (all shards must be done)."""
    per_split: dict[str, list[ShardResult]] = {}
    for split, tar in tars:
        record = json.loads(_done_path(out, split, tar.name).read_text())
        per_split.setdefault(split, []).append(ShardResult(**record))
    totals: Counter[str] = Counter()
    debiased: Counter[str] = Counter()
    for results in per_split.values():
        for r in results:
            totals.update(clips=r.clips, captioned=r.captioned, no_tags=r.no_tags, unreadable=r.unreadable)
            debiased.update(r.debiased)
    return {"plan": plan, "totals": dict(totals), "debiased": dict(sorted(debiased.items())),
            "debiased_total": sum(debiased.values()),
            "splits": {s: [asdict(r) for r in rs] for s, rs in per_split.items()}}


def _write_manifest(out: Path, summary: dict[str, Any]) -> None:
    for split, results in summary["splits"].items():
        infos = [ShardInfo(**r["info"]) for r in results]
        stats = Counter()
        for r in results:
            stats.update(captioned=r["captioned"], no_tags=r["no_tags"])
        update_manifest(out, split, infos, extra=dict(stats))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["k2c"] = {**summary["plan"], "totals": summary["totals"], "debiased": summary["debiased"],
                       "debiased_total": summary["debiased_total"]}
    write_json(out / MANIFEST_NAME, manifest)


def summary_lines(summary: dict[str, Any], out: Path) -> str:
    t = summary["totals"]
    words = ", ".join(f"{w} {n}" for w, n in summary["debiased"].items()) or "none"
    return (f"k2c: {t.get('captioned', 0)} of {t.get('clips', 0)} clips captioned into {out} "
            f"({t.get('no_tags', 0)} without tags copied unchanged; {t.get('unreadable', 0)} unreadable)\n"
            f"de-biased {summary['debiased_total']} gendered word(s): {words}\n"
            f"model sha256 {summary['plan']['model_sha256']}")

