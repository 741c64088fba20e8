"""``--verify OUT``: re-read a shard set and report every inconsistency, naming it.

Checks: manifest.json and each split's sizes.json agree with each other and with the tars on
disk (names, sample counts, seconds); each tar's sha256 and size; GNU tar headers; members come in
(<key>.flac, <key>.json) pairs (an optional <key>.jpg between them decodes), adjacent, in key order, keys unique and dot-free; the ``.idx``
equals the index of the tar's actual offsets; every FLAC decodes as 48 kHz mono 16-bit, its length
matches the JSON ``duration`` and its PCM matches ``content_hash``; the JSON schema.

A shard set made elsewhere (no ``manifest.json``: LAION's ``0.tar, 1.tar, ...``) is checked for what
holds without our manifest and schema: every ``*.tar`` below OUT opens; its members form samples of
one ``.flac`` and one ``.json`` (grouped as the loaders group them); every FLAC decodes at 48 kHz
(16- or 24-bit, any channel count) and is not all-silent after downmix; every JSON parses to an
object with at least one caption in ``text`` (a string or a list); ``sizes.json`` and ``.idx``, where
present, agree with the tars. A missing ``sizes.json`` or ``.idx`` is noted, not a problem.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import soundfile as sf

from clapscale.shards.audio_io import SAMPLE_RATE, SILENCE_PEAK
from clapscale.shards.index import IDX_VERSION, find_tars, idx_path_of, index_tar, split_member_name
from clapscale.shards.writer import KEY_RE, MANIFEST_NAME, MAX_IMAGE_BYTES, SIZES_NAME, check_jpeg

_GNU_MAGIC = b"ustar  \0"
# Frames decoded at a time when checking a FLAC: memory stays bounded for clips of any length.
_BLOCK_FRAMES = 1 << 18  # 5.5 s at 48 kHz: 1 MB per channel as float32
# Bytes read at a time when hashing a tar.
_READ_BYTES = 1 << 20


@dataclass
class VerifyReport:
    """What ``verify_shards`` found: ``problems`` (empty when the set holds), ``notes`` (facts worth
    knowing that are not errors) and totals."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_meta(where: str, meta: Any, split: str) -> list[str]:
    p = []
    if not isinstance(meta, dict):
        return [f"{where}: JSON is not an object"]
    text = meta.get("text")
    if not isinstance(text, list) or not text or not all(isinstance(t, str) and t.strip() for t in text):
        p.append(f"{where}: 'text' must be a non-empty list of non-empty strings, got {text!r}")
    tag = meta.get("tag")
    if not isinstance(tag, list) or not all(isinstance(t, str) for t in tag):
        p.append(f"{where}: 'tag' must be a list of strings, got {tag!r}")
    for name, typ in (("source", str), ("original", str), ("content_hash", str)):
        if not isinstance(meta.get(name), typ):
            p.append(f"{where}: '{name}' missing or not a {typ.__name__}")
    if meta.get("split") != split:
        p.append(f"{where}: 'split' is {meta.get('split')!r} but the shard is in split {split!r}")
    if meta.get("sample_rate") != SAMPLE_RATE:
        p.append(f"{where}: 'sample_rate' is {meta.get('sample_rate')!r}, expected {SAMPLE_RATE}")
    if not isinstance(meta.get("duration"), (int, float)) or meta["duration"] <= 0:
        p.append(f"{where}: 'duration' missing or not positive: {meta.get('duration')!r}")
    return p


def _sha256_of(path: Path) -> str:
    """sha256 of a file, read in chunks of ``_READ_BYTES``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_READ_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_tar(tar_path: Path, split: str, expected: dict[str, Any] | None) -> tuple[list[str], int, float, list[str]]:
    """Check one shard; returns (problems, samples, seconds, keys).

    Memory stays bounded whatever the shard's size: the tar is hashed in chunks, members are read one
    at a time from the file, and each FLAC is decoded and hashed in blocks."""
    problems: list[str] = []
    name = f"{split}/{tar_path.name}"
    size = tar_path.stat().st_size
    if expected is not None:
        digest = _sha256_of(tar_path)
        if digest != expected.get("sha256"):
            problems.append(f"{name}: sha256 {digest[:16]}... differs from the manifest's {str(expected.get('sha256'))[:16]}... "
                            "(the file was modified or corrupted)")
        if size != expected.get("bytes", size):
            problems.append(f"{name}: {size} bytes, manifest says {expected.get('bytes')}")
    with open(tar_path, "rb") as raw:
        try:
            tf = tarfile.open(fileobj=raw, mode="r:")
            members = tf.getmembers()
        except tarfile.TarError as exc:
            return problems + [f"{name}: not a readable tar ({exc})"], 0, 0.0, []
        # All headers are read: seeking ``raw`` below is safe (extractfile seeks before each read).
        idx_lines, keys, seconds = _verify_members(tf, raw, members, name, split, size, problems)
    idx_path = idx_path_of(tar_path)
    if not idx_path.exists():
        problems.append(f"{name}: index {idx_path.name} is missing")
    else:
        want = f"{IDX_VERSION} {len(keys)}\n" + "".join(line + "\n" for line in idx_lines)
        if idx_path.read_text() != want:
            problems.append(f"{name}: index {idx_path.name} does not match the tar's members and offsets")
    if expected is not None:
        if expected.get("samples") != len(keys):
            problems.append(f"{name}: holds {len(keys)} samples, manifest says {expected.get('samples')}")
        if abs(float(expected.get("seconds", 0)) - seconds) > 1e-2:
            problems.append(f"{name}: holds {seconds:.3f} s of audio, manifest says {expected.get('seconds')}")
    return problems, len(keys), seconds, keys


def _verify_members(tf: tarfile.TarFile, raw: BinaryIO, members: list[tarfile.TarInfo], name: str, split: str,
                    size: int, problems: list[str]) -> tuple[list[str], list[str], float]:
    """The per-sample checks of ``verify_tar`` (appended to ``problems``); -> (idx lines, keys, seconds)."""
    idx_lines: list[str] = []
    keys: list[str] = []
    seconds = 0.0
    i = 0
    while i < len(members):
        m = members[i]
        raw.seek(m.offset + 257)
        if raw.read(len(_GNU_MAGIC)) != _GNU_MAGIC:
            problems.append(f"{name}: member {m.name} does not have a GNU tar header")
        if not m.isfile():
            problems.append(f"{name}: member {m.name} is not a regular file")
            i += 1
            continue
        key, _, ext = m.name.partition(".")
        # An optional picture sits between the two: <key>.flac, <key>.jpg, <key>.json.
        img = members[i + 1] if i + 1 < len(members) and members[i + 1].name == f"{key}.jpg" else None
        nxt = i + 2 if img is not None else i + 1
        if ext != "flac" or nxt >= len(members) or members[nxt].name != f"{key}.json" or not members[nxt].isfile():
            problems.append(f"{name}: sample {key!r} lacks an adjacent .flac + .json pair (found {m.name})")
            i += 1
            continue
        j = members[nxt]
        i = nxt + 1
        where = f"{name}:{key}"
        if not KEY_RE.match(key):
            problems.append(f"{where}: invalid key (letters, digits, '_' and '-' only)")
        if keys and key <= keys[-1]:
            problems.append(f"{where}: keys out of order or repeated (after {keys[-1]!r})")
        keys.append(key)
        image_field = f" jpg {img.offset_data} {img.size} {img.name}" if img is not None else ""
        idx_lines.append(f"flac {m.offset_data} {m.size} {m.name}{image_field} json {j.offset_data} {j.size} {j.name}")
        if max(x.offset_data + x.size for x in (m, j, img) if x is not None) > size:
            problems.append(f"{where}: the file ends inside this sample (truncated)")
            continue
        if img is not None:
            if img.size > MAX_IMAGE_BYTES:
                problems.append(f"{where}: image of {img.size} bytes exceeds {MAX_IMAGE_BYTES}")
            else:
                try:
                    check_jpeg(_read_member(tf, img), where)
                except ValueError as exc:
                    problems.append(str(exc))
        try:
            meta = json.loads(_read_member(tf, j).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{where}: JSON does not parse ({exc})")
            meta = None
        if meta is not None:
            problems += _check_meta(where, meta, split)
        try:
            # Decoded and hashed in blocks: a long clip never has its whole PCM in memory.
            digest, frames = hashlib.sha256(), 0
            with sf.SoundFile(tf.extractfile(m)) as f:
                fmt = (f.format, f.subtype, f.samplerate, f.channels)
                for block in f.blocks(blocksize=_BLOCK_FRAMES, dtype="int16"):
                    digest.update(block.astype("<i2").tobytes())
                    frames += block.shape[0]
            if fmt != ("FLAC", "PCM_16", SAMPLE_RATE, 1):
                problems.append(f"{where}: audio is {fmt}, expected ('FLAC', 'PCM_16', {SAMPLE_RATE}, 1)")
            seconds += frames / SAMPLE_RATE
            if isinstance(meta, dict):
                if abs(frames / SAMPLE_RATE - float(meta.get("duration") or 0)) > 1e-3:
                    problems.append(f"{where}: FLAC holds {frames / SAMPLE_RATE:.4f} s but JSON duration is {meta.get('duration')}")
                if digest.hexdigest() != meta.get("content_hash"):
                    problems.append(f"{where}: decoded PCM does not match content_hash")
        except (sf.LibsndfileError, RuntimeError) as exc:
            problems.append(f"{where}: FLAC does not decode ({exc})")
    return idx_lines, keys, seconds


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A small member's bytes (a JSON); audio members are streamed, never read whole."""
    f = tf.extractfile(member)
    assert f is not None, member.name  # only regular files get here
    return f.read()


def _verify_job(job: tuple[str, str, dict[str, Any] | None]) -> tuple[list[str], int, float, list[str]]:
    return verify_tar(Path(job[0]), job[1], job[2])


def verify_shards(out: Path, workers: int = 1) -> VerifyReport:
    """Verify the shard set under ``out``; ``report.problems`` is empty when everything holds."""
    out = Path(out)
    report = VerifyReport()
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.exists():
        return verify_foreign_shards(out, workers)
    try:
        manifest = json.loads(manifest_path.read_text())
        splits = manifest["splits"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        report.problems.append(f"{manifest_path}: unreadable ({exc})")
        return report
    jobs = []
    for split, entry in sorted(splits.items()):
        listed = {s["name"]: s for s in entry.get("shards", [])}
        sizes_path = out / split / SIZES_NAME
        if not sizes_path.exists():
            report.problems.append(f"{split}/{SIZES_NAME}: missing")
        else:
            sizes = json.loads(sizes_path.read_text())
            want = {n: s["samples"] for n, s in listed.items()}
            if sizes != want:
                diff = sorted(set(sizes.items()) ^ set(want.items()))
                report.problems.append(f"{split}/{SIZES_NAME} disagrees with the manifest: {diff[:6]}")
        on_disk = {p.name for p in (out / split).glob("*.tar")} if (out / split).is_dir() else set()
        for extra in sorted(on_disk - set(listed)):
            report.problems.append(f"{split}/{extra}: shard on disk but not in the manifest")
        for missing in sorted(set(listed) - on_disk):
            report.problems.append(f"{split}/{missing}: listed in the manifest but missing on disk")
        if entry.get("samples") != sum(s["samples"] for s in listed.values()):
            report.problems.append(f"manifest split {split!r}: total samples {entry.get('samples')} != sum over its shards")
        for n in sorted(set(listed) & on_disk):
            jobs.append((str(out / split / n), split, listed[n]))
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_verify_job, jobs, chunksize=1)
    else:
        results = [_verify_job(j) for j in jobs]
    keys_by_split: dict[str, set[str]] = {}
    for (path, split, _), (problems, n, seconds, keys) in zip(jobs, results):
        report.problems += problems
        report.samples += n
        report.seconds += seconds
        report.shards += 1
        seen = keys_by_split.setdefault(split, set())
        dup = seen.intersection(keys)
        if dup:
            report.problems.append(f"{split}/{Path(path).name}: keys also present in another shard: {sorted(dup)[:5]}")
        seen.update(keys)
    return report


# ----------------------------------------------------------------------------- shard sets made elsewhere


def _check_flac(where: str, flac: BinaryIO) -> tuple[list[str], float]:
    """Decode one FLAC (a seekable file object) in blocks: 48 kHz, 16/24-bit, not all-silent after
    downmix; -> (problems, seconds)."""
    try:
        with sf.SoundFile(flac) as f:
            fmt = (f.format, f.subtype, f.samplerate)
            frames, peak = 0, 0.0
            for block in f.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):
                frames += block.shape[0]
                if block.size:
                    peak = max(peak, float(abs(block.mean(axis=1)).max()))
    except (sf.LibsndfileError, RuntimeError) as exc:
        return [f"{where}: FLAC does not decode ({exc})"], 0.0
    problems = []
    if fmt[0] != "FLAC" or fmt[1] not in ("PCM_16", "PCM_24") or fmt[2] != SAMPLE_RATE:
        problems.append(f"{where}: audio is {fmt}, expected FLAC, PCM_16 or PCM_24, {SAMPLE_RATE} Hz")
    if frames == 0:
        problems.append(f"{where}: FLAC holds no samples")
    elif peak < SILENCE_PEAK:
        problems.append(f"{where}: all-silent after downmix to mono (the loaders skip it as 'silent')")
    return problems, frames / max(fmt[2], 1)


def _check_foreign_meta(where: str, raw: bytes) -> list[str]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{where}: JSON does not parse ({exc})"]
    if not isinstance(meta, dict):
        return [f"{where}: JSON is not an object"]
    text = meta.get("text")
    captions = [text] if isinstance(text, str) else text if isinstance(text, list) else []
    if not any(isinstance(c, str) and c.strip() for c in captions):
        return [f"{where}: no caption: 'text' must be a non-empty string or list of strings, got {text!r}"]
    return []


def verify_foreign_tar(tar_path: Path, name: str) -> tuple[list[str], int, float]:
    """Check one shard made elsewhere (see the module docstring); returns (problems, samples, seconds).

    Members are read one at a time from the file and each FLAC is decoded in blocks, so memory stays
    bounded whatever the shard's size."""
    size = Path(tar_path).stat().st_size
    members: list[tarfile.TarInfo] = []
    problems: list[str] = []
    try:
        tf = tarfile.open(tar_path, mode="r:")
    except tarfile.TarError as exc:
        return [f"{name}: not a readable tar ({exc})"], 0, 0.0
    with tf:
        try:
            for m in tf:
                members.append(m)
        except tarfile.TarError as exc:
            if not members:
                return [f"{name}: not a readable tar ({exc})"], 0, 0.0
            # Cut after the last header read: the size check below names the sample it cut.
        groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        for m in members:
            if not m.isfile():
                continue
            key, ext = split_member_name(m.name)
            if not groups or groups[-1][0] != key:
                groups.append((key, {}))
            groups[-1][1][ext] = m
        seconds = 0.0
        for key, parts in groups:
            where = f"{name}:{key}"
            if "flac" not in parts or "json" not in parts:
                problems.append(f"{where}: a sample needs adjacent .flac and .json members, found "
                                f"{sorted('.' + e for e in parts)}")
                continue
            j, a = parts["json"], parts["flac"]
            if max(m.offset_data + m.size for m in (a, j)) > size:
                problems.append(f"{where}: the file ends inside this sample (truncated)")
                continue
            problems += _check_foreign_meta(where, _read_member(tf, j))
            flac_problems, clip_seconds = _check_flac(where, tf.extractfile(a))
            problems += flac_problems
            seconds += clip_seconds
    idx = idx_path_of(tar_path)
    if idx.exists() and groups:
        try:
            want = index_tar(Path(tar_path)).text()
        except ValueError:
            want = None
        if idx.read_text() != want:
            problems.append(f"{name}: index {idx.name} does not match the tar; rewrite it with "
                            f"`clapscale shards index --force {tar_path}`")
    return problems, len(groups), seconds


def _verify_foreign_job(job: tuple[str, str]) -> tuple[list[str], int, float]:
    return verify_foreign_tar(Path(job[0]), job[1])


def verify_foreign_shards(out: Path, workers: int = 1) -> VerifyReport:
    """Verify a shard set without ``manifest.json`` (made elsewhere, e.g. LAION's)."""
    out = Path(out)
    report = VerifyReport()
    report.notes.append(f"no {MANIFEST_NAME} in {out}: verifying it as a shard set made elsewhere (decoding, "
                        "JSON, captions, sample rate; sizes.json and .idx where present)")
    try:
        tars = find_tars([out])
    except FileNotFoundError as exc:
        report.problems.append(str(exc))
        return report
    if not tars:
        report.problems.append(f"{out}: no *.tar below it")
        return report
    jobs = [(str(t), str(t.relative_to(out))) for t in tars]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_verify_foreign_job, jobs, chunksize=1)
    else:
        results = [_verify_foreign_job(j) for j in jobs]
    counts: dict[Path, int] = {}
    for tar, (problems, n, seconds) in zip(tars, results):
        report.problems += problems
        report.samples += n
        report.seconds += seconds
        report.shards += 1
        counts[tar] = n
    for d in sorted({t.parent for t in tars}):
        rel = d.relative_to(out)
        sizes_path = d / SIZES_NAME
        if not sizes_path.is_file():
            report.notes.append(f"{rel / SIZES_NAME}: missing (loaders count samples from .idx instead)")
            continue
        try:
            sizes = json.loads(sizes_path.read_text())
            sizes = {str(k): int(v) for k, v in sizes.items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            report.problems.append(f"{rel / SIZES_NAME}: unreadable ({exc})")
            continue
        on_disk = {t.name: n for t, n in counts.items() if t.parent == d}
        for shard in sorted(set(sizes) | set(on_disk)):
            if shard not in on_disk:
                report.problems.append(f"{rel / SIZES_NAME} lists {shard}, which is not on disk")
            elif shard not in sizes:
                report.problems.append(f"{rel / shard}: not listed in {SIZES_NAME}")
            elif sizes[shard] != on_disk[shard]:
                report.problems.append(f"{rel / shard}: holds {on_disk[shard]} samples, {SIZES_NAME} says {sizes[shard]}")
    unindexed = [t for t in tars if not idx_path_of(t).exists()]
    if unindexed:
        report.notes.append(f"{len(unindexed)} of {len(tars)} shard(s) have no .idx: data.backend=dali needs "
                            f"`clapscale shards index {out}` once (the webdataset backend does not)")
    return report
