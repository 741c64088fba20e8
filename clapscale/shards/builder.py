"""The make_shards engine: items -> decoded, checked, de-duplicated samples -> resumable shards.

Resumability by construction:
- The items of a split are put in a seeded random order (``--shuffle-seed``, recorded in the manifest)
  and cut into fixed *units* of ``shard_size`` items. The order depends only on the seed and the
  items, so a rerun cuts the same units and rebuilds exactly the ones that are missing.
- Shards are numbered densely: a unit whose items were all rejected writes no shard and takes no
  number, so a brace spec ``{000000..NNNNNN}`` over the manifest's shards has no hole. A unit's
  number is the count of shards written by the units before it, known from their done-records.
- A unit is complete when ``OUT/.make_shards/<split>/NNNNNN.done.json`` exists. It is written after
  the shard's tar and index were renamed into place (``writer.write_shard`` is atomic), so after a
  Ctrl-C or kill -9 every final-named tar is whole, and a tar without its done-file is rebuilt
  (byte-identical: the tar headers are deterministic).
- Duplicate removal ("first occurrence in build order wins": the copy in the earlier shard is kept)
  and rejects are recorded per unit, and units are completed in order; a rerun keeps only the unbroken prefix of completed units, so it reaches the
  same result as an uninterrupted run.
- ``plan.json`` holds a fingerprint of the split's items and options; a rerun with different
  inputs into the same OUT is refused instead of mixing two shard sets.

Why shuffle: sources list files in path order, and a folder-per-class tree (or a manifest grouped by
class) would become class-clustered shards; a loader's shuffle buffer only mixes neighbouring shards,
so batches would hold a few classes each. Keys are re-assigned in the shuffled order, so the members
of a shard (stored in key order) are shuffled too: a buffer smaller than a shard (DALI divides its
buffer among its readers) then still draws from every class in the shard. The synthetic corpus is
exempt: its clips are independent draws in index order already, and keeping that order keeps the
demo's shards unchanged.

A decoder that hangs (a FIFO, a stalled network mount, a codec stuck in a loop) is stopped after
``--clip-timeout`` seconds and the clip is rejected with code ``timeout``; the run goes on.

``--max-seconds S``: longer clips are *truncated* to their first S seconds (not rejected); their
JSON records ``truncated_from`` (the original duration in seconds).
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import tarfile
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf

from clapscale.shards import synthetic
from clapscale.shards.audio_io import (
    SAMPLE_RATE, SILENCE_PEAK, AudioDecodeError, EncodedAudio, encode_flac_stream, iter_audio,
)
from clapscale.shards.index import idx_path_of
from clapscale.shards.sources import Item, assign_keys
from clapscale.shards.writer import (
    EncodedSample, ShardInfo, encode_record, shard_name, update_manifest, write_json, write_shard,
)

STATE_DIR = ".make_shards"
REJECTS_NAME = "rejects.jsonl"
MIN_SECONDS = 0.1


class BuildError(RuntimeError):
    """The build as a whole cannot proceed (an OUT holding another shard set, no input, ...)."""


DEFAULT_CLIP_TIMEOUT = 600.0


@dataclass
class BuildOptions:
    out: Path
    shard_size: int = 512
    workers: int = 1
    max_seconds: float | None = None
    exclude: dict[str, str] = field(default_factory=dict)  # content hash -> where it came from
    progress: bool = True
    # Seed of the item order within each split; None keeps the source's order (sorted paths, manifest rows).
    shuffle_seed: int | None = 0
    # Seconds one clip may take in a worker before it is rejected as ``timeout`` (None: no limit;
    # not enforced with ``workers == 0``, which decodes in this process).
    clip_timeout: float | None = DEFAULT_CLIP_TIMEOUT


@dataclass
class Outcome:
    """What a worker returns for one item: a sample, or a reject with its reason."""

    item_index: int
    sample: EncodedSample | None = None
    code: str | None = None
    reason: str | None = None
    truncated: bool = False


@dataclass
class BuildSummary:
    accepted: int = 0
    rejected: int = 0
    seconds: float = 0.0
    truncated: int = 0
    shards: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    skipped_units: int = 0  # complete before this run started (resumed)

    def format(self, out: Path) -> str:
        lines = [
            f"accepted {self.accepted} clips, {self.seconds / 3600:.3f} hours, in {self.shards} shards under {out}",
            f"rejected {self.rejected}" + (f" (see {out / REJECTS_NAME})" if self.rejected else ""),
        ]
        lines += [f"  {n:6d}  {code}" for code, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])]
        if self.truncated:
            lines.append(f"truncated to --max-seconds: {self.truncated}")
        if self.skipped_units:
            lines.append(f"resumed: {self.skipped_units} shard unit(s) were already complete")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- per clip (worker side)

def _check_audio(audio: EncodedAudio) -> tuple[str, str] | None:
    if audio.samples < MIN_SECONDS * SAMPLE_RATE:
        return "too_short", f"too short: {audio.samples / SAMPLE_RATE:.3f} s (minimum {MIN_SECONDS} s)"
    peak = audio.peak
    if peak < SILENCE_PEAK:
        return "silent", f"all-silent: peak {20 * np.log10(max(peak, 1e-12)):.1f} dBFS after downmix to mono"
    return None


def build_sample(index: int, item: Item, max_seconds: float | None) -> Outcome:
    """Decode, check and encode one item (runs in a worker process)."""
    if item.reject:
        return Outcome(index, code=item.reject_code or "rejected", reason=item.reject)
    truncated_from = None
    try:
        if item.synthetic_index is not None:
            record = synthetic.make_clip(item.split, item.synthetic_index, item.synthetic_seed)
            if max_seconds is not None and record["audio"].size > max_seconds * SAMPLE_RATE:
                truncated_from = record["audio"].size / SAMPLE_RATE
                record["audio"] = record["audio"][: int(max_seconds * SAMPLE_RATE)]
                record["events"] = [{**e, "end": min(e["end"], max_seconds)} for e in record["events"]
                                    if e["start"] < max_seconds]
            record["audio"] = encode_flac_stream([record["audio"]])
            if item.synthetic_image:
                record["image"] = synthetic.render_picture(record["tag"], item.split, item.synthetic_index,
                                                           item.synthetic_seed)
        else:
            frames = None
            if item.video_frames:
                # A video: its audio track and a strip of frames (shards/video.py).
                from clapscale.shards.video import read_video

                audio, frames, seconds = read_video(item.path, SAMPLE_RATE, max_seconds, item.video_frames,
                                                    item.frame_size)
                if max_seconds is not None and seconds > max_seconds:
                    truncated_from = round(seconds, 6)
            else:
                # Decoded, resampled and encoded in blocks: a clip costs its FLAC bytes, whatever its length.
                audio = encode_flac_stream(iter_audio(item.path, SAMPLE_RATE, max_seconds))
                if max_seconds is not None:
                    info = sf.info(item.path)
                    if info.duration > max_seconds:
                        truncated_from = round(info.duration, 6)
            record = {"audio": audio, "text": item.text, "tag": item.tag, "source": item.source,
                      "original": item.original, **item.extra}
            if frames is not None:
                record["image"], record["video_frames"] = frames, item.video_frames
            if item.licence:
                record["licence"] = item.licence
            if item.image:
                with open(item.image, "rb") as f:
                    record["image"] = f.read()
        problem = _check_audio(record["audio"])
        if problem:
            return Outcome(index, code=problem[0], reason=f"{item.original}: {problem[1]}")
        record["key"] = item.key
        if truncated_from is not None:
            record["truncated_from"] = truncated_from
        return Outcome(index, sample=encode_record(record, item.split), truncated=truncated_from is not None)
    except AudioDecodeError as exc:
        return Outcome(index, code=exc.code, reason=f"{item.original}: {exc.reason}")
    except (ValueError, OSError, RuntimeError, MemoryError) as exc:
        # One broken file must not end a run over thousands; it is reported with its cause.
        return Outcome(index, code="error", reason=f"{item.original}: {type(exc).__name__}: {exc}")


_WORKER_ITEMS: list[Item] = []
_WORKER_MAX_SECONDS: float | None = None
_WORKER_TIMEOUT: float | None = None
_WORKER_STARTED: "ctypes.Array[ctypes.c_byte] | None" = None


def _init_worker(items: list[Item], max_seconds: float | None, timeout: float | None,
                 started: "ctypes.Array[ctypes.c_byte]", parent_pid: int) -> None:
    global _WORKER_ITEMS, _WORKER_MAX_SECONDS, _WORKER_TIMEOUT, _WORKER_STARTED
    # Ctrl-C is handled once, by the parent, which stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The clip timeout is SIGALRM's default action, which ends the process even inside a C decoder
    # that never returns to Python; a handler inherited from the parent (pytest-timeout) would not.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    # After a kill -9 of the parent nothing would ever tell the workers to exit: forked siblings
    # keep the task queue's write end open. Ask Linux to kill them with their parent.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    _WORKER_ITEMS, _WORKER_MAX_SECONDS, _WORKER_TIMEOUT, _WORKER_STARTED = items, max_seconds, timeout, started


def _work(index: int) -> Outcome:
    # Marks the item as in flight (shared with the parent), so that when the pool breaks the parent
    # knows which clips were being decoded: only those are suspects.
    _WORKER_STARTED[index] = 1
    if _WORKER_TIMEOUT:
        signal.setitimer(signal.ITIMER_REAL, _WORKER_TIMEOUT)
    try:
        return build_sample(index, _WORKER_ITEMS[index], _WORKER_MAX_SECONDS)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _isolated_main(send: "multiprocessing.connection.Connection", index: int, items: list[Item],
                   opts: BuildOptions, started: "ctypes.Array[ctypes.c_byte]", parent_pid: int) -> None:
    _init_worker(items, opts.max_seconds, opts.clip_timeout, started, parent_pid)
    send.send(_work(index))


# ----------------------------------------------------------------------------- exclusion sets

def read_hashes_from_shards(path: Path) -> dict[str, str]:
    """content_hash -> key for every sample JSON in a shard set directory or a single tar."""
    path = Path(path)
    tars = [path] if path.is_file() else sorted(path.glob("*/*.tar")) + sorted(path.glob("*.tar"))
    out = {}
    for tar_path in tars:
        with tarfile.open(tar_path) as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(member).read())
                    if meta.get("content_hash"):
                        out[meta["content_hash"]] = f"{tar_path}:{member.name[:-5]}"
    return out


def load_exclusions(paths: Iterable[Path]) -> dict[str, str]:
    """``--exclude`` arguments: shard set directories / tars, or text files of hex hashes (one a line)."""
    out: dict[str, str] = {}
    for p in map(Path, paths):
        if p.is_dir() or p.suffix == ".tar":
            if not p.exists():
                raise BuildError(f"--exclude {p}: no such shard set")
            found = read_hashes_from_shards(p)
            if not found:
                raise BuildError(f"--exclude {p}: no samples with a content_hash found (is it a shard set?)")
            out.update(found)
        elif p.is_file():
            for lineno, line in enumerate(p.read_text().splitlines(), 1):
                h = line.split("#", 1)[0].strip().lower()
                if not h:
                    continue
                if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                    raise BuildError(f"--exclude {p}:{lineno}: {h!r} is not a sha256 content hash")
                out[h] = f"{p}:{lineno}"
        else:
            raise BuildError(f"--exclude {p}: no such file or directory")
    return out


# ----------------------------------------------------------------------------- state

def _fingerprint(items: list[Item], opts: BuildOptions, shuffle_seed: int | None) -> str:
    h = hashlib.sha256()
    options = [opts.shard_size, opts.max_seconds, sorted(opts.exclude)]
    # Unshuffled plans keep the fingerprint they had before shuffling existed, so a shard set made
    # then (the demo's) is still recognised as complete.
    if shuffle_seed is not None:
        options.append({"shuffle_seed": shuffle_seed})
    h.update(json.dumps(options, default=str).encode())
    for it in items:
        h.update(json.dumps(it.fingerprint(), sort_keys=True, default=str).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _units(items: list[Item], size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size)]


def split_shuffle_seed(items: list[Item], opts: BuildOptions) -> int | None:
    """The seed that orders ``items`` (one split), or None where they keep the source's order: with
    ``opts.shuffle_seed=None``, and for the synthetic corpus, whose clips are independent draws already."""
    if opts.shuffle_seed is None or all(it.synthetic_index is not None for it in items):
        return None
    return opts.shuffle_seed


def shuffled(items: list[Item], seed: int | None) -> list[Item]:
    """``items`` (one split) in build order; ``seed=None``: unchanged.

    Otherwise copies, sorted by sha256 of (seed, original) (ties keep the source order) and with keys
    re-assigned in that order, so that a shard's members, which are stored in key order, are shuffled
    as well. A hash rather than a seeded shuffle: the order can never change with a Python or NumPy
    version, so a resumed run always cuts the same units as the run it finishes.
    """
    if seed is None:
        return list(items)
    order = sorted(items, key=lambda it: hashlib.sha256(
        f"{seed}/{it.original}".encode("utf-8", "surrogateescape")).digest())
    out = [replace(it) for it in order]
    assign_keys(out)
    return out


def _clean_stale_temps(split_dir: Path) -> None:
    if split_dir.is_dir():
        for tmp in split_dir.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def _prepare_split(out: Path, split: str, items: list[Item], opts: BuildOptions, shuffle_seed: int | None) -> Path:
    state = out / STATE_DIR / split
    plan_path = state / "plan.json"
    fp = _fingerprint(items, opts, shuffle_seed)
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if plan.get("fingerprint") != fp:
            # Plans written before make_shards shuffled carry no seed: their units are in source order.
            hint = ("; it was started by a make_shards that did not shuffle: add --no-shuffle to finish it"
                    if "shuffle_seed" not in plan and shuffle_seed is not None else "")
            raise BuildError(
                f"{out}/{split} was started with different inputs or options (plan fingerprint differs); "
                f"rerun the original command to finish it, or use another --out{hint}"
            )
    else:
        if any((out / split).glob("*.tar")):
            raise BuildError(f"{out / split} already holds shards not made by this command; use another --out")
        state.mkdir(parents=True, exist_ok=True)
        write_json(plan_path, {"fingerprint": fp, "items": len(items), "shard_size": opts.shard_size,
                               "shuffle_seed": shuffle_seed})
    # A run killed mid-write leaves temps beside the shards and beside the done markers.
    _clean_stale_temps(out / split)
    _clean_stale_temps(state)
    return state


# ----------------------------------------------------------------------------- driver

def _new_pool(workers: int, items: list[Item], opts: BuildOptions,
              started: "ctypes.Array[ctypes.c_byte]") -> ProcessPoolExecutor:
    # fork: workers inherit the item list instead of unpickling it per task.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker,
                               initargs=(items, opts.max_seconds, opts.clip_timeout, started, os.getpid()))


def _stop(pool: ProcessPoolExecutor) -> None:
    # Queued clips are cancelled; clips in flight finish (each takes well under a second or so).
    # Terminating workers instead can leave the executor's result pipe half-written, and the
    # interpreter then hangs at exit joining the executor's management thread.
    pool.shutdown(wait=False, cancel_futures=True)


def _isolated(i: int, items: list[Item], opts: BuildOptions, started: "ctypes.Array[ctypes.c_byte]") -> Outcome:
    """Retry one item alone in a fresh process: a second death convicts it, not its neighbours.

    A plain process rather than a one-worker pool, so that its exit status tells a clip that ran out of
    time (killed by its own SIGALRM) from one that crashed the decoder.
    """
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_main, args=(send, i, items, opts, started, os.getpid()), daemon=True)
    proc.start()
    send.close()
    try:
        # Poll rather than block: the answer (FLAC bytes) may exceed the pipe's buffer, so it must be
        # read while the child is alive, and a child that died leaves nothing to read.
        while not recv.poll(0.05) and proc.is_alive():
            pass
        try:
            outcome = recv.recv() if recv.poll() else None
        except (EOFError, OSError):
            outcome = None
    finally:
        if proc.is_alive():  # interrupted (Ctrl-C) while waiting
            proc.kill()
        proc.join()
        recv.close()
    if outcome is not None:
        return outcome
    item = items[i]
    if proc.exitcode == -signal.SIGALRM:
        return Outcome(i, code="timeout", reason=f"{item.original}: decoding took longer than the clip timeout of "
                                                 f"{opts.clip_timeout:g} s (a file that blocks on read, e.g. a FIFO or a "
                                                 "stalled network mount, or a decoder stuck in a loop)")
    return Outcome(i, code="crash", reason=f"{item.original}: the decoder process died on this file (e.g. a "
                                             "segfault in a codec library)")


def _completed(outcome: Outcome) -> Future:
    fut: Future = Future()
    fut.set_result(outcome)
    return fut


def _outcomes(items: list[Item], todo: list[int], opts: BuildOptions) -> Iterator[Outcome]:
    """Outcomes of ``todo`` in order. ``workers == 0`` runs in this process (for debugging);
    otherwise clips are decoded in worker processes so that a crashing or hanging codec costs one clip."""
    if opts.workers == 0:
        for i in todo:
            yield build_sample(i, items[i], opts.max_seconds)
        return
    started = multiprocessing.RawArray(ctypes.c_byte, len(items))  # shared with the forked workers
    pool = _new_pool(opts.workers, items, opts, started)
    pending: collections.deque[tuple[int, Future]] = collections.deque()
    queue = iter(todo)
    try:
        while True:
            # A bounded window keeps memory flat and the order of results fixed.
            while len(pending) < 4 * opts.workers and (i := next(queue, None)) is not None:
                pending.append((i, pool.submit(_work, i)))
            if not pending:
                return
            try:
                outcome = pending[0][1].result()
            except BrokenProcessPool:
                # A worker died (a codec crash, or a clip that ran out of time). The clips that were in
                # flight are the suspects: each is retried alone; the others go to a fresh pool.
                _stop(pool)
                pool = _new_pool(opts.workers, items, opts, started)
                retried: collections.deque[tuple[int, Future]] = collections.deque()
                for j, fut in pending:
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        retried.append((j, fut))
                    elif started[j]:
                        retried.append((j, _completed(_isolated(j, items, opts, started))))
                    else:
                        retried.append((j, pool.submit(_work, j)))
                pending = retried
                continue
            pending.popleft()
            yield outcome
    finally:
        _stop(pool)


def build(items: list[Item], opts: BuildOptions) -> BuildSummary:
    """Build (or finish building) the shard set for ``items`` under ``opts.out``; returns the summary."""
    from tqdm import tqdm

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_DIR).mkdir(exist_ok=True)
    lock = open(out / STATE_DIR / "lock", "w")
    try:
        # A POSIX record lock belongs to this process only; forked workers do not inherit it.
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BuildError(f"another make_shards run is writing {out}; wait for it to finish") from None
    try:
        return _build_locked(items, opts, out, tqdm)
    finally:
        lock.close()


def _build_locked(items: list[Item], opts: BuildOptions, out: Path, tqdm) -> BuildSummary:
    by_split: dict[str, list[Item]] = collections.OrderedDict()
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    flat: list[Item] = []
    plan = []  # (split, unit number, flat indices, done path)
    seen: dict[str, str] = {}  # content hash -> key that kept it
    shards_before: dict[str, int] = {}  # split -> shards written by the completed prefix of units
    skipped = 0
    for split, split_items in by_split.items():
        seed = split_shuffle_seed(split_items, opts)
        split_items = shuffled(split_items, seed)
        state = _prepare_split(out, split, split_items, opts, seed)
        base = len(flat)
        flat += split_items
        kept = set()
        for u, idx in enumerate(_units(split_items, opts.shard_size)):
            done = state / f"{u:06d}.done.json"
            # Only a prefix of units counts as done: duplicate removal and shard numbers depend on
            # every earlier unit, so anything after the first missing unit is rebuilt with it.
            if done.exists() and not plan:
                skipped += 1
                record = json.loads(done.read_text())
                for key, h, _ in record["accepted"]:
                    seen.setdefault(h, key)
                if record["shard"]:
                    kept.add(record["shard"]["name"])
            else:
                done.unlink(missing_ok=True)
                plan.append((split, u, [base + i for i in idx], done))
        shards_before[split] = len(kept)
        _remove_unrecorded_shards(out / split, kept)

    todo = [i for _, _, idx, _ in plan for i in idx]
    bar = tqdm(total=len(flat), initial=len(flat) - len(todo), unit="clip", disable=not opts.progress,
               file=sys.stderr, desc="make_shards")
    stream = _outcomes(flat, todo, opts)
    try:
        for split, u, idx, done in plan:
            unit = []
            for _ in idx:
                unit.append(next(stream))
                bar.update(1)
            if _finish_unit(out, split, shards_before[split], unit, flat, seen, opts, done):
                shards_before[split] += 1
    finally:
        stream.close()
        bar.close()
    summary = finalize(out, list(by_split))
    summary.skipped_units = skipped
    return summary


def _remove_unrecorded_shards(split_dir: Path, kept: set[str]) -> None:
    """Delete shards of an interrupted run that no done-record names: their units are rebuilt, and a
    rebuilt unit may now write no shard (a clip timed out this time), which would leave a stray tar."""
    if split_dir.is_dir():
        for tar in split_dir.glob("*.tar"):
            if tar.name not in kept:
                idx_path_of(tar).unlink(missing_ok=True)
                tar.unlink()


def _finish_unit(out: Path, split: str, number: int, unit: list[Outcome], flat: list[Item], seen: dict[str, str],
                 opts: BuildOptions, done: Path) -> bool:
    """Write the unit's accepted samples as shard ``number`` (none if all were rejected) and its
    done-record; returns whether a shard was written."""
    samples, rejects, accepted = [], [], []
    truncated = 0
    for o in unit:
        item = flat[o.item_index]
        if o.sample is not None:
            h = o.sample.meta["content_hash"]
            if h in opts.exclude:
                o.code, o.reason = "excluded", f"{item.original}: content hash is in the --exclude set ({opts.exclude[h]})"
            elif h in seen:
                o.code, o.reason = "duplicate", f"{item.original}: exact duplicate of sample {seen[h]}"
            else:
                seen[h] = o.sample.key
                samples.append(o.sample)
                accepted.append([o.sample.key, h, o.sample.meta["duration"]])
                truncated += o.truncated
                continue
        rejects.append({"path": item.original, "split": split, "key": item.key, "code": o.code, "reason": o.reason})
    info = write_shard(out / split / shard_name(number), samples) if samples else None
    write_json(done, {"shard": asdict(info) if info else None, "accepted": accepted, "rejects": rejects,
                      "truncated": truncated})
    return info is not None


def finalize(out: Path, splits: list[str] | None = None) -> BuildSummary:
    """Write sizes.json, manifest.json and rejects.jsonl from the completed units of every split in
    ``out``; return the summary of ``splits`` (default: all)."""
    out = Path(out)
    state_root = out / STATE_DIR
    all_splits = sorted(p.name for p in state_root.iterdir() if p.is_dir()) if state_root.is_dir() else []
    summary = BuildSummary()
    all_rejects = []
    for split in all_splits:
        infos, rejects, truncated = [], [], 0
        for done in sorted((state_root / split).glob("*.done.json")):
            d = json.loads(done.read_text())
            if d["shard"]:
                infos.append(ShardInfo(**d["shard"]))
            rejects += d["rejects"]
            truncated += d.get("truncated", 0)
        plan_path = state_root / split / "plan.json"
        seed = json.loads(plan_path.read_text()).get("shuffle_seed") if plan_path.exists() else None
        # By path, not in the shuffled build order, so that a user reads them as the source lists them.
        rejects.sort(key=lambda r: (r["path"], r["key"]))
        update_manifest(out, split, infos, extra={"rejected": len(rejects), "truncated": truncated,
                                                  "shuffle_seed": seed})
        all_rejects += rejects
        if splits is None or split in splits:
            summary.accepted += sum(i.samples for i in infos)
            summary.seconds += sum(i.seconds for i in infos)
            summary.shards += len(infos)
            summary.truncated += truncated
            summary.rejected += len(rejects)
            for r in rejects:
                summary.reasons[r["code"]] = summary.reasons.get(r["code"], 0) + 1
    tmp = out / f".{REJECTS_NAME}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in all_rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out / REJECTS_NAME)
    return summary
