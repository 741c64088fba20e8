"""Length policies: one decoded clip -> a fixed-size waveform (or, for fusion, the clip plus the
positions of its three local chunks).

Table of what each ``audio.length_policy`` does (N = clip_samples, 480000 for 10 s at 48 kHz):

=============  ===========================================  =======================================
policy         clip longer than N                            clip shorter than N
=============  ===========================================  =======================================
rand_trunc     random N-sample crop (eval: the first N)      tile whole copies, zero-pad (LAION's
                                                             rand_trunc + repeatpad default)
repeatpad      random N-sample crop (eval: the first N)      tile whole copies, then zero-pad
pad            random N-sample crop (eval: the first N)      zero-pad
fusion         kept whole (up to max_seconds); 3 chunk       tile whole copies, then zero-pad
               starts drawn in the front / middle / back
               thirds of its mel frames (eval: each
               third's midpoint)
=============  ===========================================  =======================================

A clip is *longer* when its centred STFT has more frames than one clip (``len // hop + 1 > 1001``),
as transformers' ``ClapFeatureExtractor`` decides; a clip a few samples over N but still 1001 frames
is cropped to N and not longer. ``is_longer`` is reported for every policy; only fusion towers use it.
Every clip was already cut at ``audio.max_seconds`` by the decoder, which bounds memory for long clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clapscale.config import AudioConfig


@dataclass
class PolicyResult:
    """``waveform``: float32 (N,) or, for a longer fusion clip, (length,); ``length``: real samples
    before padding; ``fusion_starts``: three frame indices (zeros unless fusion and longer)."""

    waveform: np.ndarray
    length: int
    is_longer: bool
    fusion_starts: tuple[int, int, int]


def frames_of(n_samples: int, hop_length: int) -> int:
    """Frames of a centred STFT over ``n_samples``."""
    return n_samples // hop_length + 1


def fusion_chunk_ranges(total_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """Inclusive ranges of allowed chunk starts for the front, middle and back thirds.

    The candidate starts ``0 .. total - chunk`` are split into three near-equal consecutive parts
    (``numpy.array_split``, as LAION-CLAP and transformers do); an empty part falls back to start 0.
    """
    n = total_frames - chunk_frames + 1
    if n < 1:
        raise ValueError(f"a clip of {total_frames} frames has no {chunk_frames}-frame chunk")
    parts = np.array_split(np.arange(n), 3)
    return [(int(p[0]), int(p[-1])) if len(p) else (0, 0) for p in parts]


def fusion_chunk_starts(
    total_frames: int, chunk_frames: int, rng: np.random.Generator | None
) -> tuple[int, int, int]:
    """One start per third: uniform in its range when ``rng`` is given (training), else its midpoint."""
    out = []
    for lo, hi in fusion_chunk_ranges(total_frames, chunk_frames):
        out.append(int(rng.integers(lo, hi + 1)) if rng is not None else (lo + hi) // 2)
    return out[0], out[1], out[2]


def repeat_pad(wave: np.ndarray, n: int) -> np.ndarray:
    """Tile whole copies of ``wave`` (``n // len`` of them), then zero-pad to ``n``."""
    reps = max(n // len(wave), 1)
    tiled = np.tile(wave, reps)[:n]
    return zero_pad(tiled, n)


def zero_pad(wave: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[: len(wave)] = wave[:n]
    return out


def crop_offset(length: int, audio_cfg: AudioConfig, rng: np.random.Generator | None) -> int | None:
    """Start of the ``clip_samples`` crop that ``apply_length_policy`` takes from a clip of ``length``
    samples, or None when it keeps the clip whole (not longer than N, or a longer fusion clip).

    Draws from ``rng`` exactly when ``apply_length_policy`` does, so a loader that knows the length
    from the header can decode only the crop (``clapscale.data.wds.decode_crop``).
    """
    n = audio_cfg.clip_samples
    if length <= n:
        return None
    if audio_cfg.length_policy == "fusion":
        # A longer fusion clip is kept whole; one a few samples over N but still one clip's frames is cut.
        return None if frames_of(length, audio_cfg.hop_length) > audio_cfg.n_frames else 0
    return int(rng.integers(0, length - n + 1)) if rng is not None else 0


def apply_length_policy(
    wave: np.ndarray, audio_cfg: AudioConfig, rng: np.random.Generator | None
) -> PolicyResult:
    """Apply ``audio_cfg.length_policy`` to one mono clip (float32 ``(n,)``, n >= 1).

    ``rng`` None means evaluation: no randomness, the choices in the module table.
    """
    n = audio_cfg.clip_samples
    length = len(wave)
    if length == 0:
        raise ValueError("zero-length audio")
    policy = audio_cfg.length_policy
    longer = frames_of(length, audio_cfg.hop_length) > audio_cfg.n_frames
    wave = wave.astype(np.float32, copy=False)
    if policy == "fusion" and longer:
        starts = fusion_chunk_starts(frames_of(length, audio_cfg.hop_length), audio_cfg.n_frames, rng)
        return PolicyResult(wave, length, True, starts)
    if length == n:
        return PolicyResult(wave, length, False, (0, 0, 0))
    offset = crop_offset(length, audio_cfg, rng)
    if offset is not None:
        return PolicyResult(wave[offset : offset + n].copy(), length, longer, (0, 0, 0))
    if policy == "pad":
        out = zero_pad(wave, n)
    elif policy in ("rand_trunc", "repeatpad", "fusion"):
        out = repeat_pad(wave, n)
    else:
        raise ValueError(f"length policy {policy!r} is not one of rand_trunc, repeatpad, pad, fusion")
    return PolicyResult(out, length, False, (0, 0, 0))
