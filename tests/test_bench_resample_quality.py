"""benchmarks/bench_ffmpeg.py's resampler-quality measurement: synthetic outputs with a known answer.

The README's ffmpeg comparison quotes these dB figures; a measurement that mis-gates the sweep, reads
the wrong band or normalises by the wrong power would print plausible numbers that mean nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from clapscale.shards.audio_io import resample

_REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ffmpeg", _REPO / "benchmarks" / "bench_ffmpeg.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_ffmpeg", mod)
    spec.loader.exec_module(mod)
    return mod


def _inst_freq(bench, sr: int) -> np.ndarray:
    f0, f1, seconds = bench.ALIAS_SWEEP
    t = np.arange(int(sr * seconds)) / sr
    return f0 * (f1 / f0) ** (t / seconds)


def test_alias_of_a_known_level_is_read_back(bench):
    """The 96 kHz sweep sampled directly at 48 kHz is the unfiltered decimation: above 24 kHz it *is*
    its own alias at 48k - f. Keeping the in-band part at full level and scaling the folded parts to
    -60 dB (fold into 0-20 kHz) and -40 dB (fold into 20-24 kHz) must read back as those levels."""
    x = bench.exp_sweep(48000, *bench.ALIAS_SWEEP)
    f = _inst_freq(bench, 48000)
    gain = np.where(f < 24000, 1.0, np.where(f < 28000, 10 ** (-40 / 20), 10 ** (-60 / 20)))
    got = bench.alias_db(x * gain)
    assert got["alias_0_20k"] == pytest.approx(-60.0, abs=0.5)
    assert got["alias_20_24k"] == pytest.approx(-40.0, abs=0.5)
    # No filter at all: the alias is as loud as the signal.
    naive = bench.alias_db(bench.exp_sweep(96000, *bench.ALIAS_SWEEP)[::2])
    assert naive["alias_0_20k"] == pytest.approx(0.0, abs=0.5)
    # Nothing folded: the floor is far below any resampler's figure.
    assert bench.alias_db(x * (f < 24000))["alias_0_20k"] < -150


def test_image_and_gain_of_a_known_level_are_read_back(bench):
    """An ideal 44.1 -> 48 kHz output (the input signal synthesised at 48 kHz) plus an image of known
    level at the frequency a real one would have (44.1k - f)."""
    t = np.arange(48000 * 4) / 48000
    ideal_sweep = bench.linear_sweep(48000, *bench.IMAGE_SWEEP)
    image = bench.AMP * 10 ** (-70 / 20) * np.sin(2 * np.pi * 23000 * t)
    ideal_tone = bench.tone(48000, bench.IMAGE_TONE, 4.0)
    tone_image = bench.AMP * 10 ** (-50 / 20) * np.sin(2 * np.pi * (44100 - bench.IMAGE_TONE) * t)
    got = bench.image_db(ideal_sweep + image, ideal_tone + tone_image)
    assert got["image_sweep"] == pytest.approx(-70.0, abs=0.5)
    assert got["image_tone"] == pytest.approx(-50.0, abs=0.5)
    clean = bench.image_db(ideal_sweep, ideal_tone)
    assert clean["image_sweep"] < -110 and clean["image_tone"] < -110  # the floor: the sweep's own tails
    assert bench.gain_db(bench.tone(48000, 20000, 2.0) * 10 ** (-1 / 20), 20000) == pytest.approx(-1.0, abs=0.05)


def test_our_resampler_meets_the_figures_the_readme_quotes(bench):
    """README: ours folds < -110 dB into 0-20 kHz (96 -> 48 kHz) and leaves images < -50 dB (44.1 -> 48 kHz)."""
    a = bench.alias_db(resample(bench.exp_sweep(96000, *bench.ALIAS_SWEEP).astype(np.float32), 96000, 48000))
    assert a["alias_0_20k"] < -110 and a["alias_20_24k"] < -55
    up = lambda x: resample(x.astype(np.float32), 44100, 48000)  # noqa: E731
    i = bench.image_db(up(bench.linear_sweep(44100, *bench.IMAGE_SWEEP)), up(bench.tone(44100, bench.IMAGE_TONE, 2.0)))
    assert i["image_sweep"] < -50 and i["image_tone"] < -50
    assert bench.gain_db(up(bench.tone(44100, 20000, 2.0)), 20000) == pytest.approx(-1.6, abs=0.1)
