"""Reading tar shards: local files by seeking, remote URLs as streams, every byte counted.

``iter_tar_samples`` is the one place a shard's bytes are read. Local shards are opened for random
access, so samples that are not wanted (before ``start``, or while rebuilding a resume position) are
passed over by their headers without reading their data. Remote shards (``pipe:`` commands,
``http(s)://``: webdataset's openers) are read as one stream; passing over a sample there still
reads it. Every read goes through a ``ByteCounter`` so the loaders can report bytes read.

Two plans built on top of it:

- ``eval_plan``: which samples of which shard a rank reads in evaluation, so that the ranks together
  read every shard once (I/O stays ~1x the data for any world size) and each rank gets an equal
  share (a contiguous run of the spec's samples; a shard on a boundary is split by sample index).
- ``resume_stream``: an epoch's shuffled sample stream continued after ``position`` outputs. The
  shuffle buffer's choices depend only on how many items it has seen, so the position is rebuilt
  from the tar headers alone (which samples sit in the buffer, where the input stands) and only the
  buffered samples and what follows are read, instead of replaying every byte before the position.
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from clapscale.data.specs import is_remote
from clapscale.shards.index import split_member_name  # the shard writer's and indexer's rule

__all__ = ["ByteCounter", "ShuffleBuffer", "count_samples", "eval_plan", "iter_tar_samples", "resume_stream",
           "split_member_name"]

OnSkip = Callable[[str, str, str], None]


class ByteCounter:
    """Bytes read from shards by this process (``n``)."""

    def __init__(self) -> None:
        self.n = 0
        self._taken = 0

    def take(self) -> int:
        """Bytes read since the previous ``take``."""
        delta, self._taken = self.n - self._taken, self.n
        return delta


class _CountingReader:
    """A binary file object whose reads add to a ``ByteCounter`` (seek / tell passed through)."""

    def __init__(self, f: BinaryIO, counter: ByteCounter):
        self.f = f
        self.counter = counter

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.counter.n += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


def _quiet(reason: str, where: str, detail: str) -> None:
    """An ``on_skip`` for reads that repeat what an earlier pass already counted."""


def iter_tar_samples(
    url: str,
    on_skip: OnSkip,
    *,
    counter: ByteCounter | None = None,
    start: int = 0,
    stop: int | None = None,
    offset: int = 0,
    with_data: bool = True,
) -> Iterator[dict[str, Any]]:
    """Samples of one shard in file order: ``{"__key__", "__path__", "__url__", "__index__",
    "__offset__", ext: bytes, ...}``.

    ``__index__`` counts samples from where reading began; only samples with ``start <= __index__ <
    stop`` are yielded (reading ends once ``stop`` is reached). ``offset`` (local shards only) starts
    at the member header at that byte offset; ``__offset__`` is the header offset of a sample's first
    member (None for remote shards). ``with_data=False`` yields the samples' keys and offsets without
    reading their data (local shards: only the headers are read).

    A shard that cannot be opened or ends mid-member is reported through ``on_skip`` (reason,
    where, detail) and ends the shard; complete samples before the cut are still yielded.
    """
    counter = counter or ByteCounter()
    local = not is_remote(url)
    if offset and not local:
        raise ValueError(f"cannot seek in remote shard {url}")
    try:
        if local:
            # Unbuffered: a header read is 512 bytes from the disk, not a buffer's worth.
            f: Any = open(url, "rb", buffering=0)  # noqa: SIM115 - closed below
            f.seek(offset)
        else:
            # webdataset's opener handles pipe: / http URLs.
            from webdataset.gopen import gopen

            f = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any failure to open is the same skip for the caller
        on_skip("unreadable_shard", url, repr(e))
        return
    stream = _CountingReader(f, counter)
    current: dict[str, Any] | None = None
    index = -1
    done = False  # left early on purpose (stop reached, or the consumer stopped asking)
    error: BaseException | None = None
    try:
        # Random access for local files: tarfile then seeks over the data it is not asked for.
        with tarfile.open(fileobj=stream, mode="r:" if local else "r|*") as tar:  # type: ignore[call-overload]
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and current["__path__"] != key:
                    if current["__index__"] >= start:
                        yield current  # complete: the next sample's first header was read
                    current = None
                    if stop is not None and index + 1 >= stop:
                        done = True
                        break
                if current is None:
                    index += 1
                    current = {"__key__": key.rsplit("/", 1)[-1], "__path__": key, "__url__": url,
                               "__index__": index, "__offset__": member.offset if local else None}
                if with_data and index >= start:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} cut at {len(data)} of {member.size} bytes")
                    current[ext] = data
                else:
                    current[ext] = b""
    except GeneratorExit:
        done = True
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        error = e
    finally:
        if done and not local:
            # Leaving a stream early makes its command exit on SIGPIPE: not an error here.
            from webdataset.gopen import set_options

            set_options(f, ignore_errors=True)
        try:
            stream.close()
        except OSError as e:
            error = error or (None if done else e)
    if error is not None:
        on_skip("truncated_tar", url, repr(error))
        return
    if current is not None and not done and current["__index__"] >= start:
        yield current


def count_samples(url: str) -> int:
    """Samples in a local shard, from one pass over its tar headers (no member data is read)."""
    return sum(1 for _ in iter_tar_samples(url, _quiet, with_data=False))


# ----------------------------------------------------------------------------------------------
# Evaluation: each rank reads its own run of samples, whole shards where possible
# ----------------------------------------------------------------------------------------------


def eval_plan(urls: list[str], sizes: dict[str, int], rank: int, world_size: int) -> list[tuple[str, int, int | None]]:
    """``(url, start, stop)`` pieces rank ``rank`` reads in evaluation (``stop`` None: to the shard's end).

    The spec's samples, in spec order, are cut into ``world_size`` contiguous runs of
    ``floor(N / W)`` or ``ceil(N / W)`` samples (N from ``sizes``); a rank reads the shards its run
    covers, a shard on a run boundary only from / up to the boundary sample. So every sample is read
    by exactly one rank, and the ranks together read each shard about once. A shard holding more
    samples than ``sizes`` says gives its extra samples to the rank owning its last counted one
    (none is lost); one holding fewer leaves its rank short (the gathered result is the same).
    A table of zeros only (stale or hand-written) gives no runs to cut: rank 0 reads every shard whole.
    """
    total = sum(sizes[u] for u in urls)
    if total == 0:
        # Every run would be empty, so no rank would own the samples the shards do hold.
        return [(url, 0, None) for url in urls] if rank == 0 else []
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    pieces: list[tuple[str, int, int | None]] = []
    first = 0  # global index of the shard's first sample
    for url in urls:
        n = sizes[url]
        # The shard's last counted sample (or, if it claims none, its position) decides who reads
        # anything past the count.
        tail_owner = min(first + max(n - 1, 0), total - 1)
        start = min(max(lo - first, 0), n)
        stop: int | None = min(max(hi - first, 0), n)
        if lo <= tail_owner < hi:
            stop = None
        if stop is None or stop > start:
            pieces.append((url, start, stop))
        first += n
    return pieces


# ----------------------------------------------------------------------------------------------
# Training: the shuffle buffer and an epoch's stream resumed without replaying it
# ----------------------------------------------------------------------------------------------


class ShuffleBuffer:
    """Stream shuffle: keep ``size`` items, emit a random one as each new item arrives, then the rest
    in a random order (``size`` <= 1: no shuffle). Its state (``buf``, ``rng``, ``draining``) is
    explicit so a resumed stream can be rebuilt at any output."""

    def __init__(self, size: int, rng: random.Random):
        self.size = size
        self.rng = rng
        self.buf: list[Any] = []
        self.draining = False

    def run(self, items: Iterable[Any]) -> Iterator[Any]:
        """Shuffle ``items`` through the buffer (continuing from the current state)."""
        if self.size <= 1:
            yield from items
            return
        if not self.draining:
            for item in items:
                if len(self.buf) < self.size:
                    self.buf.append(item)
                    continue
                i = self.rng.randrange(len(self.buf))
                self.buf[i], item = item, self.buf[i]
                yield item
            self.rng.shuffle(self.buf)
            self.buf.reverse()  # pop() from the end yields them in shuffled order
            self.draining = True
        while self.buf:
            yield self.buf.pop()


class _Cursor:
    """Where an iteration over several shards stands: the shard index and the last sample taken."""

    def __init__(self) -> None:
        self.shard = 0
        self.last: dict[str, Any] | None = None


def _samples(urls: list[str], on_skip: OnSkip, counter: ByteCounter, cursor: _Cursor,
             with_data: bool) -> Iterator[dict[str, Any]]:
    for k, url in enumerate(urls):
        cursor.shard, cursor.last = k, None
        for s in iter_tar_samples(url, on_skip, counter=counter, with_data=with_data):
            cursor.last = s
            yield s


def resume_stream(
    urls: list[str], buffer_size: int, rng: random.Random, position: int, on_skip: OnSkip, counter: ByteCounter
) -> Iterator[dict[str, Any]]:
    """The samples of ``urls`` (read in order) through a ``ShuffleBuffer``, from output ``position`` on.

    Local shards: the first ``position`` outputs are rebuilt from the tar headers only, then the
    buffered samples are read by their offsets and the input continues after the last sample the
    buffer took. Remote shards cannot seek: the stream is replayed and the first ``position``
    outputs dropped. Either way a bad shard met before the position is not reported again (the
    saved skip counts hold it already).
    """
    sb = ShuffleBuffer(buffer_size, rng)
    if position == 0:
        yield from sb.run(_samples(urls, on_skip, counter, _Cursor(), True))
        return
    if any(is_remote(u) for u in urls):
        replaying = [True]

        def report(reason: str, where: str, detail: str) -> None:
            if not replaying[0]:
                on_skip(reason, where, detail)

        out = sb.run(_samples(urls, report, counter, _Cursor(), True))
        for n, _ in enumerate(out, 1):
            if n == position:
                replaying[0] = False
                yield from out
                return
        return
    cursor = _Cursor()
    refs = sb.run(_samples(urls, _quiet, counter, cursor, False))
    taken = sum(1 for _ in zip(range(position), refs))
    if taken < position:
        return  # the position is past the end of this epoch's stream
    # Swap the buffered headers for the samples themselves, read by offset.
    sb.buf = [_read_at(ref, counter) for ref in sb.buf]
    if sb.draining:
        yield from sb.run(())
        return
    rest: list[str] = []
    tail: Iterator[dict[str, Any]] = iter(())
    if cursor.last is not None:
        k = cursor.shard
        rest = urls[k + 1 :]
        tail = iter_tar_samples(urls[k], on_skip, counter=counter, offset=cursor.last["__offset__"], start=1)
    else:
        rest = urls[cursor.shard :]

    def following() -> Iterator[dict[str, Any]]:
        yield from tail
        yield from _samples(rest, on_skip, counter, _Cursor(), True)

    yield from sb.run(following())


def _read_at(ref: dict[str, Any], counter: ByteCounter) -> dict[str, Any]:
    """The sample whose headers ``ref`` describes, read at its offset."""
    for s in iter_tar_samples(ref["__url__"], _quiet, counter=counter, offset=ref["__offset__"], stop=1):
        return s
    raise RuntimeError(f"sample {ref['__key__']} of {ref['__url__']} could not be read again at byte "
                       f"{ref['__offset__']}: the shard changed since the position was saved")
