"""Shard specs: brace expansion, globs and weighted mixing of several sources.

A spec is one or more sources joined by ``::``; each source is a path (or URL) with optional brace
ranges, e.g. ``shards/laion/train/{000000..000999}.tar::shards/audioset/train/{000000..000099}.tar``.
Local paths may also use shell globs (``shards/laion/train/*.tar``, expanded in sorted order).
Remote shards are read through webdataset's openers: ``http://``, ``https://`` and any command
(``pipe:aws s3 cp s3://bucket/train/000000.tar -``, ``pipe:gsutil cat ...``); their sample counts come
from the shard set's ``sizes.json`` (or ``manifest.json``) fetched once through the same opener.
Mixing weights come as a parallel ``::``-joined string (``0.7::0.3``); empty means equal weights.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import braceexpand

from clapscale.config import ConfigError
from clapscale.shards.index import idx_path_of

log = logging.getLogger(__name__)

SIZES_NAME = "sizes.json"
MANIFEST_NAME = "manifest.json"
_GLOB_CHARS = "*?["


class ShardSpecError(ConfigError):
    """A data spec names shards that cannot be used (missing files, a glob matching nothing)."""


@dataclass(frozen=True)
class Source:
    """One ``::``-separated part of a spec: its expanded shard URLs and mixing weight."""

    spec: str
    urls: tuple[str, ...]
    weight: float


def is_remote(url: str) -> bool:
    """True for URLs read through an opener (``pipe:...``, ``http(s)://``, ``s3://`` ...), False for
    local paths (``file:`` URLs count as remote: webdataset opens them)."""
    return url.startswith("pipe:") or "://" in url or url.startswith("file:")


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand one source pattern (``a/{000..002}.tar`` -> 3 URLs, zero padding kept), then
    expand shell globs in local paths (sorted). A glob that matches nothing is a ``ShardSpecError``."""
    pattern = pattern.strip()
    if not pattern:
        raise ValueError("empty shard pattern (check for a stray '::' in the data spec)")
    out: list[str] = []
    for url in braceexpand.braceexpand(pattern):
        if is_remote(url) or not any(c in url for c in _GLOB_CHARS) or Path(url).is_file():
            out.append(url)  # a file whose name holds '[' or '?' is itself, not a pattern
            continue
        matches = sorted(glob.glob(url))
        if not matches:
            raise ShardSpecError(f"no file matches the shard pattern {url!r}: check the shard path (data.train, data.val or --shards)")
        out.extend(matches)
    return out


def parse_spec(spec: str, weights: str = "") -> list[Source]:
    """Split ``spec`` on ``::``, expand each part, attach the weights from ``weights``.

    Raises ``ValueError`` for an empty spec, a weight count that does not match the source count,
    or a weight that is not a positive number.
    """
    if not spec or not spec.strip():
        raise ValueError("empty data spec: set data.train / data.val to a shard pattern such as "
                         "'shards/demo/train/{000000..000003}.tar'")
    parts = spec.split("::")
    if weights and weights.strip():
        wparts = weights.split("::")
        if len(wparts) != len(parts):
            raise ValueError(
                f"data spec has {len(parts)} source(s) but weights {weights!r} give {len(wparts)}; "
                "give one weight per '::'-separated source"
            )
        try:
            ws = [float(w) for w in wparts]
        except ValueError as e:
            raise ValueError(f"mixing weights {weights!r} must be numbers joined by '::'") from e
        if any(not w > 0 for w in ws):
            raise ValueError(f"mixing weights must be > 0, got {weights!r}")
    else:
        ws = [1.0] * len(parts)
    return [Source(p.strip(), tuple(expand_urls(p)), w) for p, w in zip(parts, ws)]


def all_urls(sources: list[Source]) -> list[str]:
    """Every shard URL of every source, in spec order."""
    return [u for s in sources for u in s.urls]


def check_shards_exist(sources: list[Source]) -> list[Source]:
    """The sources with their local shards checked on disk (remote ones are checked when read).

    A missing shard between two present ones that the shard set's ``manifest.json`` (or
    ``sizes.json``) does not list either is a gap in the numbering (older ``make_shards`` left one
    where a whole unit was rejected): it is left out with a warning naming it. Any other missing
    shard is a ``ShardSpecError`` naming the files.
    """
    out = []
    for src in sources:
        here = [is_remote(u) or Path(u).is_file() for u in src.urls]
        missing = [u for u, ok in zip(src.urls, here) if not ok]
        if not missing:
            out.append(src)
            continue
        present = [i for i, ok in enumerate(here) if ok]
        # Only a hole inside the run of present shards can be a gap; a range past the end is a mistake.
        gaps = [u for i, u in enumerate(src.urls) if not here[i] and present and present[0] < i < present[-1]
                and _listed_by_shard_set(u) is False]
        if len(gaps) < len(missing):
            real = [u for u in missing if u not in gaps]
            shown = ", ".join(real[:3]) + (f" and {len(real) - 3} more" if len(real) > 3 else "")
            raise ShardSpecError(
                f"no such file: {shown} ({len(real)} of the {len(src.urls)} shard(s) of {src.spec!r} are "
                "missing); check the shard path (data.train, data.val or --shards)"
            )
        log.warning("shard spec %s: %d shard(s) are not on disk and not in the shard set's manifest (a gap "
                    "in the numbering, e.g. a rejected unit), reading the other %d: %s", src.spec, len(gaps),
                    len(present), ", ".join(Path(u).name for u in gaps))
        out.append(replace(src, urls=tuple(u for u in src.urls if u not in gaps)))
    return out


def _listed_by_shard_set(url: str) -> bool | None:
    """Whether the local shard set's ``manifest.json`` / ``sizes.json`` lists ``url``'s file name
    (None when the set has neither, so nothing can be said)."""
    table = _sizes_table(url, _read_local)
    return None if table is None else Path(url).name in table


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """Samples per shard, for local paths and remote URLs alike.

    Looked up, per directory, in order: ``sizes.json`` beside the shards (open_clip / LAION layout);
    the shard set's ``manifest.json`` one level up (``tools/make_shards.py``); a ``sizes.json`` one
    level up (some mirrors keep it there, keyed ``name.tar`` or ``<split>/name.tar``). Remote tables
    are fetched once per directory through the shard's own opener (``pipe:`` command, ``https://``).
    A local shard missing from all of them is counted from its DALI ``.idx`` header line, or else
    by one scan of its tar headers (a warning says how to avoid it), remembered for the process
    while the file's size and mtime stay the same. A remote shard without a table
    is a ``ShardSpecError`` saying where to put ``sizes.json``.
    """
    tables: dict[str, dict[str, int] | None] = {}
    out: dict[str, int] = {}
    scanned: list[str] = []
    for url in urls:
        d = _dir_of(url)
        if d not in tables:
            tables[d] = _sizes_table(url, _read_remote if is_remote(url) else _read_local)
        name = _name_of(url)
        table = tables[d] or {}
        if name in table:
            out[url] = table[name]
            continue
        if is_remote(url):
            raise ShardSpecError(
                f"no sample count for remote shard {url}: put a sizes.json ({{\"{name}\": samples, ...}}, as "
                f"tools/make_shards.py writes) or the shard set's manifest.json where "
                f"{_sibling(url, SIZES_NAME)} reads it"
            )
        idx = idx_path_of(url)
        if idx.is_file():
            with idx.open() as f:
                out[url] = int(f.readline().split()[1])
            continue
        out[url], fresh = _scanned_count(url)
        if fresh:
            scanned.append(url)
    if scanned:
        log.warning("no sizes.json, manifest.json or .idx gives the sample count of %d shard(s) (first: %s); "
                    "counted them by scanning their tar headers. Write a sizes.json beside them "
                    "({\"name.tar\": samples}) or run `clapscale shards index DIR` to skip this scan",
                    len(scanned), scanned[0])
    return out


# Header-scan counts, per process, keyed by (path, mtime_ns, size): every periodic evaluation builds
# its loader again, and a LAION-style val set without count tables was rescanned (and warned about)
# each time. A rewritten shard has a new key, so it is counted again.
_scanned_counts: dict[tuple[str, int, int], int] = {}


def _scanned_count(path: str) -> tuple[int, bool]:
    """Samples in the local shard ``path`` by a scan of its tar headers, remembered per process;
    and whether the tar was scanned by this call."""
    from clapscale.data.shardio import count_samples

    try:
        st = os.stat(path)
    except OSError:
        return count_samples(path), True  # not remembered: the loader names a missing shard
    key = (path, st.st_mtime_ns, st.st_size)
    if key in _scanned_counts:
        return _scanned_counts[key], False
    _scanned_counts[key] = count_samples(path)
    return _scanned_counts[key], True


# ----------------------------------------------------------------------------------------------
# Where a shard set's count tables live, for local paths and remote URLs
# ----------------------------------------------------------------------------------------------


def _shard_token(url: str) -> tuple[str, str, str]:
    """``(before, location, after)``: the part of ``url`` that locates the shard file. For a
    ``pipe:`` command it is the last word naming a ``.tar`` (``pipe:curl -s URL``, ``pipe:aws s3 cp
    URL -``); otherwise the whole URL."""
    if not url.startswith("pipe:"):
        return "", url, ""
    words = url.split(" ")
    for i in range(len(words) - 1, -1, -1):
        if ".tar" in words[i]:
            return " ".join(words[:i] + [""]), words[i], " ".join([""] + words[i + 1 :])
    return "", url, ""


def _name_of(url: str) -> str:
    return posixpath.basename(_shard_token(url)[1].split("?", 1)[0])


def _dir_of(url: str) -> str:
    before, loc, after = _shard_token(url)
    return before + posixpath.dirname(loc.split("?", 1)[0]) + after


def _sibling(url: str, relpath: str) -> str:
    """The URL of ``relpath`` relative to ``url``'s directory, through the same opener."""
    before, loc, after = _shard_token(url)
    parts = urlsplit(loc)
    if parts.scheme and parts.scheme != "pipe" and len(parts.scheme) > 1:
        path = posixpath.normpath(posixpath.join(posixpath.dirname(parts.path), relpath))
        return before + urlunsplit(parts._replace(path=path, query="", fragment="")) + after
    return before + posixpath.normpath(posixpath.join(posixpath.dirname(loc), relpath)) + after


def _read_local(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ShardSpecError(f"{path} is not valid JSON ({e}); fix or remove it") from e


def _read_remote(url: str) -> Any:
    """JSON fetched through webdataset's opener, or None when the opener fails (no such object)."""
    from webdataset.gopen import gopen

    try:
        with gopen(url, "rb") as f:
            data = f.read()
    except Exception as e:  # noqa: BLE001 - any opener failure means "this table is not there"
        log.debug("no shard table at %s: %r", url, e)
        return None
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise ShardSpecError(f"{url} is not valid JSON ({e}); fix or remove it") from e


def _sizes_table(url: str, read: Callable[[str], Any]) -> dict[str, int] | None:
    """``{file name: samples}`` for the shards in ``url``'s directory, or None when no table exists."""
    split = posixpath.basename(_dir_of(_shard_token(url)[1]).rstrip("/"))
    beside = read(_sibling(url, SIZES_NAME))
    if isinstance(beside, dict):
        return {str(k): int(v) for k, v in beside.items()}
    manifest = read(_sibling(url, f"../{MANIFEST_NAME}"))
    if isinstance(manifest, dict):
        entry = (manifest.get("splits") or {}).get(split)
        if isinstance(entry, dict) and isinstance(entry.get("shards"), list):
            return {str(s["name"]): int(s["samples"]) for s in entry["shards"]}
    above = read(_sibling(url, f"../{SIZES_NAME}"))
    if isinstance(above, dict):
        prefix = f"{split}/"
        return {str(k)[len(prefix):] if str(k).startswith(prefix) else str(k): int(v) for k, v in above.items()}
    return None
