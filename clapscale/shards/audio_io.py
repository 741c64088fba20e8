"""Decode, downmix, resample and encode audio: the per-clip DSP behind the shard builder.

Everything here is numpy + soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, ...).
Stored audio is 48 kHz mono 16-bit; ``quantize`` defines the one float <-> int16 mapping used for
both FLAC encoding and ``content_hash``, so that hashing decoded FLAC gives back the hash of the
array that was encoded (x -> round(x * 32768) clipped to int16; decoding divides by 32768).

Bounded memory for any input: a header's sample rate outside ``MIN_SAMPLE_RATE..MAX_SAMPLE_RATE``
is rejected (``bad_sample_rate``) before anything is allocated from it; the resampler's tables are
capped whatever the rates; decoding, downmix, resampling, quantization, hashing and FLAC encoding
run in blocks (``iter_audio`` -> ``encode_flac_stream``), so a clip costs its compressed bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from clapscale.errors import UserError

SAMPLE_RATE = 48000
# A clip whose peak stays within 1 LSB of 16-bit PCM would be stored as (almost) all zeros: make_shards
# rejects it, --verify names it and both loaders skip it as "silent".
SILENCE_PEAK = 1.5 / 32768
# Channel counts above this are not a listening format (multitrack stems, ambisonics, arrays):
# averaging them into "mono" would silently produce something nobody intended.
MAX_CHANNELS = 8
# Sample rates a real recording can have. Below 4 kHz nothing above 2 kHz is left (telephony is
# 8 kHz); above 768 kHz no converter exists. A header outside this range is damaged, and trusting it
# would turn a 4 KB file into a "2000 s" clip (1 Hz) or make resampling cost gigabytes.
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 768000
# Frames decoded, downmixed and resampled at a time: memory beyond the returned array is bounded.
BLOCK_FRAMES = 1 << 16

AudioSource = Union[str, Path, bytes, bytearray, BinaryIO]


class AudioDecodeError(UserError, ValueError):
    """A source could not be turned into usable audio; the message names the source and why.

    ``code`` is a short machine-readable category (``unreadable``, ``truncated``, ``zero_length``,
    ``non_finite``, ``channel_layout``, ``bad_sample_rate``) used to group rejects in reports.
    """

    def __init__(self, source: str, reason: str, code: str = "unreadable"):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.code = code


def _describe(src: AudioSource) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


def check_sample_rate(sr: int, source: str) -> None:
    """Raise ``AudioDecodeError`` (code ``bad_sample_rate``) unless ``sr`` is a plausible audio rate."""
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(
            source,
            f"implausible sample rate {sr} Hz (a real recording has {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz): "
            "the header is damaged; re-encode the file from its original",
            "bad_sample_rate",
        )


def load_audio(src: AudioSource, target_sr: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode any libsndfile format to a mono float32 array at ``target_sr``.

    Channels are averaged (equal-weight downmix). ``max_seconds`` keeps only the first
    ``max_seconds`` of the source (decoding stops there, so a 3-hour file costs little). Decoding,
    downmix and resampling run in blocks of ``BLOCK_FRAMES``, so memory is the returned array plus
    a constant whatever the length, channel count or sample rate of the source.
    Returns shape ``(n,)`` float32. Raises ``AudioDecodeError`` for unreadable, truncated or
    empty files, more than ``MAX_CHANNELS`` channels, a sample rate outside
    ``MIN_SAMPLE_RATE..MAX_SAMPLE_RATE``, or NaN/inf samples.
    """
    parts = _decode_blocks(src, target_sr, max_seconds)
    expected = next(parts)  # announced first, so the output is allocated once
    out = np.empty(expected, np.float32)
    filled = 0
    for part in parts:
        if filled + part.size > out.size:  # the container under-declared its length (some MP3s)
            out = np.concatenate([out[:filled], np.empty(max(part.size, out.size // 2), np.float32)])
        out[filled : filled + part.size] = part
        filled += part.size
    return out[:filled]


def iter_audio(src: AudioSource, target_sr: int = SAMPLE_RATE, max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """``load_audio`` as a stream of mono float32 blocks at ``target_sr`` (each at most about
    ``BLOCK_FRAMES`` samples times the rate ratio); their concatenation is ``load_audio``'s result.

    Raises ``AudioDecodeError`` like ``load_audio``; a problem found late (NaN samples, a file that
    ends before its header says) is raised after the blocks before it were yielded.
    """
    parts = _decode_blocks(src, target_sr, max_seconds)
    next(parts)
    yield from parts


def _decode_blocks(src: AudioSource, target_sr: int, max_seconds: float | None) -> Iterator[Any]:
    """Yields the expected output length (int), then the output blocks; see ``load_audio``."""
    name = _describe(src)
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(bytes(src))
    elif isinstance(src, Path):
        src = str(src)
    try:
        with sf.SoundFile(src) as f:
            sr_in, channels, declared = f.samplerate, f.channels, f.frames
            if channels < 1 or channels > MAX_CHANNELS:
                raise AudioDecodeError(
                    name, f"unsupported channel layout: {channels} channels (at most {MAX_CHANNELS}; downmix it first)",
                    "channel_layout",
                )
            check_sample_rate(sr_in, name)
            # libsndfile reports an unknown length as a huge number.
            known = 0 < declared < (1 << 62)
            expected = declared if known else 0
            if max_seconds is not None:
                expected = int(round(max_seconds * sr_in)) if not known else min(declared, int(round(max_seconds * sr_in)))
            short_by = _container_truncation(f, src)
            if short_by:
                raise AudioDecodeError(name, f"truncated: {short_by}", "truncated")
            resampler = Resampler(sr_in, target_sr) if sr_in != target_sr else None
            yield -(-expected * target_sr // sr_in)
            read, bad = 0, 0
            want = expected if (known or max_seconds is not None) else -1
            for block in f.blocks(blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True, frames=want):
                read += block.shape[0]
                finite = np.isfinite(block)
                if not finite.all():
                    bad += int((~finite).sum())
                    continue
                if bad:
                    continue
                # A matrix-vector product is several times faster than mean(axis=1) over a short inner axis.
                mono = block @ np.full(channels, 1.0 / channels, np.float32) if channels > 1 else block[:, 0]
                yield resampler.push(mono) if resampler is not None else mono.copy()
            # libsndfile trusts the header's frame count for some formats; coming up short means
            # the file ends early (an interrupted download or copy).
            if known and read < expected:
                raise AudioDecodeError(
                    name, f"truncated: header declares {expected} frames but only {read} could be decoded", "truncated"
                )
            if read == 0:
                raise AudioDecodeError(name, "zero-length audio (0 samples)", "zero_length")
            if bad:
                raise AudioDecodeError(name, f"{bad} NaN/inf samples", "non_finite")
            if resampler is not None:
                yield resampler.finish()
    except AudioDecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        code = "truncated" if "lost sync" in str(exc) else "unreadable"
        raise AudioDecodeError(name, f"cannot decode: {exc}", code) from exc
_WAV_SHORT = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _container_truncation(f: sf.SoundFile, src: Any) -> str | None:
    """Describe a file that ends early where libsndfile silently shortens it instead of failing.

    WAV: libsndfile clamps the data chunk to the bytes present and notes it in its log.
    Ogg (Vorbis, Opus): the stream's last page must carry the end-of-stream flag.
    """
    if f.format in ("WAV", "WAVEX", "W64", "RF64"):
        m = _WAV_SHORT.search(f.extra_info)
        if m and int(m.group(2)) < int(m.group(1)):
            return f"data chunk declares {m.group(1)} bytes but only {m.group(2)} are present"
    elif f.format == "OGG":
        tail = _tail_bytes(src, 1 << 16)
        if tail is not None:
            last = tail.rfind(b"OggS")
            if last < 0 or last + 5 >= len(tail) or not tail[last + 5] & 0x04:
                return "the Ogg stream has no end-of-stream page"
    return None


def _tail_bytes(src: Any, n: int) -> bytes | None:
    if isinstance(src, str):
        with open(src, "rb") as fh:
            fh.seek(0, io.SEEK_END)
            fh.seek(max(fh.tell() - n, 0))
            return fh.read()
    if isinstance(src, io.BytesIO):
        return src.getvalue()[-n:]
    return None


# ----------------------------------------------------------------------------- resampling
#
# Memory is bounded for any pair of rates. The polyphase table of a rate pair has one row per
# output phase (``up`` rows of 2J taps); for an odd rate such as 44,057 Hz or a damaged header's
# 5,000,011 Hz, ``up`` is 48,000 and the exact table alone would be gigabytes. Such pairs use a
# table of at most MAX_TABLE_TAPS taps over evenly spaced fractional phases instead, and each
# output's taps are linearly interpolated between its two neighbouring rows: positions stay exact
# (no approximation of the rate ratio) and the interpolation error is ~1e-7 of full scale. Outputs
# are produced in blocks of at most _WORK_TAPS gathered taps, so the working set never depends on
# the rates or on the length of the input.

MAX_TABLE_TAPS = 1 << 20  # float32 taps in a cached polyphase table (4 MiB)
# Taps per output grow with the downsampling factor; beyond this factor (either way) no pair of
# audio rates is involved, only a damaged header or a wrong argument.
MAX_RATE_RATIO = 1024
_WORK_TAPS = 1 << 18  # taps gathered at once on the interpolated path (a few MiB)


@dataclass(frozen=True)
class _Kernel:
    """A Kaiser-windowed sinc low-pass for one rate pair; positions are in input samples.

    Output ``m`` sits at input position ``m * down / up = n0 + p / up`` and uses taps
    ``x[n0 - J + 1 .. n0 + J]``. ``exact`` says whether ``table`` (float32) has a row for every
    phase ``p`` (``up`` rows) or ``rows - 1`` evenly spaced fractional phases plus the closing 1.0.
    """

    up: int
    down: int
    J: int
    table: np.ndarray
    exact: bool


def _windowed_sinc(frac: np.ndarray, J: int, cutoff: float, half_width: float, beta: float) -> np.ndarray:
    """Taps ``(len(frac), 2J)`` for fractional positions ``frac`` in [0, 1], in float64."""
    tau = frac[:, None] - np.arange(-J + 1, J + 1)[None, :]
    # The cutoff (cycles per input sample) is the lower Nyquist of the two rates minus a margin for
    # the transition band, so that content above the output Nyquist cannot alias when downsampling.
    u = np.minimum(np.abs(tau) / half_width, 1.0)
    h = 2.0 * cutoff * np.sinc(2.0 * cutoff * tau) * (np.i0(beta * np.sqrt(1.0 - u**2)) / np.i0(beta))
    h[np.abs(tau) >= half_width] = 0.0
    return h


@functools.lru_cache(maxsize=32)
def _kernel(sr_in: int, sr_out: int, zeros: int, rolloff: float, beta: float) -> _Kernel:
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    cutoff = 0.5 * rolloff * min(1.0, up / down)
    half_width = zeros / (2.0 * cutoff)
    J = int(math.ceil(half_width))
    exact = up * 2 * J <= MAX_TABLE_TAPS
    rows = up if exact else max(MAX_TABLE_TAPS // (2 * J), 2)
    frac = np.arange(rows) / up if exact else np.linspace(0.0, 1.0, rows)
    table = np.empty((rows, 2 * J), np.float32)
    step = max(1, (1 << 16) // (2 * J))  # float64 temporaries of the build stay small too
    for a in range(0, rows, step):
        table[a : a + step] = _windowed_sinc(frac[a : a + step], J, cutoff, half_width, beta)
    return _Kernel(up, down, J, table, exact)


def _check_rates(sr_in: int, sr_out: int) -> None:
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if max(sr_in, sr_out) > MAX_RATE_RATIO * min(sr_in, sr_out):
        raise ValueError(
            f"cannot resample {sr_in} Hz -> {sr_out} Hz: the rates differ by more than {MAX_RATE_RATIO}x "
            "(is one of them wrong?)"
        )


class Resampler:
    """Streaming band-limited resampling of a mono signal: ``push`` blocks, then ``finish``.

    Polyphase windowed-sinc (Kaiser window, ``zeros`` zero crossings each side) with the cutoff at
    ``rolloff`` times the lower of the two Nyquist frequencies: a 44.1 -> 48 kHz tone keeps its
    frequency, and 96 -> 48 kHz removes content above 24 kHz instead of folding it down. The
    concatenated outputs equal ``resample`` of the concatenated inputs: ``ceil(n * sr_out / sr_in)``
    float32 samples for ``n`` input samples. Memory is bounded for any rates and any length: the
    state is the last ``2J`` input samples (J ~ ``zeros * max(1, sr_in / sr_out)``) plus a block.
    Rates more than ``MAX_RATE_RATIO`` apart raise ``ValueError``.
    """

    def __init__(self, sr_in: int, sr_out: int, zeros: int = 24, rolloff: float = 0.945, beta: float = 10.0):
        sr_in, sr_out = int(sr_in), int(sr_out)
        _check_rates(sr_in, sr_out)
        self.k = _kernel(sr_in, sr_out, zeros, rolloff, beta)
        # The signal is zero before its first sample: the buffer starts J - 1 zeros early so that
        # output 0 has all its taps.
        self._buf = np.zeros(self.k.J - 1, np.float32)
        self._buf_start = -(self.k.J - 1)  # input index of _buf[0]
        self._n_in = 0
        self._m = 0  # next output index

    def push(self, x: np.ndarray) -> np.ndarray:
        """Feed the next input samples ``(n,)``; returns every output that they complete."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"resample expects a mono (n,) array, got shape {x.shape}")
        self._buf = np.concatenate([self._buf, x])
        self._n_in += x.size
        k = self.k
        # Output m is complete once its last tap n0 + J has arrived: n0 + J <= n_in - 1.
        ready = max(self._n_in - k.J, 0)
        return self._emit(-(-ready * k.up // k.down))

    def finish(self) -> np.ndarray:
        """The remaining outputs (the signal is zero after its last sample)."""
        k = self.k
        self._buf = np.concatenate([self._buf, np.zeros(k.J + 1, np.float32)])
        return self._emit(-(-self._n_in * k.up // k.down))

    def _emit(self, m_end: int) -> np.ndarray:
        k, m_a = self.k, self._m
        y = np.empty(max(m_end - m_a, 0), np.float32)
        if y.size:
            (self._emit_exact if k.exact else self._emit_interpolated)(y, m_a)
            self._m = m_end
        # Keep from the first tap of the next output on.
        drop = (self._m * k.down) // k.up - k.J + 1 - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:].copy()
            self._buf_start += drop
        return y

    def _emit_exact(self, y: np.ndarray, m_a: int) -> None:
        # Outputs sharing a fractional phase form an arithmetic progression m = m0 + i*up whose
        # input positions advance by `down`: one strided view and one matrix-vector product per phase.
        k = self.k
        windows = sliding_window_view(self._buf, 2 * k.J)
        for r in range(min(k.up, y.size)):
            m0 = m_a + r
            n = len(range(r, y.size, k.up))
            start = (m0 * k.down) // k.up - k.J + 1 - self._buf_start
            # float32 throughout: accumulation error (~1e-7) is far below 16-bit quantisation.
            y[r :: k.up] = np.einsum("ij,j->i", windows[start : start + n * k.down : k.down], k.table[(m0 * k.down) % k.up])

    def _emit_interpolated(self, y: np.ndarray, m_a: int) -> None:
        k = self.k
        windows = sliding_window_view(self._buf, 2 * k.J)
        spacing = len(k.table) - 1
        step = max(1, _WORK_TAPS // (2 * k.J))
        for a in range(0, y.size, step):
            pos = np.arange(m_a + a, m_a + min(a + step, y.size), dtype=np.int64) * k.down
            where = (pos % k.up) * spacing / k.up  # fractional phase in table rows
            row = np.minimum(where.astype(np.int64), spacing - 1)
            w = (where - row).astype(np.float32)
            taps = windows[pos // k.up - k.J + 1 - self._buf_start]
            lo = np.einsum("ij,ij->i", taps, k.table[row])
            hi = np.einsum("ij,ij->i", taps, k.table[row + 1])
            y[a : a + pos.size] = lo + w * (hi - lo)


def resample(x: np.ndarray, sr_in: int, sr_out: int, zeros: int = 24, rolloff: float = 0.945, beta: float = 10.0) -> np.ndarray:
    """Band-limited resampling of a mono signal, shape ``(n,)`` -> ``(ceil(n * sr_out / sr_in),)`` float32.

    See :class:`Resampler` (same filter; memory beyond the input and output is bounded for any rates).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample expects a mono (n,) array, got shape {x.shape}")
    _check_rates(int(sr_in), int(sr_out))
    if int(sr_in) == int(sr_out) or x.size == 0:
        return x.copy()
    rs = Resampler(sr_in, sr_out, zeros, rolloff, beta)
    y = np.empty(-(-x.size * rs.k.up // rs.k.down), np.float32)
    filled = 0
    for start in range(0, x.size, BLOCK_FRAMES):
        part = rs.push(x[start : start + BLOCK_FRAMES])
        y[filled : filled + part.size] = part
        filled += part.size
    y[filled:] = rs.finish()
    return y


def quantize(x: np.ndarray) -> np.ndarray:
    """float (n,) in [-1, 1] -> int16 (n,), the mapping used by ``encode_flac`` and ``content_hash``.

    int16 input is returned as is, so callers can quantize once and pass the PCM to both. Works in
    blocks, so a long clip costs its int16 copy and no float64 one.
    """
    if isinstance(x, np.ndarray) and x.dtype == np.int16:
        return x.astype("<i2", copy=False)
    flat = np.asarray(x).reshape(-1)
    out = np.empty(flat.shape, "<i2")
    for start in range(0, flat.size, BLOCK_FRAMES):
        q = np.round(flat[start : start + BLOCK_FRAMES].astype(np.float64) * 32768.0)
        out[start : start + BLOCK_FRAMES] = np.clip(q, -32768, 32767)
    return out.reshape(np.shape(x))


def encode_flac(x: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """Encode a mono float array ``(n,)`` as 16-bit FLAC bytes (values outside [-1, 1) are clipped)."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"encode_flac expects a mono (n,) array, got shape {x.shape}")
    return encode_flac_stream([x], sr).flac


@dataclass(frozen=True)
class EncodedAudio:
    """A clip stored as 16-bit FLAC, with what the shard writer records about its PCM.

    ``samples``: length; ``content_hash``: as :func:`content_hash` of the whole clip; ``peak``:
    max ``|x|`` of the float input (before quantization).
    """

    flac: bytes
    samples: int
    content_hash: str
    peak: float


def encode_flac_stream(blocks: Iterable[np.ndarray], sr: int = SAMPLE_RATE) -> EncodedAudio:
    """Encode mono float blocks ``(n_i,)`` as one 16-bit FLAC stream, holding one block at a time.

    With ``iter_audio`` as the source, a clip of any length costs its compressed bytes plus a block
    (a 3-hour file no longer needs its PCM in memory). The bytes equal ``encode_flac`` of the
    concatenated blocks.
    """
    buf = io.BytesIO()
    digest = hashlib.sha256()
    samples, peak = 0, 0.0
    with sf.SoundFile(buf, "w", sr, 1, format="FLAC", subtype="PCM_16") as f:
        for block in blocks:
            block = np.asarray(block)
            if block.size == 0:
                continue
            pcm = quantize(block)
            digest.update(pcm.tobytes())
            f.write(pcm)
            samples += pcm.size
            peak = max(peak, float(np.max(np.abs(block))))
    return EncodedAudio(buf.getvalue(), samples, digest.hexdigest(), peak)


def content_hash(x: np.ndarray) -> str:
    """sha256 (hex) of the 16-bit little-endian PCM that ``encode_flac`` would store for ``x`` ``(n,)``.

    Stable across a FLAC round trip: ``content_hash(load_audio(encode_flac(x))) == content_hash(x)``.
    """
    pcm = quantize(x).reshape(-1)
    digest = hashlib.sha256()
    for start in range(0, pcm.size, BLOCK_FRAMES):
        digest.update(pcm[start : start + BLOCK_FRAMES].tobytes())
    return digest.hexdigest()
