"""Loader throughput on shards of 10 s clips, as ratios to raw FLAC decoding.

    .venv/bin/python benchmarks/bench_loader.py [--clips 96] [--workers 1] [--batch 16] [--shards DIR]

Stages, each in clips per CPU-second (CPU time of the process, its threads and its loader worker
processes; robust to a shared, busy machine, unlike wall-clock rates, which are printed beside):
  (a) raw FLAC decode: libsndfile on FLAC bytes already in memory, one core: this stage's limit.
  (b) webdataset loader up to ready batches (read tar, decode, length policy, captions, collate).
  (c) DALI loader, mel left to the device (``features="waveform"``): what training with the mel on
      the accelerator costs the CPU.
  (c') DALI loader with its mel on this machine's device (CPU without a GPU: the mel is then CPU
      work that a training node would run on the GPU).
  (d) torch log-mel on this machine's device for the same clips (for scale).
The time to the first batch (worker start-up, pipeline warm-up) is printed beside. One table with
ratios to (a), all measured in one run. Target: (b) and (c) >= 0.8. ``--json PATH`` also writes the
table (benchmarks/gpu_suite.sh reads it); where DALI is not installed its stages are recorded as
skipped and the others still run.

``--pictures N`` (0 = off) also measures picture decoding, in pictures per CPU-second, on N video
strips of 4 frames of 224 px (VIP-ANT's input; ``data.image_size: 224``), the frame evaluation uses:
  (p) PIL, the webdataset backend's path (``clapscale.data.images.decode_image``), one core;
  (p') DALI's image pipeline (``clapscale.data.dali.build_image_pipeline``) on this machine's device
       (nvJPEG with a GPU; CPU threads otherwise), with its ratio to (p).

On a shared machine, ``--repeat R`` measures (a) and every stage R times, interleaved: the table
shows medians, and each stage's ratio per round (its pass over (a) of the same round) is printed as
median [min, max]. ``--only wds,raw_decode`` limits the stages (``raw_decode`` always runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import resource
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from clapscale.config import load_config
from clapscale.data import build_loader
from clapscale.data.dali import DaliLoader
from clapscale.data.specs import parse_spec
from clapscale.features import LogMel
from clapscale.shards.writer import write_shards

SR = 48000


def make_shards(out: Path, clips: int, seconds: float, shard_size: int = 16) -> str:
    """``clips`` tone-plus-noise clips of ``seconds`` written as shards under ``out``; returns the spec."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR

    def records():
        for i in range(clips):
            # Tone + noise: compresses like real audio (pure noise would be unrealistically large).
            x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.02 * rng.standard_normal(len(t))
            yield {"key": f"bench-{i:05d}", "audio": x.astype(np.float32), "text": [f"clip {i}"], "tag": []}

    paths = write_shards(records(), out, "bench", shard_size=shard_size)
    return f"{out}/bench/{{{paths[0].stem}..{paths[-1].stem}}}.tar"


def flac_members(spec: str) -> list[bytes]:
    out = []
    for url in parse_spec(spec)[0].urls:
        with tarfile.open(url) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".flac")]
    return out


def cpu_seconds() -> float:
    """CPU time of this process (all threads, e.g. DALI's) plus its finished children (loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, result) of one call."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, cpu_seconds() - c0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=160)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="webdataset workers = DALI threads")
    ap.add_argument("--shards", default="", help="existing shard spec; default: write temp shards")
    ap.add_argument("--json", default="", help="also write the table here")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every stage (medians, ratio spread)")
    ap.add_argument("--only", default="", help="comma-separated stage keys to run (default: all)")
    ap.add_argument("--pictures", type=int, default=0, help="video strips for the picture stages (0: none)")
    args = ap.parse_args(argv)

    tmp = None
    spec = args.shards
    if not spec:
        tmp = tempfile.TemporaryDirectory(prefix="bench-loader-")
        spec = make_shards(Path(tmp.name), args.clips, args.seconds)
    cores = max(args.workers, 1)
    cfg = load_config(None, [
        f"data.train={spec}", f"data.batch_size={args.batch}", f"data.workers={args.workers}",
        "audio.length_policy=rand_trunc",
    ])

    members = flac_members(spec)
    n = len(members)
    for m in members[:4]:  # warm caches
        sf.read(io.BytesIO(m), dtype="float32")

    def run_decode() -> tuple[float, float, float]:
        wall, cpu, _ = timed(lambda: sum(len(sf.read(io.BytesIO(m), dtype="float32")[0]) for m in members))
        return n / cpu, n / wall, 0.0

    warmed: set[int] = set()

    def run_loader(loader) -> tuple[float, float, float]:
        """One warm pass: (clips per CPU-second, wall clips/s, seconds to the first batch)."""
        if id(loader) not in warmed:
            sum(len(b["keys"]) for b in loader)  # warm: page cache, pipeline build
            warmed.add(id(loader))
        first: list[float] = []
        t0 = time.perf_counter()

        def count() -> int:
            k = 0
            for b in loader:
                if not first:
                    first.append(time.perf_counter() - t0)
                k += len(b["keys"])
            return k

        wall, cpu, k = timed(count)
        return k / cpu, k / wall, first[0]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mel_dev = "GPU" if device == "cuda" else "CPU"
    stages = [("wds", f"(b) webdataset loader ({args.workers} workers)", lambda: build_loader(cfg, spec, train=False))]
    dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    dali_stages = [
        ("dali_waveform", f"(c) DALI loader, mel left to device ({cores} threads)",
         lambda: DaliLoader(parse_spec(spec), cfg.audio, cfg.data, train=False, features="waveform")),
        (f"dali_mel_{mel_dev.lower()}", f"(c') DALI loader + DALI mel on {mel_dev} ({cores} threads)",
         lambda: DaliLoader(parse_spec(spec), cfg.audio, cfg.data, train=False)),
    ]
    skipped = [] if dali else [(key, name) for key, name, _ in dali_stages]
    stages += dali_stages if dali else []
    if args.only:
        stages = [s for s in stages if s[0] in args.only.split(",")]
    loaders = [(key, name, make()) for key, name, make in stages]
    rounds: dict[str, list[tuple[float, float, float]]] = {"raw_decode": []}
    for _ in range(args.repeat):
        rounds["raw_decode"].append(run_decode())
        for key, _, loader in loaders:
            rounds.setdefault(key, []).append(run_loader(loader))

    def median(key: str) -> tuple[float, float, float]:
        return tuple(statistics.median(r[i] for r in rounds[key]) for i in range(3))  # type: ignore[return-value]

    def spread(key: str) -> list[float]:
        return sorted(r[0] / d[0] for r, d in zip(rounds[key], rounds["raw_decode"]))

    results = [(key, name, *median(key)) for key, name, _ in loaders]

    logmel = LogMel(cfg.audio).to(device)
    wave = torch.zeros(args.batch, cfg.audio.clip_samples)
    logmel(wave)

    def run_mel() -> int:
        for _ in range(-(-n // args.batch)):
            logmel(wave)
        if device == "cuda":
            torch.cuda.synchronize()
        return -(-n // args.batch) * args.batch

    wall_d, cpu_d, n_d = timed(run_mel)

    a = median("raw_decode")[0]
    rows = [("raw_decode", "(a) raw FLAC decode (in-process)", *median("raw_decode")), *results,
            (f"torch_mel_{mel_dev.lower()}", f"(d) torch log-mel on {mel_dev} ({torch.get_num_threads()} threads)",
             n_d / cpu_d, n_d / wall_d, 0.0)]
    print(f"{n} clips of {args.seconds:g} s, batch {args.batch}; 'per core' = clips per CPU-second "
          "(this process, its threads and its finished worker processes)")
    print(f"{'stage':<50} {'clips/CPU-s':>11} {'ratio (a)':>9} {'wall clips/s':>12} {'1st batch s':>11}")
    for _, name, per_cpu, per_wall, startup in rows:
        print(f"{name:<50} {per_cpu:>11.1f} {per_cpu / a:>9.2f} {per_wall:>12.1f} {startup:>11.2f}")
    for _, name in skipped:
        print(f"{name:<50} skipped: nvidia.dali is not installed")
    if args.repeat > 1:
        for key, name, _ in loaders:
            r = spread(key)
            print(f"{name}: ratio to (a) per round, median {statistics.median(r):.2f} [{r[0]:.2f}, {r[-1]:.2f}] "
                  f"over {args.repeat} rounds")
    pictures = bench_pictures(args.pictures, args.batch, cores, dali) if args.pictures else {}
    if args.json:
        report = {
            "clips": n, "seconds": args.seconds, "batch": args.batch, "workers": args.workers, "device": device,
            "stages": {key: {"name": name, "clips_per_cpu_s": per_cpu, "ratio_to_decode": per_cpu / a,
                             "wall_clips_per_s": per_wall, "first_batch_s": startup,
                             **({"ratio_rounds": spread(key)} if key in rounds and key != "raw_decode" else {})}
                       for key, name, per_cpu, per_wall, startup in rows},
            "skipped": {key: "nvidia.dali is not installed" for key, _ in skipped},
            **({"pictures": pictures} if pictures else {}),
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


def strip_jpegs(n: int, frames: int = 4, size: int = 224) -> list[bytes]:
    """``n`` JPEG strips of ``frames`` textured ``size``-pixel frames, as make_shards stores a video's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        low = (rng.random((8, 8 * frames, 3)) * 255).astype(np.uint8)
        im = Image.fromarray(low).resize((frames * size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_pictures(n: int, batch: int, threads: int, dali: bool) -> dict:
    """(p) PIL vs (p') DALI on the same strips and plans: pictures per CPU-second, and their ratio."""
    from clapscale.data.images import decode_image, image_size_of, plan_image

    size, frames, tile = 224, 4, 1
    jpgs = strip_jpegs(n, frames)
    rows: dict[str, dict] = {}
    wall, cpu, _ = timed(lambda: [decode_image(j, size, tile, frames) for j in jpgs])
    rows["pil"] = {"name": "(p) PIL (webdataset path), 1 core", "pictures_per_cpu_s": n / cpu,
                   "wall_pictures_per_s": n / wall}
    if dali:
        from clapscale.data.dali import build_image_pipeline, run_image_pipeline

        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        pipe = build_image_pipeline(size, batch, threads, device_id)

        def run() -> None:
            for i in range(0, n, batch):  # the plan (a header read per picture) is the loader's work too
                plans = [plan_image(*image_size_of(j), size, tile, frames) for j in jpgs[i:i + batch]]
                run_image_pipeline(pipe, [np.frombuffer(j, np.uint8) for j in jpgs[i:i + batch]], plans)
            if device_id is not None:
                torch.cuda.synchronize()

        run()  # warm: pipeline build, decoder state
        wall, cpu, _ = timed(run)
        where = "GPU, nvJPEG" if device_id is not None else f"CPU, {threads} threads"
        rows["dali"] = {"name": f"(p') DALI pictures ({where})", "pictures_per_cpu_s": n / cpu,
                        "wall_pictures_per_s": n / wall}
    base = rows["pil"]["pictures_per_cpu_s"]
    print(f"{n} video strips of {frames} x {size} px -> one {size} px frame each")
    print(f"{'stage':<50} {'pics/CPU-s':>11} {'ratio (p)':>9} {'wall pics/s':>12}")
    for row in rows.values():
        row["ratio_to_pil"] = row["pictures_per_cpu_s"] / base
        print(f"{row['name']:<50} {row['pictures_per_cpu_s']:>11.1f} {row['ratio_to_pil']:>9.2f} "
              f"{row['wall_pictures_per_s']:>12.1f}")
    return {"strips": n, "frames": frames, "size": size, "stages": rows}


if __name__ == "__main__":
    raise SystemExit(main())
