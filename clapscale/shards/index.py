"""``clapscale shards index DIR``: write the DALI index (``.idx``) beside shards that lack one.

DALI's ``readers.webdataset`` needs a wds2idx index per tar; shards written by make_shards have one,
shards published by others (LAION's ``0.tar, 1.tar, ...``) do not. This reads each tar's headers
(any tar format: GNU, ustar or the PAX that Python writes by default; data is skipped by seeking,
so a 1 GB shard costs a few MB of reads) and writes ``N.idx`` beside ``N.tar``, atomically.

Samples are grouped as the webdataset loader groups them, so both backends see the same samples
under the same keys: consecutive members whose names agree up to the first dot of the *basename*
(``mnt/data.v2/clotho/12.flac`` is key ``mnt/data.v2/clotho/12``, extension ``flac``; a dot in a
directory name does not split). Index format v1.2: ``v1.2 N`` then one line per sample of
``ext data_offset size member_name`` groups.

Where a shard's index lives is one rule, :func:`idx_path_of`, used by the writer, the indexer,
``--verify`` and both loaders.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

IDX_VERSION = "v1.2"


class ShardIndexError(ValueError):
    """A shard cannot be indexed (unreadable, or a member name the index format cannot hold)."""


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/x.v2/abc.flac"`` -> (``"dir/x.v2/abc"``, ``"flac"``): the extension starts at the
    first dot of the basename (webdataset's rule)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


@dataclass
class ShardIndex:
    """One tar's index: ``lines`` (one per complete sample) and what was left out."""

    lines: list[str] = field(default_factory=list)
    truncated: bool = False  # the file ends inside a sample (the samples after the cut are unknown)

    def text(self) -> str:
        return f"{IDX_VERSION} {len(self.lines)}\n" + "".join(line + "\n" for line in self.lines)


def index_tar(tar_path: Path) -> ShardIndex:
    """Read ``tar_path``'s headers and build its index; raises ``ShardIndexError``."""
    tar_path = Path(tar_path)
    size = tar_path.stat().st_size
    groups: list[tuple[str, list[tarfile.TarInfo]]] = []
    try:
        with tarfile.open(tar_path, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                if any(c.isspace() for c in member.name):
                    # The index is whitespace-separated: such a name cannot be written into it.
                    raise ShardIndexError(
                        f"{tar_path}: member {member.name!r} has whitespace in its name, which DALI's "
                        "index format cannot hold; read this shard with data.backend=wds"
                    )
                key, _ = split_member_name(member.name)
                if not groups or groups[-1][0] != key:
                    groups.append((key, []))
                groups[-1][1].append(member)
    except tarfile.ReadError as e:
        if not groups:
            raise ShardIndexError(f"{tar_path}: not a readable tar ({e})") from e
        # A tar cut mid-header: index the members read so far (the size check below drops the rest).
    index = ShardIndex()
    for _, members in groups:
        if any(m.offset_data + m.size > size for m in members):
            index.truncated = True
            break
        index.lines.append(" ".join(
            f"{split_member_name(m.name)[1]} {m.offset_data} {m.size} {m.name}" for m in members
        ))
    if not index.lines:
        raise ShardIndexError(f"{tar_path}: holds no complete sample (DALI cannot read an empty index)")
    return index


def idx_path_of(tar_path: str | Path) -> Path:
    """Where a shard's DALI index lives: ``.../3.tar`` -> ``.../3.idx``; a name not ending in ``.tar``
    gets ``.idx`` appended (``part.000`` -> ``part.000.idx``), so two shards never share an index."""
    tar_path = Path(tar_path)
    if tar_path.name.endswith(".tar"):
        return tar_path.with_name(tar_path.name[:-len(".tar")] + ".idx")
    return tar_path.with_name(tar_path.name + ".idx")


def write_index(tar_path: Path, index: ShardIndex) -> Path:
    """Write ``index`` beside ``tar_path`` under a temporary name, then rename it into place."""
    target = idx_path_of(tar_path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(index.text())
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return target


def find_tars(paths: list[Path]) -> list[Path]:
    """Every ``*.tar`` named in ``paths`` or below the directories among them, sorted, no duplicates."""
    found: set[Path] = set()
    for p in paths:
        if p.is_dir():
            found.update(t for t in p.rglob("*.tar") if t.is_file())
        elif p.is_file():
            found.add(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return sorted(found)
