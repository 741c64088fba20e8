"""CPU loader over WebDataset tar shards (``data.backend: wds``).

Per sample: read the tar members -> shuffle buffer (training) -> decode FLAC with soundfile (never past
``audio.max_seconds``) -> length policy -> caption choice -> batch. Tokenisation happens in the main
process on each batch (the tokenizer is never pickled into workers).

Shard assignment:
  - training, ``data.resampled: true``: every worker keeps one shard open per source and draws the
    source of every sample by the mixing weights, so each source's share of samples is its weight
    whatever its shard sizes (binomial: within 3 * sqrt(w (1 - w) / n) of w after n samples, at
    99.7 %); a source's next shard is drawn with replacement when its open one ends. The generator is
    seeded by (seed, epoch, rank, worker); an epoch is nominal: total samples in the spec //
    (batch_size * world_size) batches per rank. The realised shares are counted
    (``WdsLoader.source_counts``) and logged at the end of every epoch.
  - training, ``data.resampled: false``: each epoch shuffles the shard list with (seed, epoch), gives
    rank r the shards r::world_size and worker w of that rank every W-th of those. A rank with no shard
    fails at start saying how many are needed. The last partial batch of each worker is dropped.
  - evaluation (``train=False``): the spec's samples (spec order, counts from ``shard_sizes``) are
    cut into one contiguous run per rank (``shardio.eval_plan``): a rank reads only the shards its run
    covers, a boundary shard only its part of it, so every sample is read exactly once across ranks
    and eval I/O stays ~1x the data for any world size. A rank's pieces are split over its workers.
    No shuffle, no random choice.

Epoch-mode resume rebuilds the shuffle buffer at the saved position from the tar headers and seeks
to the buffered samples and the next one (``shardio.resume_stream``): it reads no byte of the samples
already consumed, and reports no skip twice. ``WdsLoader.bytes_read`` counts the shard bytes read.

Workers are started afresh on every pass over the loader, from the loader's current epoch and
position, so the epoch counter reaches them (LAION-CLAP's kept a stale copy in persistent workers).
Every per-sample random choice (crop, fusion chunks, caption) comes from a generator seeded by
(seed, epoch, key), independent of the worker layout.
"""

from __future__ import annotations

import io
import json
import logging
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clapscale.config import AudioConfig, ConfigError, DataConfig
from clapscale.data.captions import EmptyCaptionError, choose_caption, clean_captions, normalise_tags
from clapscale.data.policies import PolicyResult, apply_length_policy, crop_offset, frames_of
from clapscale.data.shardio import ByteCounter, ShuffleBuffer, eval_plan, iter_tar_samples, resume_stream
from clapscale.data.specs import Source, all_urls, check_shards_exist, shard_sizes
from clapscale.shards.audio_io import SILENCE_PEAK

log = logging.getLogger(__name__)

# A 0-byte member counts as an absent one (missing_json, empty_audio) on both backends: DALI's reader
# hands an absent member over as a 0-byte one, so it cannot tell the two apart.
SKIP_REASONS = (
    "missing_json",  # a sample without a .json member, or with a 0-byte one
    "bad_json",  # .json that does not parse to an object
    "empty_caption",  # "text" empty or only blank strings
    "decode_error",  # .flac that libsndfile cannot decode
    "empty_audio",  # no audio: a sample without a .flac member, a 0-byte one, or one of zero samples
    "sample_rate",  # not the configured sample rate (shards are written at 48 kHz)
    "truncated_tar",  # a shard ending mid-member (samples before the cut are kept)
    "unreadable_shard",  # a shard that cannot be opened at all
    "silent",  # all-silent after downmix to mono (e.g. stereo channels that cancel), as make_shards rejects
    "missing_image",  # data.image_size > 0 and the sample has no (or a 0-byte) .jpg member
    "bad_image",  # a .jpg member that does not decode
)

WARN_REASONS = (
    "tag_coerced",  # "tag"/"tags" not a list of strings (a bare string or number): read, and counted
)


class SkipSample(Exception):
    """A bad sample; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipLog:
    """Counts skipped samples (or, with ``what``, other events such as coerced fields) per reason and
    logs them rate-limited: the first 3 of each reason, then at 10, 100, 1000, ... occurrences."""

    def __init__(self, what: str = "skipped bad sample") -> None:
        self.counts: Counter[str] = Counter()
        self.what = what

    def record(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= 3 or (n >= 10 and str(n).strip("0") == "1"):
            log.warning("%s (%s, %d so far): %s %s", self.what, reason, n, where, detail)


# ----------------------------------------------------------------------------------------------
# Per-sample decoding (tar reading: clapscale.data.shardio)
# ----------------------------------------------------------------------------------------------


def decode_audio(data: bytes, audio_cfg: AudioConfig) -> np.ndarray:
    """FLAC (or any libsndfile format) bytes -> mono float32 ``(n,)``, at most max_seconds long."""
    cap = int(round(audio_cfg.max_seconds * audio_cfg.sample_rate))
    if not data:
        raise SkipSample("empty_audio", "0-byte audio member")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.samplerate != audio_cfg.sample_rate:
                raise SkipSample("sample_rate", f"{f.samplerate} Hz, expected {audio_cfg.sample_rate}")
            wave = f.read(frames=cap, dtype="float32", always_2d=False)
    except SkipSample:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise SkipSample("decode_error", repr(e)) from e
    if wave.shape[0] == 0:
        raise SkipSample("empty_audio")
    mono = wave.mean(axis=1, dtype=np.float32) if wave.ndim == 2 else wave
    if float(np.max(np.abs(mono))) < SILENCE_PEAK:
        raise SkipSample("silent", "all-silent after downmix to mono")
    return mono


def flac_header(data: bytes) -> tuple[int, int]:
    """``(sample_rate, total_samples)`` from a FLAC stream's STREAMINFO; raises ``SkipSample``.

    Catches what would kill a DALI decoder before it runs: empty members, non-FLAC bytes, a
    broken first metadata block. ``total_samples`` is 0 when the encoder did not record it.
    """
    if not data:
        raise SkipSample("empty_audio", "absent or 0-byte .flac member")
    if len(data) < 42 or data[:4] != b"fLaC" or (data[4] & 0x7F) != 0 or data[5:8] != b"\x00\x00\x22":
        raise SkipSample("decode_error", "not a FLAC stream (bad magic or STREAMINFO)")
    info = int.from_bytes(data[8:42], "big")
    # STREAMINFO bit layout (272 bits): ... 20 bits sample rate at bit 80, 3 channels, 5 bps,
    # 36 bits total samples, 128 bits MD5.
    sample_rate = (info >> (272 - 100)) & 0xFFFFF
    total = (info >> 128) & 0xFFFFFFFFF
    return sample_rate, total


def decode_crop(data: bytes, audio_cfg: AudioConfig, rng: np.random.Generator | None) -> PolicyResult | None:
    """The length policy's crop of a FLAC clip, decoding only the crop's ``clip_samples`` frames.

    Equal to ``apply_length_policy(decode_audio(data, audio_cfg), audio_cfg, rng)`` bit for bit, at
    the cost of the window instead of the clip up to ``max_seconds``: the clip's length comes from
    STREAMINFO, the offset from ``crop_offset`` (the same draw), and FLAC seeks are sample-exact.
    Returns None, with ``rng`` left as it was, when the policy keeps the whole clip (not longer than
    one clip, or a longer fusion clip, whose global view needs every frame), when the stream is not
    FLAC or has no recorded length, and whenever the window cannot stand for the whole decode: a
    file that ends before its header says (the full decode finds the real length) or a silent
    window (only the whole clip tells whether the clip is silent). The caller then decodes in full,
    which also reports every bad sample as before. One difference remains by design: a stream whose
    damaged frames lie outside the window is used (its window decodes cleanly), where the full decode
    would skip it as ``decode_error``; ``make_shards --verify`` decodes every frame and finds it.
    """
    try:
        sample_rate, total = flac_header(data)
    except SkipSample:
        return None
    # Most clips need no crop: tell from STREAMINFO, without opening a decoder (no draw is skipped:
    # crop_offset draws only for a clip longer than one clip).
    cap = int(round(audio_cfg.max_seconds * audio_cfg.sample_rate))
    if sample_rate != audio_cfg.sample_rate or total == 0 or min(total, cap) <= audio_cfg.clip_samples:
        return None
    saved = rng.bit_generator.state if rng is not None else None
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            total = f.frames
            if f.format != "FLAC" or f.samplerate != audio_cfg.sample_rate or not 0 < total < (1 << 62):
                return None
            length = min(total, cap)
            offset = crop_offset(length, audio_cfg, rng)
            if offset is None:
                return None
            n = audio_cfg.clip_samples
            # The full decode stops at `length` only if the stream really holds it: check its last frame.
            whole = offset + n == length or (f.seek(length - 1) == length - 1 and f.read(1).shape[0] == 1)
            f.seek(offset)
            wave = f.read(frames=n, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
        whole = False
    else:
        mono = wave.mean(axis=1, dtype=np.float32) if wave.ndim == 2 else wave
        if whole and mono.shape[0] == n and float(np.max(np.abs(mono))) >= SILENCE_PEAK:
            longer = frames_of(length, audio_cfg.hop_length) > audio_cfg.n_frames
            return PolicyResult(mono, length, longer, (0, 0, 0))
    if rng is not None:
        rng.bit_generator.state = saved
    return None


def parse_meta(raw: dict[str, Any], on_warn: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """The sample's JSON object, with ``tag`` normalised to a list of strings (``tags`` read as an
    alias, a bare value coerced: see ``normalise_tags``; each coercion reported through
    ``on_warn(reason, detail)``). Raises ``SkipSample`` for a missing or bad JSON or no caption."""
    if not raw.get("json"):
        raise SkipSample("missing_json", "absent or 0-byte .json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SkipSample("bad_json", repr(e)) from e
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"top level is {type(meta).__name__}, not an object")
    if not clean_captions(meta.get("text")):
        raise SkipSample("empty_caption")
    tags, note = normalise_tags(meta)
    if note and on_warn is not None:
        on_warn("tag_coerced", note)
    meta["tag"] = tags
    return meta


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample, per-epoch generator: the same key in the same epoch makes the same choices
    whatever worker or rank reads it."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def text_fields(meta: dict[str, Any], caption_mode: str, rng: np.random.Generator | None) -> dict[str, Any]:
    """The caption drawn for this sample (this epoch), every caption, and the tags; shared by both
    backends. Raises ``SkipSample("empty_caption")`` when the chosen mode leaves no caption."""
    try:
        text = choose_caption(meta, caption_mode, rng)
    except EmptyCaptionError as e:
        raise SkipSample("empty_caption", str(e)) from e
    return {
        "text": text,
        "all_texts": clean_captions(meta.get("text")),
        "tags": normalise_tags(meta)[0],
    }


def decode_sample(
    raw: dict[str, Any],
    audio_cfg: AudioConfig,
    data_cfg: DataConfig,
    epoch: int,
    train: bool,
    on_warn: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Raw tar sample -> decoded sample dict; raises ``SkipSample`` for bad ones (``on_warn``: see
    ``parse_meta``)."""
    meta = parse_meta(raw, on_warn)
    if "flac" not in raw:
        raise SkipSample("empty_audio", "no .flac member")
    rng = sample_rng(data_cfg.seed, epoch, raw["__key__"]) if train else None
    # Caption first, then the crop: the same draw order as the DALI backend, so one seed gives
    # both backends the same choices.
    texts = text_fields(meta, data_cfg.caption, rng)
    res = decode_crop(raw["flac"], audio_cfg, rng)
    if res is None:
        res = apply_length_policy(decode_audio(raw["flac"], audio_cfg), audio_cfg, rng)
    out = {
        "key": raw["__key__"],
        "waveform": res.waveform,
        "length": res.length,
        "is_longer": res.is_longer,
        "fusion_starts": res.fusion_starts,
        **texts,
    }
    if data_cfg.image_size:
        out["image"] = sample_image(raw, data_cfg.image_size, meta.get("video_frames", 1), rng)
    return out


def sample_image(raw: dict[str, Any], size: int, frames: Any = 1, rng: np.random.Generator | None = None) -> np.ndarray:
    """The sample's ``.jpg`` as a CLIP-normalised ``(3, size, size)`` array; ``SkipSample`` if absent or bad.

    A video's ``.jpg`` is a strip of ``frames`` tiles (shards/video.py): training (``rng``) draws one
    tile per sample and epoch, evaluation takes tile ``(frames - 1) // 2``.
    """
    from clapscale.data.images import decode_image

    tile = image_tile(raw.get("jpg"), frames, rng)
    try:
        return decode_image(raw["jpg"], size, tile=tile, tiles=frames)
    except ValueError as e:
        raise SkipSample("bad_image", str(e)) from e


def image_tile(jpg: Any, frames: Any, rng: np.random.Generator | None) -> int:
    """Which tile of the sample's picture to use (both backends; after the audio's draws, so one seed
    draws the same in both): ``SkipSample`` for an absent or empty ``.jpg`` or a bad ``video_frames``."""
    from clapscale.shards.video import eval_frame

    if jpg is None or len(jpg) == 0:
        raise SkipSample("missing_image", "absent or 0-byte .jpg member (data.image_size asks for images)")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise SkipSample("bad_image", f"'video_frames' in the JSON is {frames!r}, not a positive integer")
    return eval_frame(frames) if rng is None else int(rng.integers(0, frames))


def collate_waveforms(waves: list[np.ndarray]) -> torch.Tensor:
    """Mono clips -> float32 ``(B, N)``, zero-padded to the longest.

    Inside a DataLoader worker the batch is built in shared memory (as torch's ``default_collate``
    does), so handing it to the main process passes a file descriptor instead of copying 30 MB per
    batch of 16 x 10 s into a fresh shared segment (measured: benchmarks/bench_loader.py).
    """
    rows, cols = len(waves), max(len(w) for w in waves)
    if get_worker_info() is None:
        out = torch.zeros(rows, cols)
    else:
        storage = torch.UntypedStorage._new_shared(rows * cols * 4)
        out = torch.empty(0, dtype=torch.float32).set_(storage).view(rows, cols)
    buf = out.numpy()
    for i, w in enumerate(waves):
        buf[i, : len(w)] = w
        buf[i, len(w) :] = 0.0
    return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> batch dict (see ``clapscale.data``). Rows are zero-padded to the longest."""
    out = {"waveform": collate_waveforms([s["waveform"] for s in samples]), **collate_meta(samples)}
    if samples and "image" in samples[0]:
        out["image"] = torch.from_numpy(np.stack([s["image"] for s in samples]))
    return out


def collate_meta(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Every batch key except the audio itself (shared by both backends)."""
    return {
        "lengths": torch.tensor([s["length"] for s in samples], dtype=torch.int64),
        "is_longer": torch.tensor([s["is_longer"] for s in samples], dtype=torch.bool),
        "fusion_starts": torch.tensor([s["fusion_starts"] for s in samples], dtype=torch.int64),
        "keys": [s["key"] for s in samples],
        "texts": [s["text"] for s in samples],
        "all_texts": [s["all_texts"] for s in samples],
        "tags": [s["tags"] for s in samples],
    }


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """This epoch's permutation of ``urls``: a function of (seed, epoch) only, shared by both backends
    so one seed reads the shards in the same order whichever backend reads them."""
    order = list(urls)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


# ----------------------------------------------------------------------------------------------
# The per-worker stream
# ----------------------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """Yields whole batches from inside a DataLoader worker (``batch_size=None`` in the DataLoader).

    Each batch carries private keys the ``WdsLoader`` strips: ``_worker`` (id), ``_consumed`` (raw
    samples this worker has taken from its shuffled stream this epoch, bad ones included),
    ``_skipped`` and ``_warned`` (reason -> count since the previous batch), ``_sources`` (samples
    of the batch per source index) and ``_bytes`` (shard bytes read since the previous batch).
    """

    def __init__(
        self,
        sources: list[Source],
        audio_cfg: AudioConfig,
        data_cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        train: bool,
        num_workers: int,
        epoch: int = 0,
        resume: list[int] | None = None,
        rotation: int = 0,
        eval_pieces: list[tuple[str, int, int | None]] | None = None,
    ):
        self.sources = sources
        self.audio_cfg = audio_cfg
        self.data_cfg = data_cfg
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.num_workers = max(num_workers, 1)
        self.epoch = epoch
        self.resume = list(resume) if resume else [0] * self.num_workers
        self.rotation = rotation
        self.eval_pieces = eval_pieces or []  # this rank's (url, start, stop), see shardio.eval_plan
        self.bytes = ByteCounter()

    def _raw_stream(self, worker: int, on_skip: Callable[[str, str, str], None]) -> Iterator[dict]:
        cfg = self.data_cfg
        if not self.train:
            # Only this rank's run of samples is read: eval I/O stays ~1x the data for any world size.
            for url, start, stop in self.eval_pieces[worker :: self.num_workers]:
                yield from iter_tar_samples(url, on_skip, counter=self.bytes, start=start, stop=stop)
            return
        seed = f"{cfg.seed}/{self.epoch}/{self.rank}/{worker}"
        if cfg.resampled:
            # Resuming a with-replacement stream re-seeds it from the position instead of replaying.
            seed += f"/{self.resume[worker]}"
        rng = random.Random(seed)
        if cfg.resampled:
            yield from ShuffleBuffer(cfg.shuffle_buffer, rng).run(self._resampled(rng, on_skip))
        else:
            urls = epoch_shard_order(all_urls(self.sources), cfg.seed, self.epoch)
            mine = urls[self.rank :: self.world_size][worker :: self.num_workers]
            # A saved position is rebuilt from the tar headers and continued by seeking, not by
            # replaying the epoch's bytes (see shardio.resume_stream).
            yield from resume_stream(mine, cfg.shuffle_buffer, rng, self.resume[worker], on_skip, self.bytes)

    def _resampled(self, rng: random.Random, on_skip: Callable[[str, str, str], None]) -> Iterator[dict]:
        """Endless raw samples, the source of each drawn by the mixing weights.

        One shard stays open per source, so the weights hold per sample whatever the shard sizes
        (drawing a source per shard and reading the whole shard gave each source weight x mean shard
        size: 0.836 / 0.164 for weights 0.5::0.5 over shards of 512 and 100 samples). A source's next
        shard is drawn with replacement when its open one ends.
        """
        weights = [s.weight for s in self.sources]
        indices = range(len(self.sources))
        open_shards: list[Iterator[dict] | None] = [None] * len(self.sources)
        while True:
            i = rng.choices(indices, weights=weights)[0]
            src = self.sources[i]
            empty: set[str] = set()  # shards of this source opened since its last sample that gave none
            while True:
                fresh = open_shards[i] is None
                if fresh:
                    url = rng.choice(src.urls)
                    open_shards[i] = iter_tar_samples(url, on_skip, counter=self.bytes)
                raw = next(open_shards[i], None)  # type: ignore[arg-type]
                if raw is not None:
                    break
                open_shards[i] = None  # ended (after its samples, or unreadable when fresh)
                if fresh:
                    empty.add(url)
                if len(empty) == len(set(src.urls)):
                    raise ValueError(
                        f"data source {src.spec!r}: none of its {len(empty)} shard(s) holds a readable "
                        "sample (see the skip warnings above); fix or remove the source, or drop it "
                        "from data.train"
                    )
            yield raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # DataLoader always asks physical worker 0 first; rotating the logical ids makes a resumed
        # pass continue the round-robin with the worker whose turn it was.
        worker = ((info.id if info is not None else 0) + self.rotation) % self.num_workers
        delta: Counter[str] = Counter()
        warned: Counter[str] = Counter()
        skiplog = SkipLog()
        warnlog = SkipLog("read an odd field")
        where = ""  # the sample being decoded, for on_warn

        def on_skip(reason: str, where: str, detail: str) -> None:
            delta[reason] += 1
            skiplog.record(reason, where, detail)

        def on_warn(reason: str, detail: str) -> None:
            warned[reason] += 1
            warnlog.record(reason, where, detail)

        # The raw stream starts at the saved position (resampled: re-seeded from it; epoch mode:
        # rebuilt by seeking), so nothing is skipped here.
        consumed = self.resume[worker]
        # Source index of each shard, to count the realised mixing (a URL listed by two sources
        # counts for the first).
        source_of: dict[str, int] = {}
        for i, src in enumerate(self.sources):
            for u in src.urls:
                source_of.setdefault(u, i)
        batch: list[dict[str, Any]] = []
        batch_sources: list[int] = []
        for raw in self._raw_stream(worker, on_skip):
            consumed += 1
            where = f"{raw['__url__']}:{raw['__key__']}"
            try:
                batch.append(decode_sample(raw, self.audio_cfg, self.data_cfg, self.epoch, self.train, on_warn))
            except SkipSample as e:
                on_skip(e.reason, where, e.detail)
                continue
            batch_sources.append(source_of.get(raw["__url__"], 0))
            if len(batch) == self.data_cfg.batch_size:
                yield self._emit(collate(batch), worker, consumed, delta, warned, batch_sources)
                batch, batch_sources = [], []
        if batch and not self.train:
            yield self._emit(collate(batch), worker, consumed, delta, warned, batch_sources)
        elif delta or warned:
            # No batch left to carry the last counts: send them alone so none is lost.
            yield self._emit({}, worker, consumed, delta, warned, [])

    def _emit(
        self,
        out: dict[str, Any], worker: int, consumed: int, skipped: Counter, warned: Counter, sources: list[int]
    ) -> dict[str, Any]:
        out |= {"_worker": worker, "_consumed": consumed, "_skipped": dict(skipped), "_warned": dict(warned),
                "_sources": dict(Counter(sources)), "_bytes": self.bytes.take()}
        skipped.clear()
        warned.clear()
        return out


# ----------------------------------------------------------------------------------------------
# The loader the trainer sees
# ----------------------------------------------------------------------------------------------


def source_shares(sources: list[Source], counts: list[int]) -> dict[str, float]:
    """Realised share of the emitted samples per source spec (0.0 for all before any sample)."""
    total = sum(counts)
    return {src.spec: (n / total if total else 0.0) for src, n in zip(sources, counts)}


def log_source_shares(sources: list[Source], counts: list[int], rank: int, epoch: int, weighted: bool) -> None:
    """One log line: each source's realised share of the samples this rank has yielded so far.

    ``weighted`` (``data.resampled: true``): each share is shown beside its configured one (the
    normalised mixing weight), and a share more than 4 binomial standard deviations off it is a
    warning: the source pick is per raw sample, so a source whose samples are often bad (skipped)
    falls short of its weight.
    """
    if len(sources) < 2:
        return
    n = sum(counts)
    total_w = sum(s.weight for s in sources)
    parts, off = [], False
    for src, share in zip(sources, source_shares(sources, counts).values()):
        if not weighted:
            parts.append(f"{src.spec} {share:.3f}")
            continue
        want = src.weight / total_w
        off |= n > 0 and abs(share - want) > 4 * (want * (1 - want) / n) ** 0.5
        parts.append(f"{src.spec} {share:.3f} (configured {want:.3f})")
    level = logging.WARNING if off else logging.INFO
    log.log(level, "rank %d after epoch %d, %d samples: realised source shares %s%s", rank, epoch, n,
            "; ".join(parts), " (off the weights: check the skip counts)" if off else "")


class WdsLoader:
    """Iterable of batch dicts with ``set_epoch`` / ``state_dict`` / ``load_state_dict`` / ``skipped``.

    Iterating continues from the current position: a pass that the trainer leaves early (or a
    restored ``state_dict``) resumes mid-epoch; a pass that runs to the end of the epoch moves to the
    next epoch, so the order changes even if ``set_epoch`` is never called. Evaluation loaders
    (``train=False``) always start from the first sample.
    """

    def __init__(
        self,
        sources: list[Source],
        audio_cfg: AudioConfig,
        data_cfg: DataConfig,
        *,
        tokenizer: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        sources = check_shards_exist(sources)
        self.sources = sources
        self.audio_cfg = audio_cfg
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.train = train
        urls = all_urls(sources)
        self.eval_pieces: list[tuple[str, int, int | None]] = []
        # Samples per shard, read once (a remote shard set's table is one request per directory).
        self._sizes = shard_sizes(urls)
        if train and not data_cfg.resampled:
            if len(urls) < world_size:
                raise ValueError(
                    f"data spec has {len(urls)} shard(s) but there are {world_size} ranks: with "
                    f"data.resampled=false each rank needs at least one shard, so give at least "
                    f"{world_size} shards (better {world_size * max(data_cfg.workers, 1)}: one per "
                    "worker), or set data.resampled=true"
                )
            if any(s.weight != sources[0].weight for s in sources):
                raise ValueError(
                    f"data.train_weights={data_cfg.train_weights!r}: mixing weights need "
                    "data.resampled=true (epoch mode visits every shard once); set it, or drop the weights"
                )
            per_rank = len(urls[rank::world_size])
            self.num_workers = min(data_cfg.workers, per_rank)
        elif not train:
            self.eval_pieces = eval_plan(urls, self._sizes, rank, world_size)
            self.num_workers = min(data_cfg.workers, len(self.eval_pieces))
        else:
            self.num_workers = data_cfg.workers
        self.epoch = 0
        self.batches = 0  # batches yielded in the current epoch
        self.consumed = [0] * max(self.num_workers, 1)
        self.skipped: dict[str, int] = {}
        self.bytes_read = 0  # shard bytes this process's loader has read (all passes)
        self.warned: dict[str, int] = {}  # reason (WARN_REASONS) -> samples read with a coerced field
        self.source_counts = [0] * len(sources)  # training samples emitted per source, this run
        self._nominal_batches: int | None = None
        if train and data_cfg.resampled:
            total = sum(self._sizes.values())
            self._nominal_batches = total // (data_cfg.batch_size * world_size)
            if self._nominal_batches == 0:
                raise ConfigError(
                    f"data spec holds {total} samples, fewer than one global batch "
                    f"(data.batch_size={data_cfg.batch_size} x {world_size} ranks): lower "
                    "data.batch_size or add shards"
                )

    def __len__(self) -> int:
        """Batches per epoch on this rank (exact in training; in evaluation exact when ``shard_sizes``
        is and no sample is bad)."""
        if self.train:
            return self._epoch_limit(self.epoch)
        workers = max(self.num_workers, 1)
        bsz = self.data_cfg.batch_size
        counts = [(self._sizes[u] if stop is None else stop) - start for u, start, stop in self.eval_pieces]
        return sum(-(-sum(counts[w::workers]) // bsz) for w in range(workers))

    def _epoch_limit(self, epoch: int) -> int:
        """Training batches per rank this epoch, the same on every rank (a rank that stops early
        would hang the others in their next collective).

        Resampled: total samples // (batch_size * world_size). Epoch mode: the fewest full batches
        any rank's workers can make from that epoch's shard assignment (sizes.json).
        """
        if self._nominal_batches is not None:
            return self._nominal_batches
        urls = all_urls(self.sources)
        sizes = self._sizes
        urls = epoch_shard_order(urls, self.data_cfg.seed, epoch)
        per_rank = []
        for r in range(self.world_size):
            mine = urls[r :: self.world_size]
            workers = max(min(self.data_cfg.workers, len(mine)), 1)
            per_rank.append(sum(
                sum(sizes[u] for u in mine[w::workers]) // self.data_cfg.batch_size for w in range(workers)
            ))
        return min(per_rank)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass yields; a new epoch starts at its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches = 0
            self.consumed = [0] * max(self.num_workers, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "consumed": list(self.consumed),
            "workers": self.num_workers,
            "world_size": self.world_size,
            "skipped": dict(self.skipped),
            "warned": dict(self.warned),
            "source_counts": list(self.source_counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. The worker count and world size must match the run that
        saved it (the position is per worker), and so must the backend."""
        backend = state.get("backend", "wds")  # the DALI loader's position names it; ours predates the key
        if backend != "wds":
            raise ValueError(
                f"data position was saved by data.backend={backend}, this run uses wds: the two "
                f"backends' positions do not translate; resume with data.backend={backend}, or start the "
                "data stream afresh by dropping the loader state"
            )
        if state["workers"] != self.num_workers or state["world_size"] != self.world_size:
            raise ValueError(
                f"data position was saved with {state['workers']} loader workers x "
                f"{state['world_size']} ranks, this run has {self.num_workers} x {self.world_size}: "
                "resume with the same data.workers and world size, or start the data stream afresh "
                "by dropping the loader state"
            )
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])
        self.consumed = [int(c) for c in state["consumed"]]
        self.skipped = {k: int(v) for k, v in state.get("skipped", {}).items()}
        self.warned = {k: int(v) for k, v in state.get("warned", {}).items()}
        counts = [int(c) for c in state.get("source_counts", [])]
        # A position saved before the counts existed (or over other sources) restarts them.
        self.source_counts = counts if len(counts) == len(self.sources) else [0] * len(self.sources)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.train:
            self.batches, self.consumed = 0, [0] * max(self.num_workers, 1)
            yield from self._pass(self._stream(self.consumed, self.batches), track=True)
            return
        limit = self._epoch_limit(self.epoch)
        if self.batches < limit:
            yield from self._pass(self._stream(self.consumed, self.batches), track=True, limit=limit)
        if self.batches < limit:
            # Bad samples left this rank short of the common count: top up from the start of the
            # epoch's stream rather than stop early and hang the other ranks.
            log.warning("rank %d ran out after %d of %d batches (bad samples); repeating samples of "
                        "epoch %d to finish it", self.rank, self.batches, limit, self.epoch)
            while self.batches < limit:
                before = self.batches
                yield from self._pass(self._stream(None, 0), track=False, limit=limit)
                if self.batches == before:
                    raise RuntimeError(f"rank {self.rank} cannot make a single batch: every sample is bad")
        log_source_shares(self.sources, self.source_counts, self.rank, self.epoch, self.data_cfg.resampled)
        self._next_epoch()

    def _stream(self, resume: list[int] | None, batches: int) -> DataLoader:
        stream = ShardStream(
            self.sources,
            self.audio_cfg,
            self.data_cfg,
            rank=self.rank,
            world_size=self.world_size,
            train=self.train,
            num_workers=self.num_workers,
            epoch=self.epoch,
            resume=resume,
            rotation=batches % max(self.num_workers, 1),
            eval_pieces=self.eval_pieces,
        )
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    def _pass(self, loader: DataLoader, *, track: bool, limit: int | None = None) -> Iterator[dict[str, Any]]:
        for batch in loader:
            worker = batch.pop("_worker")
            consumed = batch.pop("_consumed")
            self.bytes_read += batch.pop("_bytes")
            if track:
                self.consumed[worker] = consumed
            for reason, n in batch.pop("_skipped").items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            for reason, n in batch.pop("_warned").items():
                self.warned[reason] = self.warned.get(reason, 0) + n
            sources = batch.pop("_sources")
            if self.train:
                for i, n in sources.items():
                    self.source_counts[i] += n
            if "keys" not in batch:
                continue
            self.batches += 1
            if self.tokenizer is not None:
                tok = self.tokenizer(batch["texts"])
                batch["input_ids"] = tok["input_ids"]
                batch["attention_mask"] = tok["attention_mask"]
            yield batch
            if limit is not None and self.batches >= limit:
                return

    def _next_epoch(self) -> None:
        self.set_epoch(self.epoch + 1)
