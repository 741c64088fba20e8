"""audio_io: decoding every libsndfile format we claim, resampling quality, FLAC + content hash, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from clapscale.shards import audio_io
from clapscale.shards.audio_io import AudioDecodeError, content_hash, encode_flac, load_audio, resample


def _tone(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / sr)[np.argmax(spec)])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize("sr_in", [44100, 96000, 22050, 16000, 8000])
def test_resample_keeps_tone_frequency_amplitude_and_length(sr_in):
    x = _tone(1000.0, sr_in, 1.0)
    y = resample(x, sr_in, 48000)
    assert y.dtype == np.float32 and y.shape == (48000,)
    core = y[2400:-2400]  # away from the zero-padded edges
    assert abs(_peak_hz(core, 48000) - 1000.0) < 1.0
    assert _rms(core) == pytest.approx(0.5 / np.sqrt(2), rel=2e-3)
    # Independent reference: scipy's polyphase resampler agrees on the band-limited signal.
    from math import gcd

    g = gcd(sr_in, 48000)
    ref = signal.resample_poly(x.astype(np.float64), 48000 // g, sr_in // g)
    np.testing.assert_allclose(core, ref[2400:-2400], atol=3e-3)


def test_resample_96k_to_48k_suppresses_aliasing():
    # 30 kHz would fold to 18 kHz without an anti-aliasing filter; 20 kHz (in band) must survive.
    y_alias = resample(_tone(30000.0, 96000, 1.0), 96000, 48000)[2400:-2400]
    y_pass = resample(_tone(20000.0, 96000, 1.0), 96000, 48000)[2400:-2400]
    assert 20 * np.log10(_rms(y_alias) / (0.5 / np.sqrt(2))) < -70
    assert _rms(y_pass) == pytest.approx(0.5 / np.sqrt(2), rel=1e-2)


def test_resample_44k1_to_48k_no_images():
    # Upsampling must not create spectral images above the source Nyquist (22.05 kHz).
    y = resample(_tone(15000.0, 44100, 1.0), 44100, 48000)[2400:-2400]
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    f = np.fft.rfftfreq(y.size, 1 / 48000)
    assert 20 * np.log10(spec[f > 22500].max() / spec.max()) < -70


@pytest.mark.parametrize(
    "fmt,subtype,sr,channels",
    [("WAV", "PCM_16", 44100, 2), ("WAV", "FLOAT", 48000, 1), ("FLAC", "PCM_24", 96000, 2), ("OGG", "VORBIS", 22050, 1),
     ("OGG", "OPUS", 48000, 2), ("MP3", "MPEG_LAYER_III", 44100, 1), ("AIFF", "PCM_16", 32000, 6)],
)
def test_load_audio_formats_downmix_and_resample(tmp_path, fmt, subtype, sr, channels):
    tone = _tone(440.0, sr, 1.5, amp=0.3)
    data = np.stack([tone] * channels, axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, data, sr, format=fmt, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - 72000) < 4000  # lossy codecs add priming / padding samples
    assert abs(_peak_hz(y[4800:-4800], 48000) - 440.0) < 2.0
    assert _rms(y[4800:-4800]) == pytest.approx(0.3 / np.sqrt(2), rel=0.05)


def test_load_audio_sources_and_max_seconds(tmp_path):
    x = _tone(440.0, 48000, 2.0)
    flac = encode_flac(x)
    for src in (flac, io.BytesIO(flac), str(tmp_path / "a.flac"), tmp_path / "a.flac"):
        if not isinstance(src, (bytes, io.BytesIO)):
            (tmp_path / "a.flac").write_bytes(flac)
        assert load_audio(src).shape == (96000,)
    assert load_audio(flac, max_seconds=0.5).shape == (24000,)
    assert load_audio(flac, target_sr=16000).shape == (32000,)


def test_flac_round_trip_preserves_content_hash():
    x = (np.random.default_rng(0).standard_normal(48000) * 0.2).astype(np.float32)
    flac = encode_flac(x)
    with sf.SoundFile(io.BytesIO(flac)) as f:
        assert (f.format, f.subtype, f.samplerate, f.channels) == ("FLAC", "PCM_16", 48000, 1)
    y = load_audio(flac)
    assert content_hash(y) == content_hash(x)
    np.testing.assert_allclose(y, x, atol=1 / 32768)
    assert content_hash(x) != content_hash(x[:-1])
    # Out-of-range samples are clipped, not wrapped around.
    assert load_audio(encode_flac(np.array([2.0, -2.0] * 100, np.float32)))[:2].tolist() == [32767 / 32768, -1.0]


def _wav_bytes(data: np.ndarray, sr: int = 48000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    "case,code",
    [("garbage", "unreadable"), ("truncated_wav", "truncated"), ("truncated_flac", "truncated"),
     ("truncated_ogg", "truncated"), ("zero_length", "zero_length"), ("nan", "non_finite"), ("inf", "non_finite"),
     ("sixteen_channels", "channel_layout")],
)
def test_load_audio_rejects_bad_input_with_reason(case, code):
    tone = _tone(440.0, 48000, 1.0)
    if case == "garbage":
        src = b"this is not audio at all" * 20
    elif case.startswith("truncated"):
        fmt = {"truncated_wav": "WAV", "truncated_flac": "FLAC", "truncated_ogg": "OGG"}[case]
        buf = io.BytesIO()
        sf.write(buf, (np.random.default_rng(1).standard_normal(48000) * 0.1), 48000, format=fmt)
        src = buf.getvalue()[: len(buf.getvalue()) // 2]
    elif case == "zero_length":
        src = _wav_bytes(np.zeros((0, 1), np.float32))
    elif case in ("nan", "inf"):
        bad = tone.copy()
        bad[100] = np.nan if case == "nan" else np.inf
        src = _wav_bytes(bad, subtype="FLOAT")
    else:
        src = _wav_bytes(np.stack([tone] * 16, axis=1))
    with pytest.raises(AudioDecodeError) as err:
        load_audio(src)
    assert err.value.code == code
    assert isinstance(err.value, ValueError) and "bytes>" in str(err.value)  # names the source


# ----------------------------------------------------------------------------- header rates and memory

_RSS_PROBE = r"""
import json, resource, sys
# A safety net for the machine, not the bound under test: a runaway allocation fails fast.
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import numpy as np
from clapscale.shards import audio_io

def high_water_kb():
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the forked parent,
    # so a child of a big pytest process would start at the parent's size and hide its own growth.
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

base = high_water_kb()
out = {}
try:
    out["result"] = ACTION
except audio_io.AudioDecodeError as e:
    out["code"] = e.code
    out["reason"] = e.reason
except ValueError as e:
    out["error"] = str(e)
out["peak_mb"] = (high_water_kb() - base) / 1024
print(json.dumps(out))
"""


def _peak_rss(action: str, **names) -> dict:
    """Run ``action`` (an expression over ``audio_io``) in a fresh interpreter; its result and the
    peak resident memory it added (MB) over the interpreter with numpy and soundfile loaded."""
    import json
    import subprocess
    import sys

    code = _RSS_PROBE.replace("ACTION", action)
    for name, value in names.items():
        code = code.replace(name, repr(value))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wav_with_header_rate(path, rate: int, seconds_at_48k: float = 1.3) -> None:
    """A real 16-bit mono WAV whose header claims ``rate`` Hz (sample rate and byte rate patched),
    as a damaged or hand-made file has."""
    import struct

    noise = np.random.default_rng(0).standard_normal(int(48000 * seconds_at_48k)) * 0.1
    data = bytearray(_wav_bytes(noise))
    assert data[:4] == b"RIFF" and data[12:16] == b"fmt "
    struct.pack_into("<II", data, 24, rate, rate * 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [1, 1000, 1000003, 5000011, 2147483647])
def test_load_audio_rejects_implausible_header_rates_in_bounded_memory(tmp_path, rate):
    # 1 Hz made a 4 KB file a "2000 s" clip; 5,000,011 Hz cost 19 GB and 2^31-1 Hz asked for 813 GiB.
    path = tmp_path / "odd.wav"
    _wav_with_header_rate(path, rate)
    with sf.SoundFile(path) as f:
        assert f.samplerate == rate  # libsndfile believes the header
    out = _peak_rss("audio_io.load_audio(PATH).size", PATH=str(path))
    assert out.get("code") == "bad_sample_rate", out
    assert f"{rate} Hz" in out["reason"] and "header" in out["reason"]
    assert out["peak_mb"] < 10


def test_plausible_rate_range_is_accepted():
    for rate in (4000, 8000, 11025, 44100, 192000, 768000):
        audio_io.check_sample_rate(rate, "x")


@pytest.mark.parametrize("rate", [44057, 96001, 192001])
def test_odd_rates_resample_in_bounded_memory_and_match_scipy(tmp_path, rate):
    # gcd(rate, 48000) is tiny, so a polyphase table would have 48,000 rows (767,999 Hz: 1.5 GB of
    # float64 while building it); a bounded table of interpolated phases is used instead.
    path = tmp_path / "odd.wav"
    x = _tone(1000.0, rate, 1.0)
    sf.write(path, x, rate, subtype="FLOAT")
    out = _peak_rss("audio_io.load_audio(PATH).size", PATH=str(path))
    assert out["result"] == 48000
    assert out["peak_mb"] < 30, out  # the 1 s result is 0.2 MB; a 4 MiB table and its build
    y = load_audio(path)
    ref = signal.resample_poly(x.astype(np.float64), 48000, rate)
    np.testing.assert_allclose(y[2400:-2400], ref[2400:-2400], atol=1e-3)
    assert abs(_peak_hz(y[2400:-2400], 48000) - 1000.0) < 1.0


@pytest.mark.parametrize("rate", [5000011, 4001, 2147483647, 1])
def test_resample_memory_is_bounded_for_any_rate(rate):
    # resample() itself takes any rate (the array path of the inference API reaches it directly).
    out = _peak_rss("audio_io.resample(np.ones(64000, np.float32), RATE, 48000).size", RATE=rate)
    if rate in (1, 2147483647):  # more than MAX_RATE_RATIO apart: no pair of audio rates
        assert "differ by more than 1024x" in out["error"], out
    else:
        assert out["result"] == -(-64000 * 48000 // rate)
    assert out["peak_mb"] < out.get("result", 0) * 4 / 2**20 + 30, out


def test_streaming_resampler_equals_one_shot():
    x = (np.random.default_rng(3).standard_normal(50000) * 0.2).astype(np.float32)
    for sr_in in (44100, 44057, 96000):
        rs = audio_io.Resampler(sr_in, 48000)
        cuts = [0, 1, 17, 4000, 4001, 33333, 50000]
        parts = [rs.push(x[a:b]) for a, b in zip(cuts, cuts[1:])] + [rs.finish()]
        np.testing.assert_array_equal(np.concatenate(parts), resample(x, sr_in, 48000))


def _long_wav(path, seconds: int, sr: int = 44100, channels: int = 2) -> None:
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16") as f:
        for _ in range(seconds // 10):
            f.write((rng.standard_normal((sr * 10, channels)) * 0.1).astype(np.float32))


def test_long_files_decode_in_bounded_memory(tmp_path):
    # 3 minutes of 44.1 kHz stereo: 32 MB of PCM_16, 63 MB as float32 stereo, 35 MB as the
    # 48 kHz mono result. Decoding it whole used to cost input + output + float64 temporaries.
    path = tmp_path / "long.wav"
    _long_wav(path, 180)
    result_mb = 180 * 48000 * 4 / 2**20
    whole = _peak_rss("audio_io.load_audio(PATH).size", PATH=str(path))
    assert whole["result"] == 180 * 48000
    assert whole["peak_mb"] < result_mb + 10, whole
    # Streaming keeps nothing but a block: independent of the length.
    streamed = _peak_rss("sum(b.size for b in audio_io.iter_audio(PATH))", PATH=str(path))
    assert streamed["result"] == 180 * 48000
    assert streamed["peak_mb"] < 10, streamed
    # Hashing and quantizing work in blocks too (no float64 or bytes copy of the whole clip).
    hashed = _peak_rss("audio_io.content_hash(np.zeros(N, np.float32))", N=180 * 48000)
    assert hashed["peak_mb"] < result_mb / 2 + 10, hashed  # the int16 PCM (np.zeros itself is not touched)


def test_streamed_flac_equals_one_shot_and_holds_one_block(tmp_path):
    x = (np.random.default_rng(5).standard_normal(48000 * 3 + 77) * 0.3).astype(np.float32)
    blocks = [x[a : a + 10000] for a in range(0, x.size, 10000)]
    enc = audio_io.encode_flac_stream(blocks)
    assert enc.flac == encode_flac(x)
    assert (enc.samples, enc.content_hash) == (x.size, content_hash(x))
    assert enc.peak == float(np.abs(x).max())
    # Decode -> resample -> encode of 3 minutes of 44.1 kHz stereo keeps only the FLAC bytes (noise
    # barely compresses: ~15 MB) and a block, not the 35 MB float result or its PCM.
    path = tmp_path / "long.wav"
    _long_wav(path, 180)
    out = _peak_rss("len(audio_io.encode_flac_stream(audio_io.iter_audio(PATH)).flac)", PATH=str(path))
    flac_mb = out["result"] / 2**20
    assert out["peak_mb"] < flac_mb + 10, out


_MAKE_SHARDS_PROBE = r"""
import json, resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a safety net for the machine
from clapscale.shards import cli

def high_water_kb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

base = high_water_kb()
rc = cli.main(ARGS)
print(json.dumps({"rc": rc, "peak_mb": (high_water_kb() - base) / 1024}))
"""


def test_make_shards_rejects_odd_headers_and_keeps_long_files_in_bounded_memory(tmp_path):
    # The path users take: make_shards over a folder holding a long recording and two damaged
    # headers (decoding in-process, --workers 0, so this process's high-water mark is the cost).
    import json
    import subprocess
    import sys
    import tarfile

    src = tmp_path / "src" / "field_recordings"
    src.mkdir(parents=True)
    _long_wav(src / "long_walk.wav", 180)
    _wav_with_header_rate(src / "one_hertz.wav", 1, seconds_at_48k=0.05)
    _wav_with_header_rate(src / "five_megahertz.wav", 5000011)
    def make_shards(*args: str) -> dict:
        code = _MAKE_SHARDS_PROBE.replace("ARGS", repr([*args, "--workers", "0"]))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    out = make_shards("--from-dir", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet")
    assert out["rc"] == 0
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted((Path(r["path"]).name, r["code"]) for r in rejects) == [
        ("five_megahertz.wav", "bad_sample_rate"), ("one_hertz.wav", "bad_sample_rate")], rejects
    (tar,) = (tmp_path / "out" / "train").glob("*.tar")
    with tarfile.open(tar) as tf:
        members = {m.name.rsplit(".", 1)[1]: m for m in tf}
        meta = json.loads(tf.extractfile(members["json"]).read())
    assert meta["duration"] == 180.0
    # 3 minutes at 48 kHz are 35 MB as float32; what is held is the compressed member (and its copy
    # in the tar buffer), not the PCM.
    flac_mb = members["flac"].size / 2**20
    assert out["peak_mb"] < 2 * flac_mb + 15, (out, flac_mb)
    # --verify reads each tar whole but decodes and hashes the clip in blocks.
    verified = make_shards("--verify", str(tmp_path / "out"))
    assert verified["rc"] == 0
    assert verified["peak_mb"] < 2 * tar.stat().st_size / 2**20 + 10, verified
