"""Write WebDataset tar shards: GNU tar, DALI wds2idx index, sizes.json and a manifest.

Layout of a shard set::

    OUT/manifest.json              per split: shards with samples, seconds of audio, sha256, bytes
    OUT/<split>/NNNNNN.tar         <key>.flac + <key>.json per sample, members in key order
    OUT/<split>/NNNNNN.idx         DALI `readers.webdataset` index (wds2idx format v1.2)
    OUT/<split>/sizes.json         {"NNNNNN.tar": samples} as open_clip / LAION read it

Every file is written under a temporary name in the same directory and renamed when complete,
so a final name never holds a partial file. Tar headers are deterministic (mtime 0, uid 0), so
the same samples always give byte-identical shards and the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from clapscale.shards.audio_io import SAMPLE_RATE, EncodedAudio, encode_flac_stream
from clapscale.shards.index import IDX_VERSION, idx_path_of

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
_RESERVED = {"key", "audio", "image"}
MAX_IMAGE_BYTES = 16 << 20  # a clip's picture; bounds what a loader or --verify reads for one member


@dataclass
class EncodedSample:
    """One sample ready to be stored: its key, FLAC bytes and JSON metadata."""

    key: str
    flac: bytes
    meta: dict[str, Any]
    jpg: bytes | None = None  # the clip's picture (a video frame, a rendered image), stored as <key>.jpg


@dataclass
class ShardInfo:
    """What the manifest records about one written shard."""

    name: str  # file name inside the split directory, e.g. "000003.tar"
    samples: int
    seconds: float
    sha256: str
    bytes: int


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: use letters, digits, '_' and '-' only "
            "(webdataset splits a member name at its first dot; '/' would create directories)"
        )
    return key


def _check_text(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"sample {key!r}: 'text' must be a non-empty list of captions, got {value!r}")
    out = []
    for caption in value:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"sample {key!r}: empty or non-string caption {caption!r}")
        out.append(caption.strip())
    return out


def encode_record(record: Mapping[str, Any], split: str) -> EncodedSample:
    """Turn a record dict into an ``EncodedSample``.

    ``record``: ``key`` (str, no dots), ``audio`` (float32 mono 48 kHz, shape ``(n,)``, or an
    ``EncodedAudio`` that make_shards encoded while decoding, so a long clip's PCM is never held
    whole), optional ``image`` (JPEG bytes, stored as ``<key>.jpg``), ``text``
    (list of captions), optional ``tag`` (list of labels), ``source``, ``original``, ``licence`` and
    any other JSON-serialisable fields, which are stored as given. ``duration``, ``sample_rate``,
    ``split`` and ``content_hash`` are computed here.
    """
    key = check_key(record.get("key"))
    audio = record["audio"]
    if not isinstance(audio, EncodedAudio):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"sample {key!r}: audio must be a non-empty mono (n,) array, got shape {audio.shape}")
        audio = encode_flac_stream([audio], SAMPLE_RATE)
    if audio.samples == 0:
        raise ValueError(f"sample {key!r}: audio must be non-empty")
    meta: dict[str, Any] = {k: v for k, v in record.items() if k not in _RESERVED}
    meta["text"] = _check_text(record.get("text"), key)
    tags = record.get("tag", [])
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"sample {key!r}: 'tag' must be a list of strings, got {tags!r}")
    meta["tag"] = list(tags)
    meta.setdefault("source", "unknown")
    meta.setdefault("original", key)
    meta["split"] = split
    meta["duration"] = audio.samples / SAMPLE_RATE
    meta["sample_rate"] = SAMPLE_RATE
    meta["content_hash"] = audio.content_hash
    image = record.get("image")
    if image is not None:
        check_jpeg(image, f"sample {key!r}")
    return EncodedSample(key=key, flac=audio.flac, meta=meta, jpg=image)


def check_jpeg(data: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``data`` is the bytes of a JPEG that PIL can decode."""
    if not isinstance(data, (bytes, bytearray)) or not bytes(data[:3]) == b"\xff\xd8\xff":
        raise ValueError(f"{where}: image must be the bytes of a JPEG file (starting FF D8 FF)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{where}: image of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}; store a smaller JPEG")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: image is not a decodable JPEG ({exc})") from exc


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    # GNU format: DALI mis-reads the PAX headers some writers emit.
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(tar_path: Path, samples: list[EncodedSample]) -> ShardInfo:
    """Write ``samples`` (sorted here by key) to ``tar_path`` and its ``.idx``; atomic; returns its info."""
    if not samples:
        raise ValueError(f"{tar_path}: refusing to write an empty shard (DALI cannot index one)")
    samples = sorted(samples, key=lambda s: s.key)
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"{tar_path}: duplicate sample keys {dup[:5]}")
    buf = io.BytesIO()
    idx_lines = []
    seconds = 0.0
    for s in samples:
        payload_json = json.dumps(s.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        fields = []
        members = [("flac", s.flac)] + ([("jpg", bytes(s.jpg))] if s.jpg is not None else []) + [("json", payload_json)]
        for ext, payload in members:
            name = f"{s.key}.{ext}"
            buf.write(_tar_header(name, len(payload)))
            fields.append(f"{ext} {buf.tell()} {len(payload)} {name}")
            buf.write(payload)
            buf.write(b"\0" * (-len(payload) % tarfile.BLOCKSIZE))
        idx_lines.append(" ".join(fields))
        seconds += float(s.meta.get("duration", 0.0))
    buf.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    buf.write(b"\0" * (-buf.tell() % tarfile.RECORDSIZE))
    data = buf.getvalue()
    tar_path = Path(tar_path)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    # The index goes first: a final-named tar always has its index beside it.
    idx = f"{IDX_VERSION} {len(samples)}\n" + "\n".join(idx_lines) + "\n"
    _atomic_write(idx_path_of(tar_path), idx.encode("utf-8"))
    _atomic_write(tar_path, data)
    return ShardInfo(
        name=tar_path.name, samples=len(samples), seconds=round(seconds, 6),
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
    )


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def update_manifest(out_dir: Path, split: str, shards: list[ShardInfo], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``split``'s ``sizes.json`` and replace its entry in ``out_dir/manifest.json``."""
    out_dir = Path(out_dir)
    shards = sorted(shards, key=lambda s: s.name)
    write_json(out_dir / split / SIZES_NAME, {s.name: s.samples for s in shards})
    path = out_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.setdefault("format", "clapscale-shards/1")
    manifest.setdefault("sample_rate", SAMPLE_RATE)
    splits = manifest.setdefault("splits", {})
    splits[split] = {
        "samples": sum(s.samples for s in shards),
        "seconds": round(sum(s.seconds for s in shards), 3),
        "shards": [asdict(s) for s in shards],
        **(dict(extra) if extra else {}),
    }
    write_json(path, manifest)


class ShardWriter:
    """Stream records into ``out_dir/split/NNNNNN.tar`` shards of ``shard_size`` samples.

    >>> with ShardWriter(out, "train") as w:
    ...     for rec in records:
    ...         w.add(rec)
    >>> w.shards  # list[ShardInfo]

    Samples are buffered encoded (FLAC bytes) until a shard is full, then sorted by key and
    written. Closing writes ``sizes.json`` and updates ``manifest.json``.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int = 512, start_index: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not split or not KEY_RE.match(split):
            raise ValueError(f"invalid split name {split!r}: letters, digits, '_' and '-' only")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_size = shard_size
        self.next_index = start_index
        self.shards: list[ShardInfo] = []
        self._pending: list[EncodedSample] = []
        self._keys: set[str] = set()

    def add(self, record: Mapping[str, Any]) -> None:
        self.add_encoded(encode_record(record, self.split))

    def add_encoded(self, sample: EncodedSample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"duplicate sample key {sample.key!r} in split {self.split!r}")
        self._keys.add(sample.key)
        self._pending.append(sample)
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / self.split / shard_name(self.next_index)
        self.shards.append(write_shard(path, self._pending))
        self.next_index += 1
        self._pending = []

    def close(self) -> list[ShardInfo]:
        self.flush()
        update_manifest(self.out_dir, self.split, self.shards)
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_shards(records: Iterable[Mapping[str, Any]], out_dir: Path, split: str, shard_size: int = 512) -> list[Path]:
    """Write ``records`` as one split of a shard set; returns the tar paths in order.

    See ``encode_record`` for the record fields. Existing shards of ``split`` in ``out_dir`` are
    replaced; other splits' manifest entries are kept.
    """
    split_dir = Path(out_dir) / split
    if split_dir.exists():
        for old in list(split_dir.glob("*.tar")) + list(split_dir.glob("*.idx")):
            old.unlink()
    with ShardWriter(out_dir, split, shard_size) as w:
        for rec in records:
            w.add(rec)
    return [split_dir / s.name for s in w.shards]
