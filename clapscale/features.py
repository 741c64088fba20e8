"""Log-mel front end in torch, run batched on the training device.

The numbers (DESIGN.md, "Audio front end"): 48 kHz mono, STFT n_fft 1024 with a periodic Hann window of
1024, hop 480, centred with reflect padding, power 2, 64 mel bins 50-14000 Hz, then
``10 * log10(max(x, 1e-10))`` with reference 1 and no top-dB clipping. A 10 s clip gives 1001 frames.
Two mel definitions: ``"slaney"`` (librosa's Slaney scale and area norm, LAION's non-fusion models) and
``"htk"`` (HTK scale, no norm, LAION's fusion models). ``tests/test_features.py`` checks both against
transformers' ``ClapFeatureExtractor``, which the released LAION checkpoints were converted with.

``AudioFrontend`` turns a loader batch into the tower input ``(B, C, 1001, n_mels)``. It is a pure
function of the batch: every random choice (crop offsets, fusion chunk positions) was drawn by the loader
and travels in the batch, so the same batch always gives the same features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clapscale.config import AudioConfig

# Power floor before the log: 10*log10(1e-10) = -100 dB, as librosa / transformers use.
AMIN = 1e-10


def hz_to_mel(hz: Tensor, scale: str) -> Tensor:
    """Frequency in Hz to mels on the ``"htk"`` or ``"slaney"`` scale (elementwise)."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    if scale == "slaney":
        # Linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
        f_sp = 200.0 / 3.0
        logstep = math.log(6.4) / 27.0
        linear = hz / f_sp
        log = 1000.0 / f_sp + torch.log(torch.clamp(hz, min=1e-10) / 1000.0) / logstep
        return torch.where(hz >= 1000.0, log, linear)
    raise ValueError(f"mel scale {scale!r} is not one of 'htk', 'slaney'")


def mel_to_hz(mel: Tensor, scale: str) -> Tensor:
    """Inverse of :func:`hz_to_mel`."""
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if scale == "slaney":
        f_sp = 200.0 / 3.0
        logstep = math.log(6.4) / 27.0
        min_log_mel = 1000.0 / f_sp
        return torch.where(
            mel >= min_log_mel, 1000.0 * torch.exp(logstep * (mel - min_log_mel)), mel * f_sp
        )
    raise ValueError(f"mel scale {scale!r} is not one of 'htk', 'slaney'")


def mel_filter_bank(
    n_freqs: int, n_mels: int, f_min: float, f_max: float, sample_rate: int, scale: str
) -> Tensor:
    """Triangular mel filters, shape ``(n_freqs, n_mels)``, float64.

    ``scale="slaney"`` also applies Slaney's area norm (each triangle scaled by 2 / its width in Hz);
    ``scale="htk"`` leaves the triangles at peak 1, as torchaudio's default and LAION's fusion models.
    """
    fft_freqs = torch.linspace(0.0, sample_rate / 2.0, n_freqs, dtype=torch.float64)
    mel_edges = torch.linspace(
        hz_to_mel(torch.tensor(f_min, dtype=torch.float64), scale).item(),
        hz_to_mel(torch.tensor(f_max, dtype=torch.float64), scale).item(),
        n_mels + 2,
        dtype=torch.float64,
    )
    hz_edges = mel_to_hz(mel_edges, scale)
    lower, centre, upper = hz_edges[:-2], hz_edges[1:-1], hz_edges[2:]
    f = fft_freqs[:, None]
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if scale == "slaney":
        fb = fb * (2.0 / (upper - lower))
    return fb


class LogMel(nn.Module):
    """Waveform ``(B, N)`` -> log-mel in dB ``(B, N // hop + 1, n_mels)``, float32.

    Computed on whatever device the module lives on (inputs are moved there).
    """

    def __init__(self, audio_cfg: AudioConfig, mel_scale: str | None = None):
        super().__init__()
        self.cfg = audio_cfg
        scale = mel_scale or audio_cfg.mel_scale
        if scale not in ("slaney", "htk"):
            raise ValueError(f"mel_scale={scale!r} is not one of 'slaney', 'htk'")
        self.mel_scale = scale
        n_freqs = audio_cfg.n_fft // 2 + 1
        fb = mel_filter_bank(
            n_freqs, audio_cfg.n_mels, audio_cfg.f_min, audio_cfg.f_max, audio_cfg.sample_rate, scale
        )
        self.register_buffer("mel_fb", fb.float(), persistent=False)
        # Periodic Hann (the STFT convention), not the symmetric one used for FIR design.
        window = torch.hann_window(audio_cfg.win_length, periodic=True, dtype=torch.float32)
        self.register_buffer("window", window, persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"LogMel expects a waveform batch (B, N), got shape {tuple(waveform.shape)}")
        x = waveform.to(device=self.window.device, dtype=torch.float32)
        spec = torch.stft(
            x,
            n_fft=self.cfg.n_fft,
            hop_length=self.cfg.hop_length,
            win_length=self.cfg.win_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()  # (B, F, T)
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb)  # (B, T, M)
        return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))


def fuse_mel(mel: Tensor, starts: Tensor | list[int], chunk_frames: int) -> Tensor:
    """One long clip's full mel ``(T, M)`` -> fusion input ``(4, chunk_frames, M)``.

    Channel 0 is the global view: the whole mel resized to ``chunk_frames`` frames (bilinear, as
    LAION-CLAP and transformers do); channels 1-3 are the chunks starting at ``starts`` (frame
    indices into ``mel``, from the front, middle and back thirds; drawn by the loader).
    """
    t, m = mel.shape
    if t <= chunk_frames:
        raise ValueError(f"fuse_mel needs more than {chunk_frames} frames, got {t}")
    glob = F.interpolate(mel[None, None], size=(chunk_frames, m), mode="bilinear", align_corners=False)[0, 0]
    chunks = []
    for s in (int(v) for v in starts):
        if not 0 <= s <= t - chunk_frames:
            raise ValueError(f"fusion chunk start {s} outside [0, {t - chunk_frames}] for a mel of {t} frames")
        chunks.append(mel[s : s + chunk_frames])
    return torch.stack([glob, *chunks], dim=0)


class AudioFrontend(nn.Module):
    """Loader batch -> ``(mel (B, C, 1001, n_mels), is_longer (B,) bool)`` on the module's device.

    C = 4 when ``audio_cfg.length_policy == "fusion"`` (global view + 3 local chunks), else 1.

    Input keys (see ``clapscale.data``):
      - ``waveform`` float32 ``(B, N)``: for non-fusion policies N == clip_samples (the loader already
        cropped / padded); for fusion, short clips are repeat-padded to clip_samples and long clips are
        zero-padded to the longest in the batch, with ``lengths`` int64 ``(B,)`` the real samples.
      - or ``mel`` float32 ``(B, T, n_mels)`` already in dB (DALI computed it) with ``mel_frames``
        int64 ``(B,)`` the valid frames of each row; the front end then only shapes it.
      - ``is_longer`` bool ``(B,)``; ``fusion_starts`` int64 ``(B, 3)`` (fusion only): chunk starts
        in frames into the clip's full mel.

    Memory for long clips is bounded because the loader never decodes past ``audio_cfg.max_seconds``.
    """

    def __init__(self, audio_cfg: AudioConfig):
        super().__init__()
        self.cfg = audio_cfg
        self.fusion = audio_cfg.length_policy == "fusion"
        self.logmel = LogMel(audio_cfg)
        self.n_frames = audio_cfg.n_frames

    @property
    def channels(self) -> int:
        return 4 if self.fusion else 1

    def forward(self, batch: dict) -> tuple[Tensor, Tensor]:
        device = self.logmel.window.device
        is_longer = batch["is_longer"].to(device=device, dtype=torch.bool)
        if "mel" in batch:
            mel = batch["mel"].to(device=device, dtype=torch.float32)
            frames = batch.get("mel_frames")
            frames = (
                torch.full((mel.shape[0],), mel.shape[1], dtype=torch.long)
                if frames is None
                else frames.cpu().long()
            )
            full = [mel[i, : int(frames[i])] for i in range(mel.shape[0])]
        else:
            wave = batch["waveform"]
            if not self.fusion:
                if wave.shape[1] != self.cfg.clip_samples:
                    raise ValueError(
                        f"waveform batch has {wave.shape[1]} samples per row; the "
                        f"{self.cfg.length_policy!r} policy expects exactly clip_samples="
                        f"{self.cfg.clip_samples} (the loader crops / pads)"
                    )
                return self.logmel(wave).unsqueeze(1), is_longer
            full = self._fusion_mels(wave, batch["lengths"].cpu().long(), is_longer.cpu())
        if not self.fusion:
            out = torch.stack([self._exact(m) for m in full], dim=0).unsqueeze(1)
            return out, is_longer
        starts = batch["fusion_starts"].cpu().long()
        out = []
        for i, m in enumerate(full):
            if bool(is_longer[i]):
                out.append(fuse_mel(m, starts[i].tolist(), self.n_frames))
            else:
                out.append(self._exact(m).unsqueeze(0).expand(4, -1, -1))
        return torch.stack(out, dim=0), is_longer

    def _fusion_mels(self, wave: Tensor, lengths: Tensor, is_longer: Tensor) -> list[Tensor]:
        """Full mel per row: short rows batched over their first clip_samples, long rows one by one
        over their real length (reflect padding at the clip's own end, as a single-clip STFT has)."""
        n = self.cfg.clip_samples
        out: list[Tensor | None] = [None] * wave.shape[0]
        short = [i for i in range(wave.shape[0]) if not bool(is_longer[i])]
        if short:
            if wave.shape[1] < n:
                raise ValueError(f"waveform batch has {wave.shape[1]} samples per row, fewer than clip_samples={n}")
            mels = self.logmel(wave[short, :n])
            for j, i in enumerate(short):
                out[i] = mels[j]
        for i in range(wave.shape[0]):
            if out[i] is None:
                out[i] = self.logmel(wave[i : i + 1, : int(lengths[i])])[0]
        return out  # type: ignore[return-value]

    def _exact(self, mel: Tensor) -> Tensor:
        if mel.shape[0] != self.n_frames:
            raise ValueError(f"expected a {self.n_frames}-frame mel for a clip, got {mel.shape[0]} frames")
        return mel


def tower_input(frontend: AudioFrontend, batch: dict, input_kind: str) -> tuple[Tensor, Tensor]:
    """What an audio tower reads from a loader batch: ``(mel (B, C, T, M), is_longer)`` from the front
    end, or for a waveform tower (``input_kind == "waveform"``, ESResNeXt) the clips themselves as
    ``(B, 1, N)`` float32 after the same length checks. Waveform towers need the loader's waveforms
    (the DALI loader hands over mels only)."""
    mel, is_longer = frontend(batch)
    if input_kind != "waveform":
        return mel, is_longer
    if "waveform" not in batch:
        raise ValueError("a waveform audio tower (ESResNeXt) needs the clips' samples; this batch holds mels "
                         "(data.backend=dali): use data.backend=wds")
    return batch["waveform"].to(device=mel.device, dtype=torch.float32).unsqueeze(1), is_longer

