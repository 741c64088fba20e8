"""The real-audio corpus: Debian game sound packages -> a captioned, labelled shard set.

``python tools/real_corpus.py --out shards/real`` fetches the packages (``apt-get download``), unpacks
them, captions every clip from its path (``pathtext.clean_caption``), labels it with the keyword rule
(``pathtext.keyword_label``, written into ``tag``), splits it, and builds shards with make_shards
from a JSONL manifest written beside them (``<out>/corpus.jsonl``, so the exact rows are on record).

Splits:
- ``train`` / ``valid`` / ``test``: a split by file within the training packages, decided by a hash of
  the clip's path (stable when packages are added or removed, independent of file order);
- ``heldout``: every clip of one whole package that is never trained on (``--heldout``), for
  generalisation to another game's library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from clapscale.shards.sources import caption_from_path
from clapscale.shards.debian import TRAIN_PACKAGES, PackageError, SoundFile, fetch_package, package_sounds, unpack_deb

__all__ = ["DEFAULT_PACKAGES", "DEFAULT_HELDOUT", "split_of", "corpus_rows", "main"]

# What `make real` uses: about 3,700 clips, 0.7 GB of downloads (20-40 s here), all sound effects
# and voice lines. wesnoth is held out: its combat, creature and magic sounds share classes with
# the training packages but none of their recordings.
DEFAULT_PACKAGES = ("hedgewars-data", "megaglest-data", "minetest-data", "openarena-data", "warzone2100-data")
DEFAULT_HELDOUT = "wesnoth-1.16-data"


def split_of(rel: str, test_frac: float, valid_frac: float) -> str:
    """``test`` / ``valid`` / ``train`` for a clip, from a hash of its path (deterministic)."""
    u = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_frac:
        return "test"
    if u < test_frac + valid_frac:
        return "valid"
    return "train"


def corpus_rows(
    sounds: list[SoundFile], root: Path, heldout: str | None, test_frac: float = 0.1, valid_frac: float = 0.05,
    raw_captions: bool = False,
) -> list[dict]:
    """Manifest rows (path relative to ``root``, caption, tags, split, id) for make_shards.

    ``raw_captions``: caption by make_shards' ``--from-dir`` rule (every word of the path but a few
    folder words), to measure what cleaning buys. A clip with no caption word left keeps an empty caption, which make_shards
    rejects and counts as ``empty_caption``.
    """
    rows = []
    for s in sounds:
        rel = s.path.relative_to(root).as_posix()
        caption = caption_from_path(s.rel) if raw_captions else s.caption
        split = "heldout" if s.package == heldout else split_of(rel, test_frac, valid_frac)
        rows.append({"path": rel, "caption": caption, "tags": [s.label] if s.label else [], "split": split,
                     "id": f"{s.package}:{s.rel}"})
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/real_corpus.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output shard directory (e.g. shards/real)")
    p.add_argument("--cache", type=Path, default=Path(".cache/real"), help="downloaded .debs and unpacked trees")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), help="training packages")
    p.add_argument("--heldout", default=DEFAULT_HELDOUT, help="a whole package never trained on ('' for none)")
    p.add_argument("--test-frac", type=float, default=0.1)
    p.add_argument("--valid-frac", type=float, default=0.05)
    p.add_argument("--raw-captions", action="store_true", help="uncleaned path captions (for measurement)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="cap per clip (default 10 s)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    wanted = list(dict.fromkeys(args.packages + ([args.heldout] if args.heldout else [])))
    if args.heldout and args.heldout in args.packages:
        print(f"real_corpus: --heldout {args.heldout} is also in --packages; a held-out package is never trained on",
              file=sys.stderr)
        return 2
    bad = [p for p in wanted if p not in TRAIN_PACKAGES]
    if bad:
        print(f"real_corpus: {bad} are not among the packages allowed for training and tuning: "
              f"{', '.join(TRAIN_PACKAGES)}", file=sys.stderr)
        return 2
    cache = args.cache.resolve()
    sounds: list[SoundFile] = []
    try:
        for name in wanted:
            root = unpack_deb(fetch_package(name, cache / "debs"), cache / "tree" / name)
            found = package_sounds(name, root)
            print(f"real_corpus: {name}: {len(found)} audio files", file=sys.stderr)
            sounds += found
    except PackageError as exc:
        print(f"real_corpus: {exc}", file=sys.stderr)
        return 2
    rows = corpus_rows(sounds, cache / "tree", args.heldout or None, args.test_frac, args.valid_frac, args.raw_captions)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "corpus.jsonl"
    with open(manifest, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    by_split = Counter(r["split"] for r in rows)
    labels = Counter(t for r in rows for t in r["tags"])
    print(f"real_corpus: {len(rows)} clips by split {dict(by_split)}; labels {dict(labels.most_common())}", file=sys.stderr)

    from clapscale.shards.cli import main as make_shards

    cmd = ["--from-manifest", str(manifest), "--root", str(cache / "tree"), "--out", str(args.out),
           "--workers", str(args.workers), "--shard-size", str(args.shard_size), "--max-seconds", str(args.max_seconds)]
    return make_shards(cmd + (["--quiet"] if args.quiet else []))
