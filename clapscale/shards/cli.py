"""``tools/make_shards.py`` / ``clapscale shards``: build, verify or index WebDataset shards.

Exit codes: 0 success; 1 a build where no clip was accepted, --verify found problems, or a shard
could not be indexed; 2 bad arguments or an unusable source; 130 interrupted (rerun the same
command to finish).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clapscale.shards import sources
from clapscale.shards.builder import (
    DEFAULT_CLIP_TIMEOUT, REJECTS_NAME, BuildError, BuildOptions, build, load_exclusions,
)
from clapscale.shards.writer import KEY_RE

EPILOG = """\
examples:
  make_shards.py --synthetic 2400 --out shards/demo --workers 2
  make_shards.py --from-dir /usr/share/games/wesnoth/1.16/data/core/sounds --out shards/wesnoth
  make_shards.py --from-manifest clips.csv --root /data/audio --out shards/mine
  make_shards.py --preset esc50 ~/datasets/ESC-50-master --out shards/esc50
  make_shards.py --preset audioset ~/audioset --out shards/audioset --exclude-ytids audiocaps/test.csv
  make_shards.py --from-dir raw/ --out shards/train --exclude shards/esc50 shards/clotho
  make_shards.py --verify shards/demo
  make_shards.py index ~/laion/clotho        (DALI indexes for shards made elsewhere; see `index --help`)

Over-long clips: with --max-seconds S, a clip longer than S seconds is truncated to its first
S seconds (not rejected); its JSON records truncated_from. Without it clips are kept whole.
An interrupted run (Ctrl-C, kill -9) is finished by rerunning the same command.

Order: clips are shuffled (seeded by --shuffle-seed, recorded in manifest.json) before they are cut
into shards, so a folder-per-class tree does not become class-clustered shards. A clip that takes
longer than --clip-timeout seconds to decode (a FIFO, a stalled mount) is rejected as `timeout`.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards.py", description="Turn raw audio + captions into verified WebDataset shards (48 kHz mono FLAC + JSON).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-dir", type=Path, metavar="SRC", help="walk SRC; captions from folder and file names")
    src.add_argument("--from-manifest", type=Path, metavar="FILE", help="CSV/TSV/JSONL with path, caption(s) or tags, split, id, licence")
    src.add_argument("--synthetic", type=int, metavar="N", help="N clips of the built-in synthetic corpus (80/10/10 train/valid/test)")
    src.add_argument("--preset", nargs=2, metavar=("NAME", "PATH"), help=f"a dataset's own folder: {', '.join(sources.PRESETS)}")
    src.add_argument("--verify", type=Path, metavar="OUT", help="re-read the shard set OUT and check it; non-zero exit on any problem")
    p.add_argument("--out", type=Path, help="output directory of the shard set")
    p.add_argument("--split", default="train", help="split name for --from-dir, and the default for manifest rows (default: train)")
    p.add_argument("--root", type=Path, help="--from-manifest: directory the paths are relative to (default: the manifest's folder); "
                                              "paths escaping it are rejected")
    p.add_argument("--exclude", type=Path, nargs="+", default=[], metavar="HASHES_OR_SHARDS",
                   help="drop clips whose content hash is in these shard sets / tars / text files of hashes")
    p.add_argument("--workers", type=int, default=1,
                   help="decoding processes (default 1; 0 decodes in this process, for debugging)")
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    p.add_argument("--max-seconds", type=float, default=None, help="truncate longer clips to their first S seconds")
    p.add_argument("--seed", type=int, default=0, help="--synthetic: corpus seed (default 0)")
    p.add_argument("--synthetic-images", action="store_true",
                   help="--synthetic: store with each clip a rendered picture of its sound classes (<key>.jpg)")
    p.add_argument("--video-frames", type=int, default=0, metavar="K",
                   help="--from-dir: take video files too (.mp4 .mkv .webm .mov ...): their audio track and K frames "
                        "at equal spacing, stored as one <key>.jpg strip (VIP-ANT samples 4; default 0: skip videos)")
    p.add_argument("--frame-size", type=int, default=224, metavar="PIXELS",
                   help="--video-frames: side of each stored square frame, a multiple of 16 (default 224, CLIP's)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the clip order within each split (default 0; --synthetic keeps its own random order)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep the source's order (sorted paths, manifest rows) instead of shuffling")
    p.add_argument("--clip-timeout", type=float, default=DEFAULT_CLIP_TIMEOUT, metavar="SECONDS",
                   help=f"reject a clip whose decoding takes longer (default {DEFAULT_CLIP_TIMEOUT:g}; 0: no limit; "
                        "not applied with --workers 0)")
    p.add_argument("--drop-mids", metavar="MID[,MID...]",
                   help="--preset audioset: remove these labels from every clip (e.g. /m/09x0r,/m/04rlf for speech, "
                        "music); clips left without labels are rejected as all_labels_dropped")
    p.add_argument("--exclude-ytids", type=Path, metavar="FILE",
                   help="--preset audioset: reject clips with these YouTube ids (one a line, or a CSV with a "
                        "youtube_id column such as AudioCaps' test.csv) as excluded_ytid")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _items(args: argparse.Namespace) -> list[sources.Item]:
    if (args.drop_mids or args.exclude_ytids is not None) and args.preset is None:
        raise sources.SourceError("--drop-mids and --exclude-ytids apply to --preset audioset only")
    if args.from_dir is not None:
        items = sources.from_dir(args.from_dir, args.split, args.video_frames, args.frame_size)
    elif args.from_manifest is not None:
        items = sources.from_manifest(args.from_manifest, args.root, args.split)
    elif args.synthetic is not None:
        items = sources.from_synthetic(args.synthetic, args.seed, images=args.synthetic_images)
    else:
        options: dict[str, object] = {}
        if args.drop_mids:
            options["drop_mids"] = [m.strip() for m in args.drop_mids.split(",") if m.strip()]
        if args.exclude_ytids is not None:
            options["exclude_ytids"] = sources.read_ytid_list(args.exclude_ytids)
        items = sources.from_preset(args.preset[0], Path(args.preset[1]), **options)
    sources.assign_keys(items)
    return items


INDEX_EPILOG = """\
Shards written by make_shards already have their index. Shards from elsewhere (LAION's
0.tar, 1.tar, ... with sizes.json and no .idx) need this once before data.backend=dali reads them:
  clapscale shards index ~/laion/audiocaps         (every *.tar below the directory)
An existing .idx is kept unless --force. The webdataset backend needs no index.
"""


def _index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clapscale shards index",
        description="Write DALI's wds2idx index (N.idx beside N.tar) for shards that lack one, in place. "
        "Reads only the tar headers (any tar format); samples are grouped as the webdataset loader groups "
        "them (key = member name up to the first dot of its basename).",
        epilog=INDEX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", type=Path, nargs="+", metavar="DIR_OR_TAR", help="shard directories (searched recursively) or tars")
    p.add_argument("--force", action="store_true", help="rewrite indexes that already exist")
    return p


def index_main(argv: list[str]) -> int:
    """`clapscale shards index DIR...`: index every tar below DIR that has no .idx yet."""
    from clapscale.shards.index import ShardIndexError, find_tars, idx_path_of, index_tar, write_index

    args = _index_parser().parse_args(argv)
    try:
        tars = find_tars(args.paths)
    except FileNotFoundError as e:
        print(f"shards index: {e}", file=sys.stderr)
        return 2
    if not tars:
        print(f"shards index: no *.tar under {' '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    written = kept = samples = failed = 0
    for tar in tars:
        if idx_path_of(tar).exists() and not args.force:
            kept += 1
            continue
        try:
            index = index_tar(tar)
            write_index(tar, index)
        except (ShardIndexError, OSError) as e:
            print(f"PROBLEM {e}", file=sys.stderr)
            failed += 1
            continue
        if index.truncated:
            print(f"PROBLEM {tar}: the file ends inside a sample (a truncated download?); indexed the "
                  f"{len(index.lines)} complete sample(s) before the cut", file=sys.stderr)
            failed += 1
        written += 1
        samples += len(index.lines)
    print(f"indexed {written} shard(s), {samples} samples; {kept} already had an index"
          + (f"; {failed} problem(s)" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["index"]:
        return index_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.verify is not None:
        from clapscale.shards.verify import verify_shards

        report = verify_shards(args.verify, workers=max(args.workers, 1))
        for note in report.notes:
            print(f"NOTE {note}")
        for problem in report.problems:
            print(f"PROBLEM {problem}", file=sys.stderr)
        status = "OK" if report.ok else f"FAILED with {len(report.problems)} problem(s)"
        print(f"verify {args.verify}: {status}; {report.shards} shards, {report.samples} samples, "
              f"{report.seconds / 3600:.3f} hours")
        return 0 if report.ok else 1
    if args.out is None:
        print("make_shards: --out is required to build shards", file=sys.stderr)
        return 2
    if not KEY_RE.match(args.split):
        print(f"make_shards: invalid --split {args.split!r}: letters, digits, '_' and '-' only", file=sys.stderr)
        return 2
    if (args.shard_size < 1 or args.workers < 0 or (args.max_seconds is not None and args.max_seconds <= 0)
            or args.clip_timeout < 0):
        print("make_shards: --shard-size must be >= 1, --workers >= 0, --max-seconds > 0 and --clip-timeout >= 0",
              file=sys.stderr)
        return 2
    if args.video_frames < 0 or args.frame_size < 16 or args.frame_size % 16:
        print("make_shards: --video-frames must be >= 0 and --frame-size a multiple of 16 (>= 16), got "
              f"{args.video_frames} and {args.frame_size}", file=sys.stderr)
        return 2
    try:
        items = _items(args)
        if not items:
            print(f"make_shards: the source has no audio files (extensions: {', '.join(sorted(sources.AUDIO_EXTENSIONS))})",
                  file=sys.stderr)
            return 1
        opts = BuildOptions(out=args.out, shard_size=args.shard_size, workers=args.workers,
                            max_seconds=args.max_seconds, exclude=load_exclusions(args.exclude), progress=not args.quiet,
                            shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
                            clip_timeout=args.clip_timeout or None)
        summary = build(items, opts)
    except (sources.SourceError, BuildError) as exc:
        print(f"make_shards: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmake_shards: interrupted; completed shards are kept. Rerun the same command to finish {args.out}.",
              file=sys.stderr)
        return 130
    print(summary.format(args.out))
    if summary.accepted == 0:
        print(f"make_shards: error: no clip was accepted ({summary.rejected} rejected); reasons are in "
              f"{args.out / REJECTS_NAME}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
