"""make_shards' per-clip DSP against ffmpeg (LAION's converter), and the resamplers' quality.

    LD_LIBRARY_PATH=... PYTHONPATH=. python benchmarks/bench_ffmpeg.py --ffmpeg /path/to/ffmpeg --src DIR

Debian's ffmpeg without installing it (benchmark only; nothing else in the project uses ffmpeg):
    mkdir -p /tmp/ffmpeg && cd /tmp/ffmpeg
    apt-get download $(apt-get -s install ffmpeg | awk '/^Inst/{print $2}')
    for d in *.deb; do dpkg-deb -x $d root; done
    L=/tmp/ffmpeg/root/usr/lib/x86_64-linux-gnu; export LD_LIBRARY_PATH=$L:$L/blas:$L/lapack:$L/pulseaudio
    # then --ffmpeg /tmp/ffmpeg/root/usr/bin/ffmpeg

Speed: every audio file under ``--src`` is converted to 48 kHz mono FLAC twice, alternating: by our
per-clip DSP in-process (``iter_audio`` -> ``encode_flac_stream``: decode, downmix, resample, 16-bit
FLAC; what ``make_shards`` runs per clip, without its tar writing and checks) and by one ffmpeg
process per file as LAION's pipeline runs it (``ffmpeg -i IN -ar 48000 -ac 1 OUT.flac``; from a float
codec such as Vorbis that writes 24-bit FLAC, so ``-sample_fmt s16`` is timed too). Our CPU time is
``time.process_time``; ffmpeg's is ``resource.getrusage(RUSAGE_CHILDREN)`` (user + system), which
includes its process start, measured alone on a 10 ms file.

Quality (float32 in and out, no quantization): ours (``resample``), ffmpeg's default swr resampler,
ffmpeg's soxr, and ``scipy.signal.resample_poly``:
  alias   96 kHz -> 48 kHz, exponential sweep 20 Hz - 47.5 kHz: output power while the sweep is above
          the output's Nyquist, in the band its fold lands in (0.5-20 kHz from 28-47.5 kHz; 20-24 kHz
          from 24-28 kHz), relative to the output's power while the sweep is in band (1-20 kHz).
  image   44.1 kHz -> 48 kHz: a linear sweep 20 Hz - 21.8 kHz, output power in 22.3-24 kHz (images of
          20.1-21.8 kHz) relative to the input's power; a 21 kHz tone, power at its image (23.1 kHz)
          relative to the tone.
  gain    44.1 kHz -> 48 kHz, a 20 kHz tone's gain (the price of a lower cutoff).
No ffmpeg (``--ffmpeg`` missing or not runnable) is a one-line error; ``--no-ffmpeg`` measures the rest.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import signal

from clapscale.errors import UserError
from clapscale.shards.audio_io import encode_flac_stream, iter_audio, resample
from clapscale.shards.sources import AUDIO_EXTENSIONS

AMP = 0.5  # sweep and tone amplitude: -6 dBFS, no clipping in any resampler's overshoot
WELCH_SEG = 2048


# ----------------------------------------------------------------------------- measurement


def exp_sweep(sr: int, f0: float, f1: float, seconds: float) -> np.ndarray:
    """``AMP * sin`` of an exponential sweep from ``f0`` to ``f1`` Hz, float64 ``(sr * seconds,)``."""
    t = np.arange(int(sr * seconds)) / sr
    k = np.log(f1 / f0)
    return AMP * np.sin(2 * np.pi * f0 * seconds / k * (np.exp(t / seconds * k) - 1.0))


def sweep_time(f: float, f0: float, f1: float, seconds: float) -> float:
    """When the exponential sweep ``f0 -> f1`` over ``seconds`` passes ``f`` Hz."""
    return seconds * np.log(f / f0) / np.log(f1 / f0)


def linear_sweep(sr: int, f0: float, f1: float, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return AMP * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))


def tone(sr: int, f: float, seconds: float) -> np.ndarray:
    return AMP * np.sin(2 * np.pi * f * np.arange(int(sr * seconds)) / sr)


def band_power(x: np.ndarray, sr: int, lo: float, hi: float) -> float:
    """Mean power of ``x`` in ``[lo, hi)`` Hz: Welch PSD (Hann, ``WELCH_SEG``) integrated over the band."""
    x = np.asarray(x, np.float64)
    f, psd = signal.welch(x, sr, window="hann", nperseg=min(WELCH_SEG, len(x)), scaling="density")
    keep = (f >= lo) & (f < hi)
    return float(psd[keep].sum() * (f[1] - f[0]))


def db(ratio: float) -> float:
    return float(10 * np.log10(max(ratio, 1e-30)))


ALIAS_SWEEP = (20.0, 47500.0, 8.0)  # f0, f1 (Hz), seconds; at 96 kHz
MARGIN_S = 0.03  # excluded at each end of a segment: filter delay and ringing


def alias_db(y: np.ndarray, sr_out: int = 48000, sweep: tuple[float, float, float] = ALIAS_SWEEP) -> dict[str, float]:
    """Aliasing of a resampled exponential sweep ``y`` at ``sr_out`` (see the module docstring).

    Returns dB relative to the in-band power: ``alias_0_20k`` (fold of 28-47.5 kHz, in 0.5-20 kHz)
    and ``alias_20_24k`` (fold of 24-28 kHz, in 20-24 kHz).
    """
    f0, f1, seconds = sweep
    nyq = sr_out / 2

    def seg(fa: float, fb: float) -> np.ndarray:
        a = int((sweep_time(fa, f0, f1, seconds) + MARGIN_S) * sr_out)
        b = int((sweep_time(fb, f0, f1, seconds) - MARGIN_S) * sr_out)
        return y[a:b]

    ref = float(np.mean(np.square(seg(1000.0, 20000.0), dtype=np.float64)))
    return {
        "alias_0_20k": db(band_power(seg(sr_out - 20000.0, f1), sr_out, sr_out - f1, 20000.0) / ref),
        "alias_20_24k": db(band_power(seg(nyq, sr_out - 20000.0), sr_out, 20000.0, nyq) / ref),
    }


IMAGE_SWEEP = (20.0, 21800.0, 4.0)  # linear, at 44.1 kHz
IMAGE_TONE = 21000.0
GAIN_TONE = 20000.0


def image_db(y_sweep: np.ndarray, y_tone: np.ndarray, sr_in: int = 44100, sr_out: int = 48000) -> dict[str, float]:
    """Images of a 44.1 -> 48 kHz resampler: ``y_sweep`` resampled ``IMAGE_SWEEP``, ``y_tone`` a resampled
    ``IMAGE_TONE`` tone. dB relative to the input's power (``AMP**2 / 2``)."""
    p_in = AMP**2 / 2
    img = sr_in - IMAGE_TONE
    return {
        "image_sweep": db(band_power(y_sweep, sr_out, sr_in - IMAGE_SWEEP[1] + 200.0, sr_out / 2) / p_in),
        "image_tone": db(band_power(y_tone, sr_out, img - 300.0, img + 300.0) / p_in),
    }


def gain_db(y_tone: np.ndarray, f: float, sr_out: int = 48000) -> float:
    return db(band_power(y_tone, sr_out, f - 300.0, f + 300.0) / (AMP**2 / 2))


# ----------------------------------------------------------------------------- resamplers


def check_ffmpeg(ffmpeg: str) -> str:
    path = shutil.which(ffmpeg)
    if path is None:
        raise UserError(f"ffmpeg not found at {ffmpeg!r}: pass --ffmpeg PATH (an ffmpeg binary) or --no-ffmpeg")
    proc = subprocess.run([path, "-hide_banner", "-version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{path} does not run: {(proc.stderr.strip().splitlines() or ['?'])[-1]} (LD_LIBRARY_PATH?)")
    return path


def ffmpeg_resample(ffmpeg: str, x: np.ndarray, sr_in: int, sr_out: int, engine: str = "swr") -> np.ndarray:
    """``x`` through ffmpeg's aresample (``swr`` defaults or ``soxr``) as raw float32 through pipes."""
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "f32le", "-ar", str(sr_in), "-ac", "1",
           "-i", "pipe:0", "-af", f"aresample={sr_out}:resampler={engine}", "-f", "f32le", "-ac", "1", "pipe:1"]
    proc = subprocess.run(cmd, input=np.asarray(x, "<f4").tobytes(), capture_output=True, check=True)
    return np.frombuffer(proc.stdout, "<f4")


# Longer filters for ours (zeros, rolloff); the default is (24, 0.945). ``--filters`` measures them.
FILTERS = [(32, 0.96), (48, 0.97), (64, 0.975)]


def _ours(zeros: int = 24, rolloff: float = 0.945):
    return lambda x, a, b: resample(x.astype(np.float32), a, b, zeros, rolloff)


def _scipy(x: np.ndarray, a: int, b: int) -> np.ndarray:
    g = np.gcd(a, b)
    return signal.resample_poly(x, b // g, a // g).astype(np.float32)


def resamplers(ffmpeg: str | None, filters: bool = False) -> dict:
    out = {"ours": _ours()}
    if filters:
        out.update({f"ours zeros={z} rolloff={r}": _ours(z, r) for z, r in FILTERS})
    out["scipy resample_poly"] = _scipy
    if ffmpeg:
        out["ffmpeg swr (default)"] = lambda x, a, b: ffmpeg_resample(ffmpeg, x, a, b, "swr")
        out["ffmpeg soxr"] = lambda x, a, b: ffmpeg_resample(ffmpeg, x, a, b, "soxr")
    return out


def quality(ffmpeg: str | None, filters: bool = False) -> None:
    x96 = exp_sweep(96000, *ALIAS_SWEEP)
    xs = linear_sweep(44100, *IMAGE_SWEEP)
    xt, xg = tone(44100, IMAGE_TONE, 2.0), tone(44100, GAIN_TONE, 2.0)
    print("\nresampler quality (dB; lower is better except the 20 kHz gain):")
    print(f"{'resampler':24s} {'alias->0-20k':>13s} {'alias->20-24k':>14s} {'image sweep':>12s} "
          f"{'image 21k':>10s} {'gain 20k':>9s}")
    for name, fn in resamplers(ffmpeg, filters).items():
        a = alias_db(fn(x96, 96000, 48000))
        i = image_db(fn(xs, 44100, 48000), fn(xt, 44100, 48000))
        g = gain_db(fn(xg, 44100, 48000), GAIN_TONE)
        print(f"{name:24s} {a['alias_0_20k']:13.1f} {a['alias_20_24k']:14.1f} {i['image_sweep']:12.1f} "
              f"{i['image_tone']:10.1f} {g:9.2f}")
    if filters:  # CPU of the resampling alone, 44.1 -> 48 kHz, 10 s of noise, filters alternated
        clip = np.random.default_rng(0).standard_normal(441000).astype(np.float32) * 0.1
        spent = {f: [] for f in [(24, 0.945), *FILTERS]}
        for _ in range(5):
            for z, r in spent:
                t0 = time.process_time()
                resample(clip, 44100, 48000, z, r)
                spent[(z, r)].append((time.process_time() - t0) / 10 * 1e3)
        print("ours, CPU ms per audio second (44.1 -> 48 kHz, median of 5): "
              + ", ".join(f"zeros={z} rolloff={r}: {statistics.median(v):.2f}" for (z, r), v in spent.items()))


# ----------------------------------------------------------------------------- speed


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def ours_convert(src: Path, dst: Path) -> None:
    dst.write_bytes(encode_flac_stream(iter_audio(src)).flac)


def ffmpeg_convert(ffmpeg: str, src: Path, dst: Path, extra: tuple[str, ...] = ()) -> None:
    subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
                    "-ar", "48000", "-ac", "1", *extra, str(dst)], check=True)


def speed(ffmpeg: str, files: list[Path], rounds: int) -> None:
    import soundfile as sf

    tmp = Path(tempfile.mkdtemp(prefix="bench_ffmpeg_"))
    try:
        audio_s = sum(sf.info(str(f)).duration for f in files)
        variants = {
            "ours (in-process)": lambda f, d: ours_convert(f, d),
            "ffmpeg -ar 48000 -ac 1": lambda f, d: ffmpeg_convert(ffmpeg, f, d),
            "ffmpeg ... -sample_fmt s16": lambda f, d: ffmpeg_convert(ffmpeg, f, d, ("-sample_fmt", "s16")),
        }
        cpu = {k: [0.0] * len(files) for k in variants}
        wall = {k: [0.0] * len(files) for k in variants}
        sizes = {k: 0 for k in variants}
        for f in files[:10]:  # warm the page cache, libraries and our kernel cache
            for name, fn in variants.items():
                fn(f, tmp / "warm.flac")
        for round_ in range(rounds):
            for i, f in enumerate(files):
                for name, fn in variants.items():  # alternated per file: load drifts hit all alike
                    dst = tmp / f"{i}.flac"
                    c0, p0, w0 = _children_cpu(), time.process_time(), time.perf_counter()
                    fn(f, dst)
                    w1, p1, c1 = time.perf_counter(), time.process_time(), _children_cpu()
                    cpu[name][i] += (p1 - p0) + (c1 - c0)
                    wall[name][i] += w1 - w0
                    sizes[name] += dst.stat().st_size if round_ == 0 else 0
        # ffmpeg's floor: one process converting a 10 ms clip
        tiny = tmp / "tiny.wav"
        sf.write(str(tiny), np.zeros(441, np.float32), 44100, subtype="PCM_16")
        c0, w0 = _children_cpu(), time.perf_counter()
        for _ in range(20):
            ffmpeg_convert(ffmpeg, tiny, tmp / "tiny.flac")
        floor_cpu, floor_wall = (_children_cpu() - c0) / 20, (time.perf_counter() - w0) / 20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(files) * rounds
    print(f"inputs: {len(files)} files, {audio_s:.1f} s of audio ({audio_s / len(files):.2f} s per clip), "
          f"{rounds} round(s); "
          f"cpu cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'converter':28s} {'CPU ms/clip':>12s} {'wall ms/clip':>13s} {'CPU ms per audio s':>19s} {'MB out':>7s}")
    for name in variants:
        c, w = sum(cpu[name]) / n * 1e3, sum(wall[name]) / n * 1e3
        per_audio_s = sum(cpu[name]) / rounds / audio_s * 1e3
        print(f"{name:28s} {c:12.2f} {w:13.2f} {per_audio_s:19.2f} {sizes[name] / 1e6:7.2f}")
    print(f"ffmpeg process floor (10 ms clip): CPU {floor_cpu * 1e3:.2f} ms, wall {floor_wall * 1e3:.2f} ms")
    ours = cpu["ours (in-process)"]
    for name in list(variants)[1:]:
        per_clip = [a / b for a, b in zip(ours, cpu[name]) if b > 0]
        work = sum(cpu[name]) - n * floor_cpu  # ffmpeg's CPU beyond its process start
        # Within the floor's own noise on short inputs: no meaningful ratio then.
        net = f"{sum(ours) / work:.3f}" if work > 0.1 * sum(cpu[name]) else "n/a (inside the floor's noise)"
        print(f"ours / {name}: CPU total {sum(ours) / sum(cpu[name]):.3f}, "
              f"per clip median {statistics.median(per_clip):.3f}; CPU total without ffmpeg's floor {net}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ffmpeg", default="ffmpeg", help="ffmpeg binary (default: ffmpeg on PATH)")
    p.add_argument("--no-ffmpeg", action="store_true", help="quality of ours and scipy only")
    p.add_argument("--src", type=Path, help="a folder of audio for the speed comparison (read only)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--filters", action="store_true", help="also measure ours with longer filters (FILTERS)")
    args = p.parse_args(argv)
    try:
        ffmpeg = None if args.no_ffmpeg else check_ffmpeg(args.ffmpeg)
        if ffmpeg and not args.skip_speed:
            if args.src is None:
                raise UserError("--src DIR is needed for the speed comparison (or --skip-speed)")
            files = sorted(f for f in args.src.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS and f.is_file())
            if not files:
                raise UserError(f"no audio files under {args.src}")
            speed(ffmpeg, files, args.rounds)
        if not args.skip_quality:
            quality(ffmpeg, args.filters)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
