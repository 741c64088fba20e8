"""ESResNeXt (AudioCLIP's audio head): parameter count against the paper and torchvision, forward
shapes, the fbsp front end against a closed form, multi-channel input, and ImageNet initialisation."""

import math

import numpy as np
import pytest
import torch

from clapscale.config import AudioConfig, ModelConfig
from clapscale.models.audio.esresnext import ESResNeXt, FbspFilterbank, blackman_harris
from clapscale.models.checkpoint import CheckpointMismatchError
from clapscale.models.factory import build_audio_tower

SR = 48000
N = 12000  # 0.25 s: 17 frames at hop 611, enough for every stage and fast on CPU


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return ESResNeXt(sample_rate=SR).eval()


def _attention_params():
    """Closed form: per gate a depthwise conv (cin * kh * kw + cin), a pointwise conv (cin * cout + cout)
    and a BatchNorm (2 * cout)."""
    gates = ((64, 256, 3 * 1), (256, 512, 1 * 5), (512, 1024, 3 * 1), (1024, 2048, 1 * 5), (2048, 2048, 3 * 5))
    return sum(cin * k + cin + cin * cout + cout + 2 * cout for cin, cout, k in gates)


def test_parameter_count_matches_paper_and_torchvision(tower):
    from torchvision.models import resnext50_32x4d

    ref = resnext50_32x4d(weights=None)
    body = sum(p.numel() for p in ref.parameters()) - ref.fc.weight.numel() - ref.fc.bias.numel()
    fbsp = 3 * (2048 // 2 + 1)
    total = sum(p.numel() for p in tower.parameters())
    assert total == body + _attention_params() + fbsp
    # AudioCLIP sec. 3.2: "moderate number of parameters to learn (~30 M)".
    assert abs(total - 30e6) / 30e6 < 0.01, total


def test_forward_shapes_multichannel_and_channel_sum(tower):
    g = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(2, 2, N, generator=g)
    frames = (N - tower.win_length) // tower.hop_length + 1
    assert (tower.win_length, tower.hop_length) == (1800, 611)  # AudioCLIP's 1654 / 561 at 44.1 kHz
    with torch.no_grad():
        spec = tower.spectrogram(wave)
        out = tower(wave)
        per_channel = [tower(wave[:, c : c + 1]) for c in range(2)]
    assert spec.shape == (2, 2, 3, 1025 // 3, frames)
    assert out.shape == (2, tower.out_dim) == (2, 2048)
    # Channels share the backbone and their pooled features add up.
    torch.testing.assert_close(out, per_channel[0] + per_channel[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(B, C, N\)"):
        tower(wave[:, 0])
    with pytest.raises(ValueError, match="at least 1800 samples"):
        tower(wave[..., :1000])


def test_fbsp_at_init_is_a_fourier_filterbank_closed_form():
    """m = 0, fb = 1, fc = k: filter k is exp(-i k t), t = pi * linspace(-1, 1, n); its power on a frame x
    is |sum_j x_j exp(-2 pi i k j / (n - 1))|^2 / n (normalised kernel), computed here in numpy."""
    n = 256
    bank = FbspFilterbank(n_fft=n)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(2))
    ours = bank(x).detach().numpy()
    j = np.arange(n)
    k = np.arange(n // 2 + 1)[:, None]
    ref = np.abs(x.numpy().astype(np.float64) @ np.exp(-2j * np.pi * k * j / (n - 1)).T) ** 2 / n
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-3)


def test_fbsp_front_end_puts_a_tone_in_its_band(tower):
    """A 3 kHz sine peaks at filter round(3000 * n_fft / sr * (n_fft - 1) / n_fft) +- 1, in band 0."""
    t = torch.arange(N) / SR
    wave = torch.sin(2 * math.pi * 3000.0 * t)[None, None]
    with torch.no_grad():
        spec = tower.spectrogram(wave)[0, 0]  # (3, 341, T)
    flat = spec.reshape(-1, spec.shape[-1]).mean(dim=-1)  # bands in order: filter index
    expected = 3000.0 * (2048 - 1) / SR
    assert abs(int(flat.argmax()) - expected) <= 1.0


def test_fbsp_is_trainable_with_max_normalised_gradients():
    torch.manual_seed(0)
    bank = FbspFilterbank(n_fft=64)
    with torch.no_grad():
        bank.m.fill_(0.5)  # away from m = 0, where d/dm of |sinc|^m is log|sinc|
    x = torch.randn(4, 64)
    bank(x).sum().backward()
    for name in ("m", "fb", "fc"):
        grad = getattr(bank, name).grad
        assert grad is not None and torch.isfinite(grad).all()
        assert grad.abs().max().item() == pytest.approx(1.0, rel=1e-5), name


def test_blackman_harris_matches_scipy():
    from scipy.signal import get_window

    np.testing.assert_allclose(blackman_harris(1800).numpy(), get_window("blackmanharris", 1800, fftbins=True),
                               atol=1e-6)


def test_init_from_local_torchvision_resnext_file(tmp_path):
    from torchvision.models import resnet50, resnext50_32x4d

    torch.manual_seed(3)
    imagenet = resnext50_32x4d(weights=None)
    path = tmp_path / "resnext50_32x4d.pth"
    torch.save(imagenet.state_dict(), path)
    model_cfg = ModelConfig()
    model_cfg.audio.name, model_cfg.audio.size, model_cfg.audio.pretrained = "esresnext", "50", str(path)
    tower = build_audio_tower(model_cfg, AudioConfig())
    assert isinstance(tower, ESResNeXt) and tower.input_kind == "waveform"
    for name, value in imagenet.state_dict().items():
        if not name.startswith("fc."):
            torch.testing.assert_close(tower.backbone.state_dict()[name], value, msg=name)
    for gate in tower.attention:
        assert torch.all(gate.bn.weight == 1) and torch.all(gate.bn.bias == 1)

    torch.save(resnet50(weights=None).state_dict(), path)  # a ResNet-50, not the ResNeXt
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        tower.load_pretrained(str(path))
