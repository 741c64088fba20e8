"""Shard sets in exactly the layout LAION's audio-dataset scripts publish (DESIGN.md, "Facts").

LAION-AI/audio-dataset writes processed clips to disk (ffmpeg ``-ar 48000 -ac 1``: mono 48 kHz FLAC,
16- or 24-bit) next to one JSON each, then ``tardir`` adds them to tars with ``tarfile.add(path)``:
members are the files' absolute paths minus the leading "/", nested several directories deep, in
shuffled order (a sample's flac then its json), in Python's default (PAX) tar format; shards are
named ``0.tar, 1.tar, ...`` with ``sizes.json`` beside them and no ``.idx``. The JSON holds ``text``
as a list *or a plain string*, sometimes ``tags`` (plural, ints for UrbanSound8K) instead of
``tag``, and a free-form ``original_data``.

``write_laion_split`` reproduces that by doing what ``tardir`` does (real files on disk, real
``tarfile.add``), so the member names, header format and order are the ones a user downloads.
"""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SR = 48000
# A directory with a dot in its name: keys must be split at the first dot of the *basename*
# (webdataset's rule), not of the whole path.
PROCESSED = "mnt/audio_clip/processed.v2"

# JSON shapes of LAION's sources, cycled over the clips (caption -> metadata).
_SHAPES = (
    lambda caps, i: {"text": caps, "original_data": {"title": f"clip {i}", "license": "CC-BY"}},  # Clotho: list
    lambda caps, i: {"text": caps[0], "original_data": {"youtube_id": f"yt{i:05d}"}},  # AudioCaps: a string
    lambda caps, i: {"text": caps[:1], "tags": ["Dog", "Bark"]},  # FSD50K: plural tags
    lambda caps, i: {"text": caps[0], "tags": [i % 10], "original_data": None},  # UrbanSound8K: int tags
)


def write_laion_split(
    root: Path,
    source: str,
    split: str,
    clips: list[dict[str, Any]],
    per_shard: int,
    seed: int = 0,
) -> Path:
    """Write ``clips`` (``audio``: float32 mono 48 kHz, ``text``: list of captions) as LAION does.

    Processed files go to ``root/<PROCESSED>/<source>/<split>/<i>.flac|json`` (every third clip as
    24-bit FLAC), tars to ``root/laion/<source>/<split>/{0,1,...}.tar`` with ``sizes.json``.
    Returns the tar directory.
    """
    processed = (root / PROCESSED / source / split).resolve()
    processed.mkdir(parents=True, exist_ok=True)
    audio_files = []
    for i, clip in enumerate(clips):
        flac = processed / f"{i}.flac"
        sf.write(flac, np.asarray(clip["audio"], dtype=np.float32), SR, format="FLAC",
                 subtype="PCM_24" if i % 3 == 2 else "PCM_16")
        meta = _SHAPES[i % len(_SHAPES)](list(clip["text"]), i)
        flac.with_suffix(".json").write_text(json.dumps(meta))
        audio_files.append(flac)
    random.Random(seed).shuffle(audio_files)
    out = root / "laion" / source / split
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for n, start in enumerate(range(0, len(audio_files), per_shard)):
        chunk = audio_files[start:start + per_shard]
        with tarfile.open(out / f"{n}.tar", "w") as tar:  # Python's default format: PAX
            for flac in chunk:
                tar.add(str(flac))
                tar.add(str(flac.with_suffix(".json")))
        sizes[f"{n}.tar"] = len(chunk)
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def laion_spec(split_dir: Path) -> str:
    """The brace spec of every ``N.tar`` in ``split_dir`` (no zero padding, as LAION names them)."""
    n = len(list(split_dir.glob("*.tar")))
    return f"{split_dir}/{{0..{n - 1}}}.tar"
