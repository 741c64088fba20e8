"""Peak memory of decoding and sharding: odd header rates, odd real rates, and long files.

    .venv/bin/python benchmarks/bench_audio_memory.py                 # 10-minute file, 1 s odd-rate files
    .venv/bin/python benchmarks/bench_audio_memory.py --minutes 3 30

Each measurement runs in a fresh interpreter and reports the resident memory it added (VmHWM after minus
before, with numpy, soundfile and the CLI already imported). VmHWM, not getrusage's ru_maxrss: Linux carries
ru_maxrss over exec from the forked parent. For long files the printed ratio is peak / FLAC size: bounded
memory means it stays near 2 (the compressed member and its copy in the tar buffer) whatever the length.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

_PROBE = r"""
import json, sys
from clapscale.shards import audio_io, cli

def high_water_kb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

kind, args = sys.argv[1], sys.argv[2:]
base = high_water_kb()
out = {}
try:
    if kind == "load":
        out["samples"] = int(audio_io.load_audio(args[0]).size)
    else:
        out["rc"] = cli.main(args + ["--workers", "0", "--quiet"] if kind == "build" else args)
except audio_io.AudioDecodeError as e:
    out["code"] = e.code
out["peak_mb"] = (high_water_kb() - base) / 1024
print(json.dumps(out))
"""


def probe(kind: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, kind, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def header_rate_wav(path: Path, rate: int) -> None:
    """A real 1 s WAV whose header claims ``rate`` Hz (sample rate and byte rate patched)."""
    noise = (np.random.default_rng(0).standard_normal(48000) * 0.1).astype(np.float32)
    sf.write(path, noise, 48000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    struct.pack_into("<II", data, 24, rate, rate * 2)
    path.write_bytes(bytes(data))


def long_wav(path: Path, seconds: int) -> None:
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", 44100, 2, subtype="PCM_16") as f:
        for _ in range(seconds // 10):
            f.write((rng.standard_normal((441000, 2)) * 0.1).astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=int, nargs="+", default=[10], help="lengths of the long test files")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("damaged header rates (1 s file):")
        for rate in (1, 1000003, 5000011, 2147483647):
            header_rate_wav(tmp / "h.wav", rate)
            r = probe("load", str(tmp / "h.wav"))
            print(f"  {rate:>10} Hz  {r.get('code', 'accepted'):<16} +{r['peak_mb']:.1f} MB")
        print("real odd rates (1 s tone, load_audio to 48 kHz):")
        for rate in (44100, 44057, 96001, 767999):
            t = np.arange(rate) / rate
            sf.write(tmp / "o.wav", (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), rate, subtype="FLOAT")
            print(f"  {rate:>10} Hz  +{probe('load', str(tmp / 'o.wav'))['peak_mb']:.1f} MB")
        print("long 44.1 kHz stereo files:")
        for minutes in args.minutes:
            src = tmp / f"src{minutes}" / "long"
            src.mkdir(parents=True)
            long_wav(src / "noise.wav", minutes * 60)
            out = tmp / f"out{minutes}"
            built = probe("build", "--from-dir", str(src.parent), "--out", str(out))
            (tar,) = (out / "train").glob("*.tar")
            verified = probe("verify", "--verify", str(out))
            tar_mb = tar.stat().st_size / 2**20
            print(f"  {minutes:>4} min: FLAC/tar {tar_mb:.1f} MB; make_shards +{built['peak_mb']:.1f} MB "
                  f"({built['peak_mb'] / tar_mb:.2f} x tar); --verify +{verified['peak_mb']:.1f} MB "
                  f"({verified['peak_mb'] / tar_mb:.2f} x tar)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
