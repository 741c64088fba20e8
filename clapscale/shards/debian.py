"""Real sound from Debian's game data packages: fetch, unpack, and list the clips with their text.

``apt-get download`` fetches a ``.deb`` without installing it and ``dpkg-deb -x`` unpacks it into a
folder, so nothing here needs the package to be installable or touches the system. Some games keep
their sounds inside archives (0ad-data's ``public.zip``, openarena's ``.pk3``, warzone2100's ``.wz``:
all zip files); their audio members are extracted beside the archive into ``<archive>.d/``.

Only the packages in ``TRAIN_PACKAGES`` may be trained or tuned on; other sound packages are kept for
independent evaluation (see the README).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

from clapscale.shards.pathtext import clean_caption, keyword_label

__all__ = [
    "TRAIN_PACKAGES", "AUDIO_SUFFIXES", "ARCHIVE_SUFFIXES", "PackageError", "SoundFile",
    "fetch_package", "unpack_deb", "unpack_archives", "find_sounds", "package_sounds",
]

TRAIN_PACKAGES = (
    "wesnoth-1.16-data", "0ad-data", "hedgewars-data", "supertuxkart-data", "warzone2100-data",
    "openarena-data", "redeclipse-data", "megaglest-data", "widelands-data", "minetest-data", "teeworlds-data",
)
# What soundfile (libsndfile) decodes. teeworlds-data ships WavPack (.wv), which it does not: that
# package contributes nothing, and the listing says so.
AUDIO_SUFFIXES = frozenset({".ogg", ".oga", ".wav", ".flac", ".opus", ".mp3"})
ARCHIVE_SUFFIXES = frozenset({".zip", ".pk3", ".wz"})
# Folders of long music tracks: not sound events, and minutes long each.
MUSIC_DIRS = frozenset({"music", "musics", "soundtrack", "tracks"})


class PackageError(RuntimeError):
    """A package could not be fetched or unpacked; the message says which and why."""


@dataclass(frozen=True)
class SoundFile:
    """One clip of a package: where it is, its cleaned path caption and its keyword class."""

    package: str
    path: Path
    rel: str
    caption: str
    label: str | None


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600)
    except FileNotFoundError as exc:
        raise PackageError(f"{what}: {cmd[0]} not found (a Debian system with apt is needed)") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PackageError(f"{what}: `{' '.join(cmd)}` failed ({proc.returncode}): {' | '.join(tail)}"
                           " (run `apt-get update` once if the package is not found)")


def fetch_package(name: str, cache: Path) -> Path:
    """The ``.deb`` of ``name`` in ``cache``, downloaded with ``apt-get download`` if not there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{name}_*.deb"))
    if not found:
        _run(["apt-get", "download", name], cache, f"package {name}")
        found = sorted(cache.glob(f"{name}_*.deb"))
        if not found:
            raise PackageError(f"package {name}: apt-get download succeeded but no {name}_*.deb is in {cache}")
    return found[-1]


def unpack_deb(deb: Path, dest: Path) -> Path:
    """Unpack ``deb`` into ``dest`` (once: a ``.unpacked`` marker is written last) and its archives."""
    marker = dest / ".unpacked"
    if marker.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)  # an interrupted earlier unpack: start it again
    dest.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], dest, f"unpacking {deb.name}")
    unpack_archives(dest)
    marker.write_text(deb.name + "\n")
    return dest


def unpack_archives(root: Path) -> int:
    """Extract the audio members of every zip-type archive under ``root`` into ``<archive>.d/``.

    Members whose path would leave the target folder (absolute or ``..``) are skipped.
    Returns the number of files extracted.
    """
    count = 0
    for archive in sorted(p for p in root.rglob("*") if p.suffix.lower() in ARCHIVE_SUFFIXES and p.is_file()):
        if not zipfile.is_zipfile(archive):
            continue
        target = archive.with_name(archive.name + ".d")
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                name = info.filename
                if info.is_dir() or Path(name).suffix.lower() not in AUDIO_SUFFIXES:
                    continue
                out = (target / name).resolve()
                if not out.is_relative_to(target.resolve()):
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    return count


def find_sounds(root: Path) -> list[Path]:
    """Audio files under ``root``, sorted, outside music folders and hidden entries."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in MUSIC_DIRS)
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in AUDIO_SUFFIXES]
    return out


def _game_names(package: str, root: Path) -> tuple[str, ...]:
    """Names that repeat on every path of a package: the package's and its game folders' names."""
    names = {package, package.removesuffix("-data")}
    for games in (root / "usr/share/games", root / "usr/share"):
        if games.is_dir():
            names.update(d.name for d in games.iterdir() if d.is_dir() and d.name not in {"doc", "games"})
    return tuple(sorted(names))


def package_sounds(package: str, root: Path) -> list[SoundFile]:
    """Every clip of an unpacked package with its cleaned caption and keyword label."""
    drop = _game_names(package, root)
    out = []
    for path in find_sounds(root):
        rel = path.relative_to(root).as_posix()
        out.append(SoundFile(package=package, path=path, rel=rel,
                             caption=clean_caption(rel, drop), label=keyword_label(rel)))
    return out
