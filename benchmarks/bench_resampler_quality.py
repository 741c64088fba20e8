"""Our resampler (``shards.audio_io.resample``) against scipy's ``resample_poly`` as a peer: aliasing,
images, passband and speed. (ffmpeg / soxr, issue 15's references, are not installed here.)

    .venv/bin/python benchmarks/bench_resampler_quality.py

- 96 -> 48 kHz aliasing: a linear sweep 0 -> 48 kHz; the output while the input is above 25 kHz
  should be silent (everything there would fold below 24 kHz): its RMS in dB relative to the sweep.
- 44.1 -> 48 kHz images: a 20 kHz tone; output energy in 22.05-24 kHz (nothing there in the input)
  in dB relative to the tone.
- passband: gain of that 20 kHz tone (dB); speed: CPU ms per 10 s of 44.1 kHz mono.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.signal import resample_poly

from clapscale.shards.audio_io import resample


def db(x: float) -> float:
    return 20 * np.log10(max(x, 1e-12))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def band_rms(y: np.ndarray, sr: int, lo: float, hi: float) -> float:
    """RMS of ``y`` restricted to [lo, hi] Hz (Hann-windowed spectrum, Parseval)."""
    w = np.hanning(len(y))
    spec = np.fft.rfft(y * w)
    f = np.fft.rfftfreq(len(y), 1 / sr)
    sel = (f >= lo) & (f <= hi)
    return float(np.sqrt(2 * np.sum(np.abs(spec[sel]) ** 2) / np.sum(w**2) / len(y)))


def main() -> int:
    ours = {"ours": lambda x, a, b: resample(x, a, b)}
    def scipy_poly(x, a, b):
        g = np.gcd(a, b)
        return resample_poly(x, b // g, a // g).astype(np.float32)

    peer = {"scipy resample_poly": scipy_poly}
    rows = []
    seconds = 4.0
    t = np.arange(int(seconds * 96000)) / 96000
    sweep = (0.5 * np.sin(np.pi * (48000 / seconds) * t**2)).astype(np.float32)  # f(t) = 48 kHz * t / seconds
    t44 = np.arange(int(2.0 * 44100)) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 20000 * t44)).astype(np.float32)
    long44 = (0.1 * np.random.default_rng(0).standard_normal(10 * 44100)).astype(np.float32)
    for name, fn in {**ours, **peer}.items():
        y = fn(sweep, 96000, 48000)
        above = slice(int(25000 / 48000 * seconds * 48000), None)  # input above 25 kHz
        alias = db(rms(y[above]) / rms(sweep))
        y2 = fn(tone, 44100, 48000)
        mid = y2[4800:-4800]
        image = db(band_rms(mid, 48000, 22050, 24000) / band_rms(mid, 48000, 19900, 20100))
        gain = db(rms(mid) / rms(tone))
        c0 = time.process_time()
        for _ in range(3):
            fn(long44, 44100, 48000)
        ms = 1000 * (time.process_time() - c0) / 3
        rows.append((name, alias, image, gain, ms))
    print(f"{'resampler':<22} {'alias 96k dB':>12} {'image 44.1k dB':>14} {'20 kHz gain dB':>14} {'ms / 10 s':>10}")
    for name, alias, image, gain, ms in rows:
        print(f"{name:<22} {alias:>12.1f} {image:>14.1f} {gain:>14.2f} {ms:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
