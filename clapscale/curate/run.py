"""The curation driver: pool -> (DS selection) -> per-shard matching -> a new shard set.

Layout of the output directory ``OUT``::

    OUT/params.json          the parameters (a rerun with other parameters is refused)
    OUT/pool/captions.json   the caption pool (sorted, de-duplicated) and the DS selection
    OUT/pool/captions.npy    its teacher text embeddings (M, D) float32, reused by a rerun
    OUT/parts/NNNNNN.json    one per input shard: counts, thresholds table, histogram, output shard
    OUT/train/NNNNNN.tar     the kept pairs of input shard NNNNNN (+ .idx), audio copied
    OUT/manifest.json        shards, parameters, teacher checksum, counts (written last)
    OUT/summary.txt          pairs kept per threshold and a histogram of similarities

Units of work are input shards (wild shards for DU/ADS, pool shards for DS); rank r takes the
units ``r::world_size``, and each unit's output depends on the unit alone, so the result is the
same (byte for byte) for any world size, and a rerun skips the units that have a part file.
Audio is copied into the new shards (not referenced by key): the set stays self-contained and
the existing loaders read it as any other shard set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clapscale.config import Config
from clapscale.curate.pool import (
    CurationInputError,
    collect_captions,
    collect_tags,
    embed_texts,
    select_ds_captions,
    shard_metas,
)
from clapscale.curate.similarity import topk_cosine
from clapscale.data.specs import all_urls, check_shards_exist, parse_spec
from clapscale.errors import UserError
from clapscale.data.captions import clean_captions
from clapscale.eval.embedding import EmptySplitError, embed_split, make_text_encoder
from clapscale.eval.zeroshot import encode_labels
from clapscale.shards.writer import EncodedSample, shard_name, update_manifest, write_json, write_shard

log = logging.getLogger(__name__)

STRATEGIES = ("du", "ds", "ads")
SPLIT = "train"
# Thresholds of the summary table (plus the run's own).
TABLE_THRESHOLDS = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
HIST_EDGES = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))


@dataclass
class CurateParams:
    """What ``clapscale curate`` is asked to do; ``validate`` names the offending option."""

    strategy: str
    pool: str  # shard spec of the teacher's training pairs (caption pool; DS selects from it)
    wild: str = ""  # shard spec of the unpaired audio (DU, ADS); its captions and tags are ignored
    labels: list[str] = field(default_factory=list)  # DS / ADS downstream labels ...
    label_shards: str = ""  # ... or the tag set of these shards
    sigma: float = 0.7  # DU / ADS audio-caption cosine threshold (paper: 0.7)
    top_k: int = 1  # DU / ADS: at most this many captions per clip
    ds_threshold: float = 0.65  # DS / ADS caption-label cosine threshold (paper: 0.6-0.75)
    ds_top_k: int = 0  # DS / ADS: > 0 keeps at most this many captions per label
    templates: list[str] = field(default_factory=list)  # label prompts; empty = the teacher's eval.templates
    batch_size: int = 64
    workers: int = 1

    def validate(self) -> "CurateParams":
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not self.pool:
            raise UserError("--pool is required: the teacher's training shards (its captions are the caption pool)")
        if self.strategy in ("du", "ads") and not self.wild:
            raise UserError(f"--strategy {self.strategy} needs --wild (the unpaired audio shards)")
        if self.strategy in ("ds", "ads") and not (self.labels or self.label_shards):
            raise UserError(f"--strategy {self.strategy} needs --labels or --label-shards (the downstream label set)")
        if self.labels and self.label_shards:
            raise UserError("give --labels or --label-shards, not both")
        for name in ("sigma", "ds_threshold"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} {v} is not a cosine in [-1, 1]")
        if self.top_k < 1:
            raise UserError(f"--top-k {self.top_k} must be >= 1")
        if self.ds_top_k < 0 or self.batch_size < 1 or self.workers < 0:
            raise UserError("--ds-top-k and --workers must be >= 0, --batch-size >= 1")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The parameters that decide the output (not batch size or workers)."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        d.pop("workers")
        return d


def teacher_checksum(path: str | Path) -> str:
    """sha256 over the teacher's files (relative names and contents, in sorted order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _threshold_counts(values: np.ndarray, own: float) -> dict[str, int]:
    grid = sorted(set(TABLE_THRESHOLDS) | {own})
    return {f"{t:.6g}": int((values >= t).sum()) for t in grid}


def _histogram(values: np.ndarray) -> list[int]:
    return np.histogram(np.clip(values, -1.0, 1.0), bins=np.asarray(HIST_EDGES))[0].astype(int).tolist()


def _r(x: float) -> float:
    return round(float(x), 6)


class Curator:
    """One rank's share of a curation run; every rank of the job calls ``run``."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        params: CurateParams,
        out: str | Path,
        *,
        teacher_path: str,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        tokenizer=None,
        progress: bool = True,
    ):
        from clapscale.features import AudioFrontend
        from clapscale.models import build_tokenizer

        self.model = model.to(device).eval()
        self.cfg = cfg
        self.params = params.validate()
        self.out = Path(out)
        self.teacher_path = teacher_path
        self.rank, self.world_size, self.device = rank, world_size, device
        self.tokenizer = tokenizer or build_tokenizer(cfg.model.text)
        self.frontend = AudioFrontend(cfg.audio).to(device)
        self.encode = make_text_encoder(self.model, self.tokenizer, device, params.batch_size)
        self.progress = progress and rank == 0

    # ------------------------------------------------------------------------------ driver

    def run(self) -> dict[str, Any]:
        """Curate; returns the manifest's ``curation`` entry (the same on every rank)."""
        from clapscale.eval.gather import gather_objects

        p = self.params
        pool_urls = self._urls(p.pool, "--pool")
        unit_urls = pool_urls if p.strategy == "ds" else self._urls(p.wild, "--wild")
        self._check_params()
        self.teacher_sha = gather_objects(teacher_checksum(self.teacher_path) if self.rank == 0 else None,
                                          self.world_size)[0]
        captions, cap_emb = self._pool(pool_urls)
        selected = np.arange(len(captions))
        ds_info: dict[str, Any] = {}
        if p.strategy in ("ds", "ads"):
            selected, ds_info = self._ds_selection(captions, cap_emb)
        self.captions = captions
        self.selected = selected
        # Kept on the device for the whole run: every wild shard is scored against it.
        self.sel_emb = cap_emb[torch.as_tensor(selected, dtype=torch.long)].to(self.device)
        self.ds_best = ds_info.pop("best", None)
        self.ds_label = ds_info.pop("nearest_label", None)
        self.labels = ds_info.get("labels", [])

        mine = [i for i in range(len(unit_urls)) if i % self.world_size == self.rank]
        todo = [i for i in mine if not self._part_path(i).is_file()]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc=f"curate {p.strategy}")
        for i in todo:
            part = self._unit_ds(i, unit_urls[i]) if p.strategy == "ds" else self._unit_align(i, unit_urls[i])
            write_json(self._part_path(i), part)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        summary = None
        if self.rank == 0:
            summary = self._finalize(unit_urls, len(captions), ds_info)
        return gather_objects(summary, self.world_size)[0]

    # ------------------------------------------------------------------------------ inputs

    def _urls(self, spec: str, flag: str) -> list[str]:
        try:
            return all_urls(check_shards_exist(parse_spec(spec)))
        except ValueError as e:
            raise CurationInputError(f"{flag}: {e}") from e

    def _check_params(self) -> None:
        path = self.out / "params.json"
        want = self.params.fingerprint()
        if path.is_file():
            have = json.loads(path.read_text())
            if have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise UserError(
                    f"--out {self.out} holds a curation with other parameters ({', '.join(diff)}): "
                    "use a new --out directory, or rerun with the same parameters to resume"
                )
        elif self.rank == 0:
            write_json(path, want)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _pool(self, pool_urls: list[str]) -> tuple[list[str], torch.Tensor]:
        cache_json, cache_npy = self.out / "pool" / "captions.json", self.out / "pool" / "captions.npy"
        if cache_json.is_file() and cache_npy.is_file():
            captions = json.loads(cache_json.read_text())["captions"]
            return captions, torch.from_numpy(np.load(cache_npy))
        captions = collect_captions(pool_urls, self.rank, self.world_size)
        emb = embed_texts(captions, self.encode, self.params.batch_size, self.rank, self.world_size)
        if self.rank == 0:
            # The matrix first: a captions.json always has its embeddings beside it.
            tmp = cache_npy.with_name(".captions.npy.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, emb.numpy())
            tmp.replace(cache_npy)
            write_json(cache_json, {"captions": captions})
        return captions, emb

    def _ds_selection(self, captions: list[str], cap_emb: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
        p = self.params
        labels = list(p.labels) or collect_tags(self._urls(p.label_shards, "--label-shards"), self.rank, self.world_size)
        templates = list(p.templates) or list(self.cfg.eval.templates)
        with torch.inference_mode():
            label_emb = encode_labels(self.encode, labels, templates).cpu()
        kept, best, nearest = select_ds_captions(cap_emb, label_emb, p.ds_threshold, p.ds_top_k, self.device)
        if kept.numel() == 0:
            raise CurationInputError(
                f"DS kept no caption: no pool caption is within cosine {p.ds_threshold} of a label prompt "
                f"(best {float(best.max()):.3f}); lower --ds-threshold"
            )
        info = {"labels": labels, "templates": templates, "pool_captions_kept": int(kept.numel()),
                "best": best, "nearest_label": nearest,
                "caption_label_similarity": {
                    "at_threshold": _threshold_counts(best.numpy(), p.ds_threshold),
                    "histogram": _histogram(best.numpy())}}
        return kept.numpy(), info

    # ------------------------------------------------------------------------------ units

    def _part_path(self, i: int) -> Path:
        return self.out / "parts" / shard_name(i).replace(".tar", ".json")

    def _unit_align(self, i: int, url: str) -> dict[str, Any]:
        """DU / ADS on one wild shard: embed its clips, match them with the (selected) captions."""
        from clapscale.data import build_loader

        p = self.params
        # The CPU loader: a curation reads each wild shard once, in key order, with no random crop.
        data = dataclasses.replace(self.cfg.data, batch_size=p.batch_size, workers=min(p.workers, 1), backend="wds")
        cfg = dataclasses.replace(self.cfg, data=data)
        loader = build_loader(cfg, url, rank=0, world_size=1, train=False)
        try:
            es = embed_split(self.model, self.frontend, None, loader, world_size=1, device=self.device,
                             with_captions=False)
            keys, audio = es.keys, es.audio
        except EmptySplitError:  # an empty or wholly unreadable shard: nothing to match
            keys, audio = [], torch.zeros(0, self.sel_emb.shape[1])
        vals, idx = topk_cosine(audio, self.sel_emb, p.top_k, device=self.device)
        top1 = vals[:, 0].numpy() if vals.shape[1] else np.zeros(0)
        keep = {}
        for row, key in enumerate(keys):
            ok = vals[row] >= p.sigma
            if bool(ok.any()):
                keep[key] = [(int(self.selected[j]), float(v)) for j, v in zip(idx[row][ok].tolist(), vals[row][ok].tolist())]
        samples = []
        for key, meta, flac in self._source_samples(url, set(keep)):
            caps = keep[key]
            new = {k: meta[k] for k in ("duration", "sample_rate", "content_hash") if k in meta}
            new.update({
                "text": [self.captions[j] for j, _ in caps], "tag": [], "source": f"curate-{p.strategy}",
                "split": SPLIT, "original": f"{url}#{key}",
                "curate": {"strategy": p.strategy, "similarity": [_r(v) for _, v in caps],
                           "source_key": key, "source_shard": url, "teacher_sha256": self.teacher_sha},
            })
            samples.append(EncodedSample(key=key, flac=flac, meta=new))
        pairs = sum(len(v) for v in keep.values())
        part = self._part(i, url, len(keys), samples, pairs, top1, vals.flatten().numpy(), p.sigma)
        # Samples the loader could not read (bad audio, no caption field) are not curated: say how many.
        part["skipped"] = dict(getattr(loader, "skipped", {}) or {})
        return part

    def _unit_ds(self, i: int, url: str) -> dict[str, Any]:
        """DS on one pool shard: keep its samples with a caption close to a label (those captions only)."""
        p = self.params
        index = {c: j for j, c in enumerate(self.captions)}
        chosen = set(self.selected.tolist())
        wanted: dict[str, list[int]] = {}
        metas = shard_metas(url)
        best_of_clip, per_caption = [], []
        for key, meta in metas:
            js = [index[c] for c in dict.fromkeys(clean_captions(meta.get("text"))) if c in index]
            if js:
                best_of_clip.append(max(float(self.ds_best[j]) for j in js))
                per_caption += [float(self.ds_best[j]) for j in js]
            hits = [j for j in js if j in chosen]
            if hits:
                wanted[key] = hits
        samples = []
        for key, meta, flac in self._source_samples(url, set(wanted)):
            js = wanted[key]
            new = dict(meta)
            new.update({
                "text": [self.captions[j] for j in js], "source": f"curate-ds:{meta.get('source', 'unknown')}",
                "split": SPLIT, "original": f"{url}#{key}",
                "curate": {"strategy": "ds", "similarity": [_r(self.ds_best[j]) for j in js],
                           "label": [self.labels[int(self.ds_label[j])] for j in js],
                           "source_key": key, "source_shard": url, "teacher_sha256": self.teacher_sha},
            })
            samples.append(EncodedSample(key=key, flac=flac, meta=new))
        pairs = sum(len(v) for v in wanted.values())
        best = np.asarray(best_of_clip, dtype=np.float32)
        caps = np.asarray(per_caption, dtype=np.float32)
        return self._part(i, url, len(metas), samples, pairs, best, caps, p.ds_threshold)

    def _source_samples(self, url: str, keys: set[str]):
        """(key, JSON meta, FLAC bytes) of the samples of ``url`` named in ``keys``, in file order."""
        from clapscale.curate.pool import _raise_skip
        from clapscale.data.shardio import iter_tar_samples

        if not keys:
            return
        for s in iter_tar_samples(url, _raise_skip):
            if s["__key__"] in keys:
                if "flac" not in s or "json" not in s:
                    raise CurationInputError(f"{url}: sample {s['__key__']!r} has no .flac/.json member to copy")
                yield s["__key__"], json.loads(s["json"]), s["flac"]

    def _part(self, i, url, clips, samples, pairs, best, all_sims, own) -> dict[str, Any]:
        shard = None
        if samples:
            info = write_shard(self.out / SPLIT / shard_name(i), samples)
            shard = dataclasses.asdict(info)
        return {"unit": url, "clips": clips, "kept_clips": len(samples), "kept_pairs": pairs, "shard": shard,
                "best_at_threshold": _threshold_counts(best, own), "best_histogram": _histogram(best),
                "pairs_at_threshold": _threshold_counts(all_sims, own)}

    # ------------------------------------------------------------------------------ output

    def _finalize(self, unit_urls: list[str], pool_size: int, ds_info: dict[str, Any]) -> dict[str, Any]:
        from clapscale.shards.writer import ShardInfo

        parts = []
        for i in range(len(unit_urls)):
            path = self._part_path(i)
            if not path.is_file():
                raise RuntimeError(f"curation part {path} is missing after every rank finished")
            parts.append(json.loads(path.read_text()))
        shards = [ShardInfo(**pt["shard"]) for pt in parts if pt["shard"]]

        def total(name: str) -> dict[str, int]:
            out: dict[str, int] = {}
            for pt in parts:
                for k, v in pt[name].items():
                    out[k] = out.get(k, 0) + v
            return out

        hist = [sum(h) for h in zip(*(pt["best_histogram"] for pt in parts))] if parts else []
        p = self.params
        summary = {
            "strategy": p.strategy,
            "parameters": p.fingerprint(),
            "teacher": {"path": str(self.teacher_path), "sha256": self.teacher_sha},
            "inputs": {"pool": p.pool, "wild": p.wild, "units": unit_urls},
            "counts": {"units": len(unit_urls), "clips": sum(pt["clips"] for pt in parts),
                       "pool_captions": pool_size, "captions_matched_against": int(len(self.selected)),
                       "kept_clips": sum(pt["kept_clips"] for pt in parts),
                       "kept_pairs": sum(pt["kept_pairs"] for pt in parts)},
            "best_similarity": {"at_threshold": total("best_at_threshold"), "histogram": hist,
                                "histogram_edges": list(HIST_EDGES)},
            "pairs_at_threshold": total("pairs_at_threshold"),
            **({"ds": ds_info} if ds_info else {}),
        }
        if not shards:
            log.warning("curation kept no pair: no shard written (see %s)", self.out / "summary.txt")
        update_manifest(self.out, SPLIT, shards)
        manifest = json.loads((self.out / "manifest.json").read_text())
        manifest["curation"] = summary
        write_json(self.out / "manifest.json", manifest)
        (self.out / "summary.txt").write_text(format_summary(summary) + "\n")
        return summary


def format_summary(s: dict[str, Any]) -> str:
    """The summary table and similarity histogram printed by ``clapscale curate``."""
    c = s["counts"]
    p = s["parameters"]
    own = p["ds_threshold"] if s["strategy"] == "ds" else p["sigma"]
    unit = "pool samples" if s["strategy"] == "ds" else "wild clips"
    lines = [f"curation {s['strategy'].upper()}: {c['clips']} {unit} in {c['units']} shard(s); "
             f"pool {c['pool_captions']} captions, matched against {c['captions_matched_against']}",
             f"kept {c['kept_clips']} clips, {c['kept_pairs']} pairs at threshold {own:g}"
             + ("" if s["strategy"] == "ds" else f", top-k {p['top_k']}"), "",
             f"  {'threshold':>9}  {'clips kept':>10}  {'pairs kept':>10}"]
    best = s["best_similarity"]["at_threshold"]
    pairs = s["pairs_at_threshold"]
    for t in sorted(best, key=float):
        mark = "  <- this run" if t == f"{own:.6g}" else ""
        lines.append(f"  {t:>9}  {best[t]:>10}  {pairs.get(t, 0):>10}{mark}")
    hist, edges = s["best_similarity"]["histogram"], s["best_similarity"]["histogram_edges"]
    if hist and sum(hist):
        what = "nearest-label cosine of each pool sample" if s["strategy"] == "ds" else "best caption cosine of each clip"
        lines += ["", f"histogram of the {what}:"]
        nz = [i for i, n in enumerate(hist) if n]
        peak = max(hist)
        for i in range(nz[0], nz[-1] + 1):
            bar = "#" * max(1 if hist[i] else 0, round(40 * hist[i] / peak))
            lines.append(f"  [{edges[i]:+.1f}, {edges[i + 1]:+.1f})  {hist[i]:>7}  {bar}")
    return "\n".join(lines)
