"""ESResNeXt (Guzhov et al. 2021), AudioCLIP's audio head: a ResNeXt-50 (32x4d) on a *trainable*
time-frequency transform built from complex frequency B-spline (fbsp) wavelets.

As in papers/audioclip.txt sec. 3.2 and the ESResNeXt paper it cites:
- Front end (``FbspFilterbank``): the waveform is cut into windowed frames; each frame is projected
  onto ``n_fft // 2 + 1`` complex fbsp wavelets ``psi(t) = sqrt(fb) * sinc(fb * t / m)^m * exp(-i fc t)``
  (t in [-pi, pi] over the frame). With ``m = 0, fb = 1, fc = k`` (the init) row k is the k-th DFT
  kernel, so training starts from an ordinary STFT and learns bandwidths, orders and centre
  frequencies. Power in dB follows.
- The ImageNet ResNeXt-50 takes 3 input channels: the spectrogram's frequency axis is split into three
  equal bands stacked as the three "colours" (bins left over at the top are dropped), so
  torchvision's ImageNet weights load unchanged.
- Multi-channel audio: each channel goes through the shared backbone and the pooled features are
  summed (the model's implicit multi-channel processing).
- Attention (``apply_attention``, on in AudioCLIP): after each ResNeXt stage, and after the global
  pooling, the stage's input is max-pooled to the output's size and turned into a sigmoid gate by a
  depthwise + pointwise conv and BatchNorm; the output is multiplied by the gate.

Numbers: AudioCLIP runs at 44.1 kHz with n_fft 2048, window 1654 (Blackman-Harris) and hop 561; at our
48 kHz the same durations are 1800 and 611 samples. The tower without a classifier has ~30.0M
parameters (ResNeXt-50 body 23.0M + attention 7.0M + fbsp 3k), the paper's "~30 M"; CLAP's projection
MLP comes on top.

Unlike the mel towers this one reads raw audio: ``input_kind = "waveform"`` and
``forward(waveform (B, C, N), is_longer) -> (B, 2048)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clapscale.models.audio.base import AudioTower

# AudioCLIP's ESResNeXtFBSP settings at 44.1 kHz, with window and hop rescaled to 48 kHz.
N_FFT = 2048
WIN_SECONDS = 1654 / 44100
HOP_SECONDS = 561 / 44100
N_BANDS = 3  # frequency bands stacked as the ImageNet model's RGB channels
LOG10_EPS = 1e-18


def blackman_harris(n: int) -> torch.Tensor:
    """Periodic 4-term Blackman-Harris window of ``n`` samples (scipy's ``get_window(..., fftbins=True)``)."""
    x = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    w = 0.35875 - 0.48829 * torch.cos(x) + 0.14128 * torch.cos(2 * x) - 0.01168 * torch.cos(3 * x)
    return w.float()


class FbspFilterbank(nn.Module):
    """Trainable complex frequency B-spline filterbank applied to frames.

    ``forward(frames (..., n_fft)) -> power (..., n_filters)`` with ``n_filters = n_fft // 2 + 1``.
    Parameters per filter: order ``m`` (init 0), bandwidth ``fb`` (init 1), centre frequency ``fc``
    (init k, in cycles per frame). ``weights()`` gives the complex kernel ``(n_filters, n_fft)``.

    ESResNeXt rescales these parameters' gradients by their max-norm (the values are O(1) to O(1000),
    so a common learning rate would otherwise barely move m and fb or throw fc around); the hooks
    below do that. ``normalized`` divides the kernel by sqrt(n_fft), as AudioCLIP configures it.
    """

    def __init__(self, n_fft: int = N_FFT, normalized: bool = True):
        super().__init__()
        self.n_fft = n_fft
        self.normalized = normalized
        n = n_fft // 2 + 1
        self.m = nn.Parameter(torch.zeros(n))
        self.fb = nn.Parameter(torch.ones(n))
        self.fc = nn.Parameter(torch.arange(n, dtype=torch.float32))
        for p in (self.m, self.fb, self.fc):
            p.register_hook(_max_norm_gradient)
        # Offset so that t never hits 0 exactly (sinc's removable singularity, and log|sinc| in the power).
        t = math.pi * torch.linspace(-1.0, 1.0, n_fft) + 1e-8
        self.register_buffer("t", t, persistent=False)

    def weights(self) -> torch.Tensor:
        """Complex kernel ``(n_filters, n_fft)``: ``sqrt(fb) * sinc(fb t / m)^m * exp(-i fc t)``."""
        m, fb, fc = self.m[:, None], self.fb[:, None], self.fc[:, None]
        t = self.t[None, :]
        x = fb * t / (m + 1e-8)
        sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x)
        # Real base, real exponent: |s|^m * exp(i m arg s), arg s in {0, pi}. sinc^0 == 1 exactly.
        magnitude = sinc.abs().clamp_min(1e-30).pow(m)
        phase = m * torch.where(sinc < 0, torch.full_like(sinc, math.pi), torch.zeros_like(sinc)) - fc * t
        kernel = fb.sqrt() * magnitude * torch.polar(torch.ones_like(phase), phase)
        if self.normalized:
            kernel = kernel / math.sqrt(self.n_fft)
        return kernel

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        x = frames.float()
        re = x @ w.real.T
        im = x @ w.imag.T
        return re.square() + im.square()


def _max_norm_gradient(grad: torch.Tensor) -> torch.Tensor:
    return grad / (grad.abs().max() + 1e-8)


class GateAttention(nn.Module):
    """ESResNeXt's attention gate: ``sigmoid(BN(pointwise(depthwise(maxpool_to(x, size)))))``."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int]):
        super().__init__()
        pad = (kernel[0] // 2, kernel[1] // 2)
        self.conv_depth = nn.Conv2d(cin, cin, kernel, padding=pad, groups=cin)
        self.conv_point = nn.Conv2d(cin, cout, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.adaptive_max_pool2d(x, size)
        return torch.sigmoid(self.bn(self.conv_point(self.conv_depth(x))))


# (in, out, kernel (freq x time)) of the gates after layer1..layer4 and after the global pooling.
_GATES = ((64, 256, (3, 1)), (256, 512, (1, 5)), (512, 1024, (3, 1)), (1024, 2048, (1, 5)), (2048, 2048, (3, 5)))


class ESResNeXt(AudioTower):
    """``forward(waveform (B, C, N), is_longer) -> (B, 2048)``; C audio channels share the backbone."""

    input_kind = "waveform"
    supports_fusion = False

    def __init__(self, sample_rate: int = 48000, apply_attention: bool = True, n_fft: int = N_FFT):
        super().__init__()
        from torchvision.models import resnext50_32x4d

        self.win_length = int(round(WIN_SECONDS * sample_rate))
        self.hop_length = int(round(HOP_SECONDS * sample_rate))
        if self.win_length > n_fft:
            raise ValueError(f"ESResNeXt: window {self.win_length} samples exceeds n_fft={n_fft} at {sample_rate} Hz")
        self.n_fft = n_fft
        self.register_buffer("window", blackman_harris(self.win_length), persistent=False)
        self.fbsp = FbspFilterbank(n_fft)
        backbone = resnext50_32x4d(weights=None)
        backbone.fc = nn.Identity()  # CLAP's projection MLP replaces the classifier
        self.backbone = backbone
        self.apply_attention = apply_attention
        if apply_attention:
            self.attention = nn.ModuleList(GateAttention(cin, cout, k) for cin, cout, k in _GATES)
        self.out_dim = 2048

    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(B, C, N)`` -> dB power ``(B, C, 3, F_band, T)``; ``T = (N - win) // hop + 1`` frames."""
        if waveform.dim() != 3:
            raise ValueError(f"ESResNeXt expects a waveform batch (B, C, N), got {tuple(waveform.shape)}")
        b, c, n = waveform.shape
        if n < self.win_length:
            raise ValueError(f"ESResNeXt needs at least {self.win_length} samples per clip, got {n}")
        frames = waveform.float().reshape(b * c, n).unfold(-1, self.win_length, self.hop_length) * self.window
        pad = self.n_fft - self.win_length
        frames = F.pad(frames, (pad // 2, pad - pad // 2))
        power = self.fbsp(frames).transpose(1, 2)  # (B*C, F, T)
        band = power.shape[1] // N_BANDS
        power = power[:, : band * N_BANDS].reshape(b, c, N_BANDS, band, power.shape[-1])
        return 10.0 * torch.log10(power.clamp_min(LOG10_EPS))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """One audio channel's bands ``(B, 3, F_band, T)`` -> pooled ``(B, 2048)``."""
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            y = layer(x)
            x = y * self.attention[i](x, y.shape[-2:]) if self.apply_attention else y
        pooled = net.avgpool(x)
        if self.apply_attention:
            pooled = pooled * self.attention[4](x, pooled.shape[-2:])
        return torch.flatten(pooled, 1)

    def forward(self, waveform: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spectrogram(waveform)
        return torch.stack([self._features(spec[:, ch]) for ch in range(spec.shape[1])], dim=0).sum(dim=0)

    def load_pretrained(self, path: str) -> None:
        """Initialise the backbone from a local torchvision ResNeXt-50 (32x4d) ImageNet state dict
        (``resnext50_32x4d-*.pth``); its ``fc`` is dropped. As ESResNeXt does, the attention gates'
        BatchNorm is then reset to weight = bias = 1, so each gate starts mostly open (sigmoid(1)) on
        top of the ImageNet features instead of halving them at random."""
        from clapscale.models.checkpoint import check_shapes, read_state_dict

        state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        # Older torchvision files predate BatchNorm's step counter; it carries no weights.
        for key, value in self.backbone.state_dict().items():
            if key.endswith("num_batches_tracked"):
                state.setdefault(key, torch.zeros_like(value))
        where = f"model.audio.pretrained={path!r} (torchvision ResNeXt-50 32x4d state dict)"
        check_shapes(self.backbone, state, where=where)
        self.backbone.load_state_dict(state, strict=True)
        if self.apply_attention:
            for gate in self.attention:
                nn.init.ones_(gate.bn.weight)
                nn.init.ones_(gate.bn.bias)


def build_esresnext(
    size: str = "50", fusion: str = "none", n_mels: int = 64, n_frames: int = 1001, sample_rate: int = 48000
) -> ESResNeXt:
    """ESResNeXt-50 (32x4d) with fbsp front end and attention, as in AudioCLIP. ``n_mels`` / ``n_frames``
    are unused: the tower makes its own spectrogram from the waveform."""
    return ESResNeXt(sample_rate=sample_rate)
