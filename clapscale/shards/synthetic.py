"""The built-in synthetic corpus: seeded sound scenes with known content and compositional captions.

A clip is 1-3 events drawn from ``LABELS`` (tones, chirps, noise colours, pulse trains, ...),
played in sequence ("a rising chirp followed by pink noise") or with one event over a background
("fast pulses over brown noise"), with varied pitch, loudness and duration. Lengths run 1-30 s:
most clips are short (the demo must be fast) and about one in ten is longer than 10 s, with its
events spread over the whole clip, so that feature fusion has something to find.

The classes are chosen to be separable in a 64-bin log-mel view (50 Hz - 14 kHz): they differ in
spectral placement (low/high tone, noise colours), in time-frequency slope (chirps) or in temporal
pattern (pulse rates, vibrato, decays).

Splits are disjoint by construction: every clip's sample count is congruent to its split's
number modulo 3 (train 0, valid 1, test 2), so no clip (and no content hash) can occur in two
splits, and each clip draws from its own RNG stream seeded by ``(seed, split, index)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from clapscale.shards.audio_io import SAMPLE_RATE

SR = SAMPLE_RATE
SPLITS = ("train", "valid", "test")
# Bump whenever generated audio or captions change: it is stored per clip and is part of
# make_shards' plan fingerprint, so an old shard set is never silently "resumed" with new clips.
CORPUS_VERSION = 1

LABELS: list[str] = [
    "low tone",
    "high tone",
    "rising chirp",
    "falling chirp",
    "white noise",
    "pink noise",
    "brown noise",
    "slow pulses",
    "fast pulses",
    "warbling tone",
    "buzz",
    "bell",
]

# Noise-like classes can serve as the background of an overlapped scene.
_BACKGROUNDS = ("white noise", "pink noise", "brown noise", "buzz", "low tone")
_LOUDNESS = {"quiet": 0.03, "": 0.1, "loud": 0.25}  # target RMS per event


def _fade(n: int, ramp: int) -> np.ndarray:
    env = np.ones(n, dtype=np.float32)
    r = min(ramp, n // 2)
    if r > 0:
        ramp_up = np.linspace(0.0, 1.0, r, dtype=np.float32)
        env[:r] = ramp_up
        env[n - r:] = ramp_up[::-1]
    return env


def _coloured_noise(n: int, rng: np.random.Generator, alpha: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^alpha above 20 Hz (alpha 0 white, 1 pink, 2 brown)."""
    # Shape the spectrum on a power-of-two length (pocketfft is slow on awkward lengths), then cut.
    m = 1 << max(int(n - 1).bit_length(), 1)
    spec = np.fft.rfft(rng.standard_normal(m).astype(np.float32))
    f = np.fft.rfftfreq(m, 1.0 / SR)
    spec *= np.maximum(f, 20.0) ** (-alpha / 2.0)
    spec[0] = 0.0
    return np.fft.irfft(spec, m)[:n].astype(np.float32)


def _pulses(n: int, rng: np.random.Generator, rate: float, burst_s: float, freq: float) -> np.ndarray:
    t = np.arange(n, dtype=np.float32) / SR
    phase = (t * rate + rng.random()) % 1.0
    gate = (phase < burst_s * rate).astype(np.float32)
    return gate * np.sin(2 * np.pi * freq * t, dtype=np.float32)


def _chirp(n: int, f0: float, f1: float) -> np.ndarray:
    d = n / SR
    t = np.arange(n, dtype=np.float64) / SR
    k = np.log(f1 / f0)
    phase = 2 * np.pi * f0 * d / k * (np.exp(k * t / d) - 1.0)
    return np.sin(phase).astype(np.float32)


def _bell(n: int, rng: np.random.Generator) -> np.ndarray:
    f = rng.uniform(400, 900)
    t = np.arange(n, dtype=np.float32) / SR
    period = rng.uniform(0.8, 1.6)
    since_strike = t % period
    tau = rng.uniform(0.15, 0.35)
    out = np.zeros(n, dtype=np.float32)
    for ratio, amp in ((1.0, 1.0), (2.76, 0.6), (5.40, 0.4), (8.93, 0.25)):
        out += amp * np.sin(2 * np.pi * f * ratio * t, dtype=np.float32)
    return out * np.exp(-since_strike / tau).astype(np.float32)


def _synth(label: str, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n, dtype=np.float32) / SR
    if label == "low tone":
        f = rng.uniform(80, 250)
        return np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)
    if label == "high tone":
        return np.sin(2 * np.pi * rng.uniform(2000, 5000) * t)
    if label == "rising chirp":
        return _chirp(n, rng.uniform(200, 500), rng.uniform(3000, 8000))
    if label == "falling chirp":
        return _chirp(n, rng.uniform(3000, 8000), rng.uniform(200, 500))
    if label == "white noise":
        return rng.standard_normal(n).astype(np.float32)
    if label == "pink noise":
        return _coloured_noise(n, rng, 1.0)
    if label == "brown noise":
        return _coloured_noise(n, rng, 2.0)
    if label == "slow pulses":
        return _pulses(n, rng, rate=rng.uniform(1.5, 3.0), burst_s=0.08, freq=rng.uniform(800, 1500))
    if label == "fast pulses":
        return _pulses(n, rng, rate=rng.uniform(12, 20), burst_s=0.015, freq=rng.uniform(800, 1500))
    if label == "warbling tone":
        fc, rate, depth = rng.uniform(600, 1500), rng.uniform(4, 8), rng.uniform(0.08, 0.2)
        phase = 2 * np.pi * fc * (t - depth / (2 * np.pi * rate) * np.cos(2 * np.pi * rate * t))
        return np.sin(phase)
    if label == "buzz":
        f = rng.uniform(100, 200)
        return 2.0 * ((t * f) % 1.0) - 1.0
    if label == "bell":
        return _bell(n, rng)
    raise ValueError(f"unknown synthetic label {label!r}; known: {LABELS}")


def _event(label: str, n: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(_synth(label, n, rng), dtype=np.float32)
    x *= rms / max(float(np.sqrt(np.mean(x * x))), 1e-8)
    return x * _fade(n, int(0.01 * SR))


def _clip_seconds(rng: np.random.Generator) -> float:
    u = rng.random()
    if u < 0.78:
        return rng.uniform(1.0, 4.0)
    if u < 0.90:
        return rng.uniform(4.0, 10.0)
    return rng.uniform(10.5, 30.0)


def _phrase(label: str, loudness: str) -> str:
    words = f"{loudness} {label}" if loudness else label
    if label.endswith("s") or label.endswith("noise"):  # plurals and mass nouns take no article
        return words
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}"


_SEQ_JOIN: tuple[Callable[[list[str]], str], ...] = (
    lambda p: " followed by ".join(p),
    lambda p: ", then ".join(p),
    lambda p: "first " + ", then ".join(p),
)
_OVER_JOIN: tuple[Callable[[str, str], str], ...] = (
    lambda fg, bg: f"{fg} over {bg}",
    lambda fg, bg: f"{fg} with {bg} in the background",
)


def _sentence(s: str) -> str:
    return s[0].upper() + s[1:] + "."


def make_clip(split: str, index: int, seed: int = 0) -> dict[str, Any]:
    """Clip ``index`` of ``split``: a record dict (see ``clapscale.shards.writer.encode_record``).

    Deterministic in ``(split, index, seed)``. ``audio`` is float32 ``(n,)`` at 48 kHz, ``text`` two
    captions, ``tag`` the labels present (the longest event first), ``events`` their timing.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; use one of {SPLITS}")
    split_id = SPLITS.index(split)
    rng = np.random.default_rng([seed, split_id, index])
    n = int(_clip_seconds(rng) * SR)
    n += (split_id - n) % 3  # disjoint splits by construction (see module docstring)

    n_events = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    labels = [str(x) for x in rng.choice(LABELS, size=n_events, replace=False)]
    loud = [str(x) for x in rng.choice(list(_LOUDNESS), size=n_events, p=[0.2, 0.6, 0.2])]
    audio = np.zeros(n, dtype=np.float32)
    overlap = n_events == 2 and rng.random() < 0.35 and labels[1] in _BACKGROUNDS
    events = []
    if overlap:
        fg, bg = labels
        audio += _event(bg, n, _LOUDNESS[loud[1]] * 0.5, rng)
        start = int(rng.uniform(0.0, 0.3) * n)
        length = max(int(rng.uniform(0.5, 1.0) * (n - start)), int(0.3 * SR))
        length = min(length, n - start)
        audio[start:start + length] += _event(fg, length, _LOUDNESS[loud[0]], rng)
        events = [{"label": bg, "start": 0.0, "end": n / SR}, {"label": fg, "start": start / SR, "end": (start + length) / SR}]
        phrase_fg, phrase_bg = _phrase(fg, loud[0]), _phrase(bg, loud[1])
        caption = _OVER_JOIN[int(rng.integers(len(_OVER_JOIN)))](phrase_fg, phrase_bg)
        alt = f"{phrase_bg} while {phrase_fg} plays"
        tags = [bg, fg]
    else:
        # Split the clip into consecutive segments with short gaps between events.
        weights = rng.uniform(0.5, 1.5, size=n_events)
        gap = int(rng.uniform(0.0, 0.2) * SR) if n_events > 1 else 0
        usable = n - gap * (n_events - 1)
        bounds = np.concatenate([[0], np.cumsum(weights / weights.sum() * usable)]).astype(int)
        for i, label in enumerate(labels):
            start = int(bounds[i]) + i * gap
            length = int(bounds[i + 1] - bounds[i])
            audio[start:start + length] += _event(label, length, _LOUDNESS[loud[i]], rng)
            events.append({"label": label, "start": start / SR, "end": (start + length) / SR})
        phrases = [_phrase(label, loud[i]) for i, label in enumerate(labels)]
        caption = phrases[0] if n_events == 1 else _SEQ_JOIN[int(rng.integers(len(_SEQ_JOIN)))](phrases)
        alt = "the sound of " + (phrases[0] if n_events == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1])
        tags = [e["label"] for e in sorted(events, key=lambda e: e["start"] - e["end"])]

    peak = float(np.max(np.abs(audio)))
    if peak > 0.99:
        audio *= 0.99 / peak
    return {
        "key": f"syn-{split}-{index:07d}",
        "audio": audio,
        "text": [_sentence(caption), _sentence(alt)],
        "tag": tags,
        "events": [{**e, "start": round(e["start"], 3), "end": round(e["end"], 3)} for e in events],
        "source": "synthetic",
        "original": f"synthetic:{split}:{seed}:{index}",
        "licence": "CC0-1.0",
        "corpus_version": CORPUS_VERSION,
    }


# Rendered pictures (the image modality of the pivot miniature): each class is a shape in a colour, so a
# clip's picture shows exactly its sound classes. Shapes and colours are both class-specific, so either
# cue alone identifies a class; positions, sizes and the background vary per clip.
PICTURE_SIZE = 64
_SHAPES = ("circle", "square", "triangle", "diamond", "bar", "cross")
_COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30), (160, 50, 200), (30, 190, 200),
            (240, 130, 20), (120, 120, 120), (250, 250, 250), (20, 20, 20), (150, 90, 40), (240, 120, 180))
LABEL_STYLE = {label: (_SHAPES[i % len(_SHAPES)], _COLOURS[i]) for i, label in enumerate(LABELS)}


def render_picture(tags: list[str], split: str, index: int, seed: int = 0) -> bytes:
    """A ``PICTURE_SIZE``-pixel JPEG showing one shape per class in ``tags`` (``LABEL_STYLE``), seeded by
    ``(seed, split, index)`` on a stream of its own (the clip's audio stream is untouched)."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
    size = PICTURE_SIZE
    bg = tuple(int(v) for v in rng.integers(60, 200, size=3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for label in tags:
        shape, colour = LABEL_STYLE[label]
        r = int(rng.integers(size // 8, size // 4))
        cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        elif shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
        elif shape == "bar":
            draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=colour)
        else:
            draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=colour)
            draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=colour)
    buf = BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(split: str, n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield ``n`` clips of ``split`` ("train", "valid" or "test") as record dicts, in index order."""
    for index in range(n):
        yield make_clip(split, index, seed)


def split_counts(total: int) -> dict[str, int]:
    """How ``--synthetic N`` divides N clips: 80 % train, 10 % valid, 10 % test (at least 1 each when N >= 3)."""
    if total < 1:
        raise ValueError(f"--synthetic needs a positive clip count, got {total}")
    valid = max(total // 10, 1 if total >= 3 else 0)
    test = max(total // 10, 1 if total >= 3 else 0)
    return {"train": total - valid - test, "valid": valid, "test": test}
