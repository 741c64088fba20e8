"""DALI loader (``data.backend: dali``): DALI reads the shards, decodes FLAC on CPU threads and computes
the log-mel on the GPU when there is one (on CPU otherwise, which is what CI runs).

Three small DALI pipelines with Python glue between them, because a DALI pipeline that meets one
corrupt FLAC dies as a whole ("Current pipeline object is no longer valid"), and because the length
policies must be exactly those of the webdataset loader:

1. reader: ``readers.webdataset`` over the ``.idx`` indexes. Outputs raw FLAC bytes, JSON bytes and
   each sample's source (``tar:offset:member``, for the key). Training reads a fresh permutation of
   the shards every epoch (``wds.epoch_shard_order``, the webdataset backend's, so one seed gives
   both backends the same order); rank r takes shards r::world_size of it (as webdataset's epoch
   mode does), or, when a source has fewer shards than ranks, a sample range of it (DALI's
   ``shard_id`` / ``num_shards``). With ``data.resampled: true`` each source has its own reader and
   the source of every sample is drawn by the mixing weights (a counter-based generator of (seed,
   epoch, rank, pick)), so each source's share of samples is its weight whatever its size and shard
   sizes, as in the webdataset backend; with ``data.resampled: false`` one reader reads this rank's
   shards of the epoch once. Each reader shuffles with an ``initial_fill`` of
   ``data.shuffle_buffer`` / readers: together they hold as many samples as webdataset's one buffer.
2. glue: JSON, captions and the FLAC header (magic, STREAMINFO, sample rate, length) are checked in
   Python; bad samples are skipped and counted (``clapscale.data.wds.SKIP_REASONS``).
3. decoder: a clip that a cropping policy cuts (``rand_trunc`` / ``repeatpad`` / ``pad`` longer than
   one clip) is read by seeking to its window with libsndfile (``clapscale.data.wds.decode_crop``), on
   ``data.workers`` threads; the rest go to ``decoders.audio`` (CPU, ``data.workers`` threads). If it fails
   (corrupt frames behind a valid header), the pipeline is rebuilt and the batch's samples are
   decoded one by one to skip the ones DALI refuses (``_run_isolating``). Clips longer than
   ``audio.max_seconds`` (known from the header) are decoded by libsndfile up to the cap instead,
   so memory stays bounded.
4. glue: ``clapscale.data.policies.apply_length_policy`` with the per-(seed, epoch, key) generator
   of the webdataset loader, so both backends crop a given sample the same way in a given epoch.
5. mel: ``spectrogram`` (periodic Hann passed explicitly: DALI's default window is shifted half a
   sample), ``mel_filter_bank``, ``to_decibels`` with reference 1.0 and cutoff -100 dB (DALI's
   default reference is each sample's maximum). Rows are padded to the longest (fusion) and the
   batch carries ``mel`` (B, T, n_mels) and ``mel_frames``; ``AudioFrontend`` shapes it.
6. pictures (``data.image_size``): the reader also yields ``<key>.jpg``; each sample's
   ``clapscale.data.images.ImagePlan`` (which frame of a video strip, drawn after the audio's draws
   as in the webdataset backend, and the picture size) is computed from the JPEG header
   in Python, and one image pipeline decodes just that frame (``decoders.image_slice``: ``mixed`` =
   nvJPEG on the GPU, else CPU), scales its centre-crop window (cubic, antialiased, as PIL's
   bicubic) and CLIP-normalises; EXIF rotation is ignored, as PIL does. A JPEG that kills the
   pipeline is found the same way and skipped as ``bad_image`` (libjpeg-turbo decodes some damaged
   scans that PIL refuses: those pass here).

Training batches always hold exactly ``data.batch_size`` samples (samples left over after skipping
carry into the next batch; those left at the end of an epoch are dropped). Batches per epoch:
resampled, total samples // (batch_size * world_size); epoch mode, the fewest full batches any rank's
shards of that epoch hold. The sample order is a function of (seed, epoch, rank) and DALI's shuffle.
The position is the pick count plus a DALI reader checkpoint per reader, so a resumed run continues
exactly; its skip and warning counts leave out the rows the resumed run reads again, so each is
counted once.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from clapscale.config import AudioConfig, ConfigError, DataConfig
from clapscale.data.images import CLIP_MEAN, CLIP_STD, ImagePlan, decode_image, image_size_of, plan_image
from clapscale.data.policies import apply_length_policy, frames_of
from clapscale.data.shardio import split_member_name
from clapscale.data.specs import ShardSpecError, Source, all_urls, check_shards_exist, is_remote
from clapscale.data.wds import (
    SkipLog,
    SkipSample,
    collate_meta,
    collate_waveforms,
    decode_audio,
    decode_crop,
    flac_header,
    epoch_shard_order,
    image_tile,
    log_source_shares,
    parse_meta,
    sample_rng,
    text_fields,
)
from clapscale.shards.audio_io import SILENCE_PEAK
from clapscale.shards.index import idx_path_of

# Source picks are drawn in blocks of this many from a generator of (seed, epoch, rank, block), so a
# resumed run finds pick k without replaying the k before it.
PICK_BLOCK = 4096

log = logging.getLogger(__name__)


def _hann_periodic(n: int) -> list[float]:
    return torch.hann_window(n, periodic=True, dtype=torch.float64).tolist()


class DaliLoader:
    """Same API and batch keys as ``WdsLoader``, with ``mel`` + ``mel_frames`` instead of
    ``waveform`` (``features="waveform"`` keeps the waveform and leaves the mel to AudioFrontend)."""

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
        device_id: int | None = None,
        features: str = "mel",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if features not in ("mel", "waveform"):
            raise ValueError(f"features={features!r} is not one of 'mel', 'waveform'")
        # "waveform": stop after decoding + length policy and leave the mel to AudioFrontend.
        self.features = features
        if train and not data_cfg.resampled and any(s.weight != sources[0].weight for s in sources):
            raise ValueError(
                f"data.train_weights={data_cfg.train_weights!r}: mixing weights need "
                "data.resampled=true (epoch mode visits every shard once); set it, or drop the weights"
            )
        remote = [u for u in all_urls(sources) if is_remote(u)]
        if remote:
            # DALI's webdataset reader opens paths itself: no pipe: commands, no URLs.
            raise ShardSpecError(
                f"data.backend=dali reads local files only, got {remote[0]!r}; use data.backend=wds for "
                "remote shards (or copy them to local disk with their .idx files)"
            )
        sources = check_shards_exist(sources)
        self.sources = sources
        self.urls = all_urls(sources)
        self.audio_cfg = audio_cfg
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.train = train
        if device_id is None and torch.cuda.is_available():
            device_id = torch.cuda.current_device()
        self.device_id = device_id
        self.threads = max(data_cfg.workers, 1)
        self.epoch = 0
        self.batches = 0
        self.skipped: dict[str, int] = {}
        self.warned: dict[str, int] = {}  # reason (wds.WARN_REASONS) -> samples read with a coerced field
        self.source_counts = [0] * len(sources)  # training samples emitted per source, this run
        self._skiplog = SkipLog()
        self._warnlog = SkipLog("read an odd field")
        # (pick, "skipped" | "warned", reason) of each count made for a training row at or after
        # the first sample not yet yielded: a resume reads those rows again, so the saved counts
        # leave them out.
        self._counted: list[tuple[int, str, str]] = []
        self._streams: list[_ReaderStream] | None = None  # this epoch's readers (training)
        self._resume: dict[str, Any] | None = None  # position to restore (from load_state_dict)
        self._position: dict[str, Any] | None = None  # position after the last batch yielded
        self._decoder = None
        self._mel = None
        self._image = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._total = self._prepare_shards()
        self._source_of: dict[str, int] = {}
        for i, src in enumerate(sources):
            for u in src.urls:
                self._source_of.setdefault(u, i)
        self._stream_urls: list[list[str]] = []  # shards of each training reader (all of them, any order)
        # Fewer samples than ranks is fine in evaluation (a rank without any reads nothing); in
        # training it is fewer than one global batch, refused just below.
        if train:
            self._nominal = self._total // (data_cfg.batch_size * world_size)
            if self._nominal == 0:
                raise ConfigError(
                    f"data spec holds {self._total} samples, fewer than one global batch "
                    f"(data.batch_size={data_cfg.batch_size} x {world_size} ranks): lower "
                    "data.batch_size or add shards"
                )
            # Resampled: one reader per source, mixed per sample by the weights. Epoch mode: one
            # reader over every shard (the weights are equal, checked above).
            streams = sources
            if not data_cfg.resampled:
                streams = [Source("::".join(s.spec for s in sources), tuple(self.urls), 1.0)]
            self._stream_urls = [list(src.urls) for src in streams]
            weights = np.array([src.weight for src in streams], dtype=np.float64)
            self._cum_weights = np.cumsum(weights) / weights.sum()
            for src, (_, _, _, _, samples) in zip(streams, self._plan(0)):
                if samples == 0:
                    raise ValueError(
                        f"data source {src.spec!r} leaves rank {rank} of {world_size} no readable "
                        "sample: give every source at least one readable sample per rank"
                    )
            if self._epoch_batches(0) == 0:
                raise ValueError(
                    f"with data.resampled=false, some rank's shards of epoch 0 hold fewer than "
                    f"data.batch_size={data_cfg.batch_size} samples: lower data.batch_size, give more "
                    "or more even shards, or set data.resampled=true"
                )

    # ------------------------------------------------------------------ pipelines

    def _prepare_shards(self) -> int:
        """Check each shard against its index; returns the samples DALI will read.

        DALI aborts the whole pipeline on an index entry past the end of its tar, so a truncated
        shard gets a trimmed index (only samples that lie wholly inside the file) in a temp dir and
        is recorded as ``truncated_tar``; a missing shard is dropped and recorded as
        ``unreadable_shard``. Recorded, not counted: a fault is counted when a pass reads its shard
        (``_count_faults``). Reads only the small ``.idx`` files and one ``stat`` per shard.
        """
        self._paths: list[str] = []
        self._index_paths: list[str] = []
        self._shard_index: dict[str, tuple[str, int]] = {}  # readable shard -> (its index, samples)
        self._faults: dict[str, tuple[str, str]] = {}  # damaged shard -> (skip reason, detail)
        total = 0
        for url in self.urls:
            idx = str(idx_path_of(url))
            try:
                lines = Path(idx).read_text().splitlines()
                count = int(lines[0].split()[1])
            except (OSError, IndexError, ValueError) as e:
                raise FileNotFoundError(
                    f"DALI needs a wds2idx index beside each shard; {idx} is missing or unreadable "
                    f"({e}); index shards made elsewhere (LAION's) once with `clapscale shards index {Path(url).parent}`"
                ) from e
            try:
                size = os.stat(url).st_size
            except OSError as e:
                self._faults[url] = ("unreadable_shard", repr(e))
                continue
            entries = [ln for ln in lines[1 : count + 1] if ln.strip()]
            whole = [ln for ln in entries if _index_line_end(ln) <= size]
            if len(whole) < len(entries):
                self._faults[url] = ("truncated_tar", f"{len(entries) - len(whole)} sample(s) past the end")
                if not whole:
                    continue
                if self._tmpdir is None:
                    self._tmpdir = tempfile.TemporaryDirectory(prefix="clapscale-dali-idx-")
                idx = os.path.join(self._tmpdir.name, f"{len(self._paths):06d}.idx")
                Path(idx).write_text(f"{lines[0].split()[0]} {len(whole)}\n" + "\n".join(whole) + "\n")
            self._paths.append(url)
            self._index_paths.append(idx)
            self._shard_index[url] = (idx, len(whole))
            total += len(whole)
        return total

    def _count_faults(self, order: list[str], mine: list[str] | None) -> None:
        """Count the shard faults of one pass over ``order`` that fall to this rank, so that each is
        counted once per pass across ranks (the trainer sums the ranks' counts), as the webdataset
        backend counts it once per read. A shard this rank reads whole (``mine``: this rank's
        shards) is this rank's; one that several ranks read parts of (``mine`` None: DALI's
        sample-range split) or that no rank reads (dropped) is rank ``position % world_size``'s."""
        for i, url in enumerate(order):
            if url not in self._faults:
                continue
            if mine is not None and url in self._shard_index:
                ours = url in mine
            else:
                ours = i % self.world_size == self.rank
            if ours:
                reason, detail = self._faults[url]
                self._skip(reason, url, detail)

    def _plan(self, epoch: int) -> list[tuple[list[str], list[str], int, int, int]]:
        """Per training reader, this rank's part of the epoch: (tar paths, index paths, DALI
        shard_id, num_shards, samples). Shards r::world_size of the epoch's permutation, or a sample
        range of it (DALI's sharding) when the source has fewer shards than ranks."""
        out = []
        for urls in self._stream_urls:
            order = [u for u in epoch_shard_order(urls, self.data_cfg.seed, epoch) if u in self._shard_index]
            per_rank = _rank_samples(order, self._shard_index, self.world_size)
            if len(order) >= self.world_size:
                paths, shard_id, num_shards = order[self.rank :: self.world_size], 0, 1
            else:
                paths, shard_id, num_shards = order, self.rank, self.world_size
            idx = [self._shard_index[u][0] for u in paths]
            out.append((paths, idx, shard_id, num_shards, per_rank[self.rank]))
        return out

    def _epoch_batches(self, epoch: int) -> int:
        """Training batches per rank in ``epoch``, the same on every rank (a rank that stops early
        would hang the others in their next collective)."""
        if self.data_cfg.resampled:
            return self._nominal
        order = [u for u in epoch_shard_order(self._stream_urls[0], self.data_cfg.seed, epoch)
                 if u in self._shard_index]
        return min(_rank_samples(order, self._shard_index, self.world_size)) // self.data_cfg.batch_size

    def _build_reader(
        self, paths: list[str], index_paths: list[str], shard_id: int, num_shards: int,
        seed: int, checkpoint: str | None = None, fill: int = 1,
    ):
        """A reader pipeline over ``paths`` (``fill``: its shuffle buffer in samples, training only)."""
        from nvidia.dali import fn, pipeline_def

        train = self.train
        cfg = self.data_cfg

        ext = ["flac", "json"] + (["jpg"] if cfg.image_size else [])

        @pipeline_def(
            batch_size=cfg.batch_size, num_threads=self.threads, device_id=None,
            exec_dynamic=True, enable_checkpointing=train, seed=seed % (2**31),
        )
        def reader():
            flac, meta, *jpg = fn.readers.webdataset(
                paths=paths, index_paths=index_paths, ext=ext, missing_component_behavior="empty",
                shard_id=shard_id, num_shards=num_shards, random_shuffle=train,
                initial_fill=max(fill, 1) if train else 1, pad_last_batch=not train,
                stick_to_shard=not train, name="reader",
            )
            return flac, meta, fn.get_property(flac, key="source_info"), *jpg

        pipe = reader(checkpoint=checkpoint) if checkpoint else reader()
        pipe.build()
        return pipe

    def _build_decoder(self):
        from nvidia.dali import fn, pipeline_def, types

        # Fed from Python one batch at a time: no prefetching (it would ask for batches not yet fed).
        @pipeline_def(batch_size=self.data_cfg.batch_size, num_threads=self.threads, device_id=None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def decoder():
            data = fn.external_source(name="flac", dtype=types.UINT8, ndim=1)
            audio, _ = fn.decoders.audio(data, downmix=True, dtype=types.FLOAT)
            return audio

        pipe = decoder()
        pipe.build()
        return pipe

    def _build_mel(self):
        from nvidia.dali import fn, pipeline_def, types

        a = self.audio_cfg
        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.data_cfg.batch_size, num_threads=self.threads,
                      device_id=self.device_id, exec_dynamic=True, prefetch_queue_depth=1)
        def mel():
            wave = fn.external_source(name="wave", dtype=types.FLOAT, ndim=1)
            if gpu:
                wave = wave.gpu()
            spec = fn.spectrogram(
                wave, nfft=a.n_fft, window_length=a.win_length, window_step=a.hop_length,
                window_fn=_hann_periodic(a.win_length), center_windows=True, reflect_padding=True,
                power=2, layout="ft",
            )
            m = fn.mel_filter_bank(
                spec, sample_rate=float(a.sample_rate), nfilter=a.n_mels, freq_low=float(a.f_min),
                freq_high=float(a.f_max), mel_formula=a.mel_scale, normalize=a.mel_scale == "slaney",
            )
            db = fn.to_decibels(m, multiplier=10.0, reference=1.0, cutoff_db=-100.0)
            db = fn.transpose(db, perm=[1, 0])  # (T, n_mels)
            return fn.pad(db, axes=[0], fill_value=-100.0)

        pipe = mel()
        pipe.build()
        return pipe

    def _run_image(self, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        if self._image is None:
            self._image = build_image_pipeline(self.data_cfg.image_size, self.data_cfg.batch_size,
                                               self.threads, self.device_id)
        return list(run_image_pipeline(self._image, [r["jpg"] for r in rows], [r["plan"] for r in rows]).unbind(0))

    def _images(self, rows: list[dict[str, Any]]) -> list[torch.Tensor | None]:
        """Each row's picture (rows carry ``jpg`` and ``plan``); None for one that does not decode,
        skipped and counted as ``bad_image``."""
        def reset() -> None:
            self._image = None

        def check(row: dict[str, Any]) -> str | None:
            try:
                decode_image(row["jpg"].tobytes(), self.data_cfg.image_size)
            except ValueError as err:
                return str(err)
            return None

        return _run_isolating(rows, self._run_image, reset, check,
                              lambda row, why: self._skip("bad_image", row["where"], why, row["pick"]), "image")

    def _plan_image(self, row: dict[str, Any]) -> ImagePlan | None:
        """The row's image plan (tile drawn after the audio's draws, as the webdataset backend
        draws it); None, skipped and counted, for a missing or unreadable picture."""
        try:
            tile = image_tile(row.get("jpg"), row["frames"], row["rng"])
            return plan_image(*image_size_of(row["jpg"].tobytes()), self.data_cfg.image_size, tile, row["frames"])
        except SkipSample as e:
            self._skip(e.reason, row["where"], e.detail, row["pick"])
        except ValueError as e:
            self._skip("bad_image", row["where"], str(e), row["pick"])
        return None

    # ------------------------------------------------------------------ glue

    def _skip(self, reason: str, where: str, detail: str = "", pick: int | None = None) -> None:
        """Count a skipped sample (``pick``: its training pick; None for shard faults and evaluation)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self._skiplog.record(reason, where, detail)
        if pick is not None:
            self._counted.append((pick, "skipped", reason))

    def _warn(self, reason: str, where: str, detail: str, pick: int | None = None) -> None:
        self.warned[reason] = self.warned.get(reason, 0) + 1
        self._warnlog.record(reason, where, detail)
        if pick is not None:
            self._counted.append((pick, "warned", reason))

    def _check_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Meta + caption + FLAC header checks; raises SkipSample."""
        raw = {"__key__": row["key"]}
        if row["json"]:
            raw["json"] = row["json"]
        meta = parse_meta(raw, lambda reason, detail: self._warn(reason, row["where"], detail, row.get("pick")))
        data = row["flac"].tobytes()
        sample_rate, total = flac_header(data)
        if sample_rate != self.audio_cfg.sample_rate:
            raise SkipSample("sample_rate", f"{sample_rate} Hz, expected {self.audio_cfg.sample_rate}")
        rng = sample_rng(self.data_cfg.seed, self.epoch, row["key"]) if self.train else None
        texts = text_fields(meta, self.data_cfg.caption, rng)
        cap = int(round(self.audio_cfg.max_seconds * self.audio_cfg.sample_rate))
        return {
            "pick": row.get("pick"), "key": row["key"], "where": row["where"], "flac": row["flac"],
            "jpg": row.get("jpg"), "frames": meta.get("video_frames", 1),
            "rng": rng, "long": total == 0 or total > cap, **texts,
        }

    def _crop_rows(self, rows: list[dict[str, Any]]) -> None:
        """Set each row's ``crop``: a cropping policy's window decoded alone by seeking (None: decode
        the clip). On ``data.workers`` threads, as DALI's own decoder runs (libsndfile releases the
        GIL); each row draws from its own generator, so the result does not depend on the threads.
        The pool lives for one batch only: no idle threads outlive it into a later fork."""
        def crop(row: dict[str, Any]) -> Any:
            return decode_crop(row["flac"].tobytes(), self.audio_cfg, row["rng"])

        if self.threads > 1 and len(rows) > 1:
            with ThreadPoolExecutor(min(self.threads, len(rows)), thread_name_prefix="clapscale-crop") as pool:
                crops = list(pool.map(crop, rows))
        else:
            crops = [crop(r) for r in rows]
        for row, c in zip(rows, crops):
            row["crop"] = c

    def _decode(self, rows: list[dict[str, Any]]) -> list[np.ndarray | None]:
        """Decoded mono float32 per row (None for rows that fail to decode)."""
        out: list[np.ndarray | None] = [None] * len(rows)
        via_dali = [i for i, r in enumerate(rows) if not r["long"] and r["crop"] is None]
        for i, r in enumerate(rows):
            if r["long"] and r["crop"] is None:  # longer than max_seconds (or unknown): decode up to the cap
                out[i] = self._decode_capped(r)
        if not via_dali:
            return out
        def run(batch: list[dict[str, Any]]) -> list[np.ndarray]:
            if self._decoder is None:
                self._decoder = self._build_decoder()
            self._decoder.feed_input("flac", [r["flac"] for r in batch])
            (audio,) = self._decoder.run()
            return [np.array(audio[j], dtype=np.float32).reshape(-1) for j in range(len(batch))]

        def reset() -> None:
            self._decoder = None

        def check(row: dict[str, Any]) -> str | None:
            try:
                sf.read(io.BytesIO(row["flac"].tobytes()), dtype="float32")
            except (sf.LibsndfileError, RuntimeError, ValueError) as err:
                return repr(err)
            return None

        decoded = _run_isolating([rows[i] for i in via_dali], run, reset, check,
                                 lambda row, why: self._skip("decode_error", row["where"], why, row["pick"]), "audio")
        for i, wave in zip(via_dali, decoded):
            out[i] = wave
        return out

    def _decode_capped(self, row: dict[str, Any]) -> np.ndarray | None:
        try:
            return decode_audio(row["flac"].tobytes(), self.audio_cfg)
        except SkipSample as e:
            self._skip(e.reason, row["where"], e.detail, row["pick"])
            return None

    def _process(self, raw_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Raw reader rows -> decoded, policy-applied samples (bad ones skipped and counted)."""
        rows = []
        for row in raw_rows:
            try:
                rows.append(self._check_row(row))
            except SkipSample as e:
                self._skip(e.reason, row["where"], e.detail, row.get("pick"))
        self._crop_rows(rows)
        waves = self._decode(rows)
        samples = []
        for row, wave in zip(rows, waves):
            res = row["crop"]
            if res is None:
                if wave is None:
                    continue
                if wave.size == 0:
                    self._skip("empty_audio", row["where"], pick=row["pick"])
                    continue
                if float(np.max(np.abs(wave))) < SILENCE_PEAK:  # DALI downmixed it: channels that cancel
                    self._skip("silent", row["where"], "all-silent after downmix to mono", row["pick"])
                    continue
                res = apply_length_policy(wave, self.audio_cfg, row["rng"])
            plan = None
            if self.data_cfg.image_size and (plan := self._plan_image(row)) is None:
                continue
            samples.append({
                "jpg": row["jpg"], "plan": plan,
                "pick": row["pick"], "key": row["key"], "where": row["where"], "waveform": res.waveform,
                "length": res.length, "is_longer": res.is_longer, "fusion_starts": res.fusion_starts,
                "text": row["text"], "all_texts": row["all_texts"], "tags": row["tags"],
            })
        if self.data_cfg.image_size:
            images = self._images(samples)
            for sample, image in zip(samples, images):
                sample["image"] = image
            samples = [s for s in samples if s["image"] is not None]
        return samples

    def _batch(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if self.features == "mel":
            if self._mel is None:
                self._mel = self._build_mel()
            self._mel.feed_input("wave", [s["waveform"] for s in samples])
            (mel,) = self._mel.run()
            batch["mel"] = _to_torch(mel)
            frames = [frames_of(len(s["waveform"]), self.audio_cfg.hop_length) for s in samples]
            batch["mel_frames"] = torch.tensor(frames, dtype=torch.int64)
        else:
            batch["waveform"] = collate_waveforms([s["waveform"] for s in samples])
        batch |= collate_meta(samples)
        if self.data_cfg.image_size:
            batch["image"] = torch.stack([s["image"] for s in samples])
        if self.tokenizer is not None:
            tok = self.tokenizer(batch["texts"])
            batch["input_ids"] = tok["input_ids"]
            batch["attention_mask"] = tok["attention_mask"]
        return batch

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        if self.train:
            return self._epoch_batches(self.epoch)
        mine = self._shard_samples()
        return -(-mine // self.data_cfg.batch_size)

    def _shard_samples(self) -> int:
        # DALI's sharding: rank r reads samples [floor(r N / W), floor((r+1) N / W)).
        n, w, r = self._total, self.world_size, self.rank
        return (r + 1) * n // w - r * n // w

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and per-sample choices the next pass uses; a new epoch
        starts at its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches = 0
            self._streams = None
            self._resume = None
            self._position = None

    def state_dict(self) -> dict[str, Any]:
        # The position after the last batch carries the counts as of that position (without the
        # rows a resume reads again); before any batch of this pass the counts are the current ones.
        position = self._position or self._resume or {"picks": 0, "readers": None, "skip_rows": None}
        return {
            "backend": "dali",
            "epoch": self.epoch,
            "batches": self.batches,
            "skipped": dict(self.skipped),
            "warned": dict(self.warned),
            **position,
            "world_size": self.world_size,
            "source_counts": list(self.source_counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        readers = state.get("readers") if "picks" in state else []
        if (
            state.get("backend") != "dali" or state["world_size"] != self.world_size
            or (readers is not None and len(readers) != len(self._stream_urls))
        ):
            raise ValueError(
                f"data position was saved by backend {state.get('backend', 'wds')!r} with "
                f"{state.get('world_size')} ranks and {len(readers or [])} reader(s); this run uses dali "
                f"with {self.world_size} ranks and {len(self._stream_urls)} reader(s): resume with the "
                "same data.backend, sources, data.resampled and world size, or drop the loader state"
            )
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])
        self._resume = {"picks": int(state["picks"]), "readers": readers, "skip_rows": state["skip_rows"]}
        self._streams = None
        self._position = None
        self.skipped = {k: int(v) for k, v in state.get("skipped", {}).items()}
        self.warned = {k: int(v) for k, v in state.get("warned", {}).items()}
        counts = [int(c) for c in state.get("source_counts", [])]
        # A position saved over other sources (epoch mode: still one reader) restarts the counts.
        self.source_counts = counts if len(counts) == len(self.sources) else [0] * len(self.sources)

    def _open_epoch(self) -> None:
        """This epoch's readers, at the start of the epoch or at the restored position."""
        resume = self._resume or {"picks": 0, "readers": None, "skip_rows": None}
        n = len(self._stream_urls)
        checkpoints = resume["readers"] or [None] * n
        skips = resume["skip_rows"] or [0] * n
        self._streams = []
        plan = self._plan(self.epoch)
        if resume["readers"] is None:  # a fresh epoch (a resumed one has its faults in the saved counts)
            for urls, (paths, _, _, num_shards, _) in zip(self._stream_urls, plan):
                order = epoch_shard_order(urls, self.data_cfg.seed, self.epoch)
                self._count_faults(order, paths if num_shards == 1 else None)
        for i, ((paths, idx, shard_id, num_shards, _), ckpt, skip) in enumerate(zip(plan, checkpoints, skips)):
            seed = zlib.crc32(f"{self.data_cfg.seed}/{self.epoch}/{self.rank}/{i}".encode())
            # The readers share data.shuffle_buffer: one raw FLAC per slot, so S sources at the full
            # size each would hold S times the memory of the webdataset backend's one buffer.
            fill = self.data_cfg.shuffle_buffer // len(plan)
            build = self._build_reader(paths, idx, shard_id, num_shards, seed, ckpt, fill)
            self._streams.append(_ReaderStream(build, int(skip)))
        self._picks = int(resume["picks"])
        self._pick_block = -1
        # Rows handed out since the first sample not yet yielded: (pick, stream, reader checkpoint
        # before its reader batch, row in that batch). The position to resume from starts there.
        self._history: deque[tuple[int, int, Any, int]] = deque()
        self._carry: list[dict[str, Any]] = []
        self._counted = []

    def _pick(self, k: int) -> int:
        """The reader (source) of pick ``k`` of this epoch on this rank: counter-based, so a resumed
        run finds it without replaying the picks before it."""
        block, offset = divmod(k, PICK_BLOCK)
        if block != self._pick_block:
            u = np.random.default_rng([self.data_cfg.seed, self.epoch, self.rank, block]).random(PICK_BLOCK)
            self._block_picks = np.minimum(
                np.searchsorted(self._cum_weights, u, side="right"), len(self._cum_weights) - 1
            )
            self._pick_block = block
        return int(self._block_picks[offset])

    def _snapshot(self, first_pick: int) -> dict[str, Any]:
        """The position where pick ``first_pick`` (the first sample not yet yielded) starts."""
        while self._history and self._history[0][0] < first_pick:
            self._history.popleft()
        self._counted = [c for c in self._counted if c[0] >= first_pick]
        counts = {"skipped": dict(self.skipped), "warned": dict(self.warned)}
        for _, kind, reason in self._counted:  # read again on resume: counted again then
            counts[kind][reason] -= 1
        readers, skips = [], []
        for i, stream in enumerate(self._streams):
            pending = next(((c, r) for _, s, c, r in self._history if s == i), None)
            ckpt, row = pending if pending is not None else stream.position()
            readers.append(ckpt)
            skips.append(row)
        return {"picks": first_pick, "readers": readers, "skip_rows": skips,
                "skipped": {k: n for k, n in counts["skipped"].items() if n},
                "warned": {k: n for k, n in counts["warned"].items() if n}}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.train:
            yield from self._iter_eval()
            return
        if self.batches >= self._epoch_batches(self.epoch):
            self.set_epoch(self.epoch + 1)
        if self._streams is None:
            self._open_epoch()
        limit = self._epoch_batches(self.epoch)
        bsz = self.data_cfg.batch_size
        while self.batches < limit:
            while len(self._carry) < bsz:
                rows = []
                # Groups of picks end at multiples of the batch size, as in an uninterrupted run, so
                # a resumed run reads (and counts bad rows) exactly as far ahead at the epoch's end.
                for _ in range(bsz - self._picks % bsz):
                    s = self._pick(self._picks)
                    row, ckpt, r = self._streams[s].next_row()
                    self._history.append((self._picks, s, ckpt, r))
                    rows.append({**row, "pick": self._picks})
                    self._picks += 1
                self._carry.extend(self._process(rows))
            out, self._carry = self._carry[:bsz], self._carry[bsz:]
            self._position = self._snapshot(self._carry[0]["pick"] if self._carry else self._picks)
            self.batches += 1
            for sample in out:
                # where = DALI's "tar:offset:member"; a URL listed by two sources counts for the first.
                self.source_counts[self._source_of.get(sample["where"].rsplit(":", 2)[0], 0)] += 1
            yield self._batch(out)
        log_source_shares(self.sources, self.source_counts, self.rank, self.epoch, self.data_cfg.resampled)
        self.set_epoch(self.epoch + 1)

    def _iter_eval(self) -> Iterator[dict[str, Any]]:
        self._count_faults(self.urls, None)
        remaining = self._shard_samples()
        if remaining == 0:
            return  # fewer samples than ranks left this rank none; evaluate_tasks still joins its gathers
        shard_id, num_shards = self.rank, self.world_size
        if self._total < self.world_size:
            # DALI refuses more shards than samples. Here a rank holds one sample, number r N // W
            # of DALI's split, which is shard r N // W of N.
            shard_id, num_shards = self.rank * self._total // self.world_size, self._total
        reader = self._build_reader(self._paths, self._index_paths, shard_id, num_shards, seed=self.data_cfg.seed)
        pending: list[dict[str, Any]] = []
        bsz = self.data_cfg.batch_size
        while remaining > 0:
            raw = _raw_rows(reader.run())[:remaining]
            remaining -= len(raw)
            pending.extend(self._process(raw))
            while len(pending) >= bsz:
                yield self._batch(pending[:bsz])
                pending = pending[bsz:]
        if pending:
            yield self._batch(pending)


def build_image_pipeline(size: int, batch_size: int, threads: int, device_id: int | None):
    """JPEG bytes + each picture's ``ImagePlan`` -> CLIP-normalised ``(3, size, size)``: the plan's
    frame is decoded alone (ROI decode), its centre-crop window scaled to ``size`` (cubic, antialiased
    like PIL's bicubic; skipped, per sample, for a frame already ``size x size``: a 1:1 cubic pass
    would cost more than the decode), and normalised; on the GPU (nvJPEG, ``mixed``) with a
    ``device_id``, on CPU threads otherwise. Fed by ``run_image_pipeline``, at most ``batch_size``
    pictures a run."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, exec_dynamic=True,
                  prefetch_queue_depth=1, enable_conditionals=True)
    def image():
        jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
        box = fn.external_source(name="box", dtype=types.FLOAT, ndim=1)  # left, top, width, height
        scales = fn.external_source(name="scales", dtype=types.BOOL, ndim=0)
        start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)  # the window's y0, x0
        end = fn.external_source(name="end", dtype=types.FLOAT, ndim=1)  # y1, x1
        img = fn.decoders.image_slice(
            jpg, box[0:2], box[2:4], device="mixed" if gpu else "cpu", output_type=types.RGB,
            normalized_anchor=False, normalized_shape=False, axis_names="WH",
            adjust_orientation=False,  # as PIL (and CLIP's preprocessing) read it: EXIF rotation ignored
        )
        if scales:
            img = fn.resize(img, size=[size, size], roi_start=start, roi_end=end, roi_relative=False,
                            interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(
            img, mean=[255.0 * m for m in CLIP_MEAN], std=[255.0 * s for s in CLIP_STD],
            output_layout="CHW", dtype=types.FLOAT,
        )

    pipe = image()
    pipe.build()
    return pipe


def run_image_pipeline(pipe, jpgs: list[np.ndarray], plans: list[ImagePlan]) -> torch.Tensor:
    """``(len(jpgs), 3, S, S)`` float32 (S: the plans' and the pipeline's size) on the pipeline's device. ``RuntimeError`` (and the
    pipeline is spent) when a JPEG does not decode."""
    windows = [np.asarray(p.window(), dtype=np.float32) for p in plans]
    pipe.feed_input("jpg", jpgs)
    pipe.feed_input("box", [np.asarray(p.box, dtype=np.float32) for p in plans])
    pipe.feed_input("scales", [np.bool_(p.scales) for p in plans])
    pipe.feed_input("start", [w[1::-1].copy() for w in windows])
    pipe.feed_input("end", [w[3:1:-1].copy() for w in windows])
    (out,) = pipe.run()
    return _to_torch(out)


def _run_isolating(rows: list[Any], run: Callable[[list[Any]], list[Any]], reset: Callable[[], None],
                   check: Callable[[Any], str | None], skip: Callable[[Any, str], None], what: str) -> list[Any]:
    """``run(rows)`` (a DALI decoder over a batch) -> one output per row, None for rows skipped.

    One bad row kills a DALI pipeline. On a failure ``reset()`` drops it and the rows run one at a
    time; those DALI refuses alone are ``skip``ped (with the reason of ``check``, an independent
    decoder -- libsndfile, PIL -- where it refuses them too, else DALI's message), so whether a row
    is skipped never depends on the rows batched with it. When every row of a batch of two or more
    fails alone although ``check`` decodes some of them, the failure is not the data's (device
    memory, a bug): it is raised instead of skipping the batch. Rare, so the slow path is fine.
    """
    if not rows:
        return []
    try:
        return run(rows)
    except RuntimeError as e:
        first = e
        log.warning("DALI %s decoder failed on a batch (%s); decoding its samples one by one", what, _dali_message(e))
    reset()
    out: list[Any] = [None] * len(rows)
    refused: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        try:
            (out[i],) = run([row])
        except RuntimeError as e:
            reset()
            refused.append((i, _dali_message(e)))
    reasons = [(i, check(rows[i]), message) for i, message in refused]
    if len(rows) > 1 and len(refused) == len(rows) and any(problem is None for _, problem, _ in reasons):
        raise RuntimeError(f"DALI's {what} decoder fails on every sample of a batch, also alone, though another "
                           f"decoder reads some of them: not a data problem ({_dali_message(first)})") from first
    for i, problem, message in reasons:
        skip(rows[i], problem if problem is not None else f"DALI's {what} decoder refuses it: {message}")
    return out


def _dali_message(exc: BaseException) -> str:
    """The informative line of a DALI pipeline error: the one after "encountered:" (what precedes it
    is the operator's Python traceback), else the first line that is not boilerplate."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1][:300]
    generic = ("Critical error in pipeline", "Current pipeline object is no longer valid")
    useful = [ln for ln in lines if not ln.startswith(generic)]
    return (useful or lines or [type(exc).__name__])[0][:300]


class _ReaderStream:
    """One training reader and the rows it has read but not yet handed out, each with the reader
    checkpoint taken before its reader batch and its row in that batch (where a resume starts)."""

    def __init__(self, reader: Any, skip_rows: int = 0):
        self.reader = reader
        self._skip = skip_rows  # rows of the first reader batch already used (resuming inside it)
        self._buffer: deque[tuple[dict[str, Any], Any, int]] = deque()

    def next_row(self) -> tuple[dict[str, Any], Any, int]:
        """(row, checkpoint before its reader batch, its row in that batch)."""
        while not self._buffer:
            before = self.reader.checkpoint()
            rows = _raw_rows(self.reader.run())
            self._buffer.extend((row, before, r) for r, row in enumerate(rows) if r >= self._skip)
            self._skip = 0
        return self._buffer.popleft()

    def position(self) -> tuple[Any, int]:
        """Where the next row handed out starts."""
        if self._buffer:
            _, ckpt, r = self._buffer[0]
            return ckpt, r
        return self.reader.checkpoint(), self._skip


def _raw_rows(out) -> list[dict[str, Any]]:
    """One reader batch -> rows (key, source, FLAC bytes, JSON bytes). A function, not a method:
    a reader holding a loader method would make a reference cycle that keeps every DALI pipeline (and
    its threads) alive until the garbage collector runs, and a process that forks (a webdataset
    DataLoader worker) while such threads hold a lock can deadlock."""
    flac, meta, info, *jpg = out
    rows = []
    for i in range(len(flac)):
        source = bytes(np.asarray(info[i])).decode("utf-8", "replace")
        member = source.rsplit(":", 1)[-1]
        rows.append({
            "key": split_member_name(member)[0].rsplit("/", 1)[-1],
            "where": source,
            "flac": np.asarray(flac[i]),
            "json": bytes(np.asarray(meta[i])),
            **({"jpg": np.asarray(jpg[0][i])} if jpg else {}),
        })
    return rows


def _rank_samples(order: list[str], shards: dict[str, tuple[str, int]], world_size: int) -> list[int]:
    """Samples each rank reads of the shards in ``order`` (the split ``DaliLoader._plan`` makes)."""
    if len(order) >= world_size:
        return [sum(shards[u][1] for u in order[r::world_size]) for r in range(world_size)]
    n = sum(shards[u][1] for u in order)
    return [(r + 1) * n // world_size - r * n // world_size for r in range(world_size)]


def _index_line_end(line: str) -> int:
    """End offset of the last component of one wds2idx line (``ext offset size name`` groups)."""
    parts = line.split()
    return max(int(parts[i + 1]) + int(parts[i + 2]) for i in range(0, len(parts) - 3, 4))


def _to_torch(tl) -> torch.Tensor:
    """A uniform DALI TensorList (CPU or GPU) -> torch tensor on the same device."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tl.as_tensor()
    shape = list(t.shape())
    if hasattr(tl, "as_cpu") and type(tl).__name__.endswith("GPU"):
        out = torch.empty(shape, dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
    else:
        out = torch.empty(shape, dtype=torch.float32)
    feed_ndarray(t, out)
    return out

