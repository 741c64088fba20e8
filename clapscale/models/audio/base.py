"""The one audio-tower interface every tower (HTSAT, CNN, ViT) implements."""

from __future__ import annotations

import torch
from torch import nn


class AudioTower(nn.Module):
    """Log-mel batch + ``is_longer`` flags in, pooled embedding out.

    Subclasses set ``out_dim`` (width of the pooled embedding) and ``supports_fusion`` and implement
    ``forward(mel (B, C, T, F), is_longer (B,) bool) -> (B, out_dim)``. ``C`` is 1, or 4 for fusion
    batches (channel 0 = global view, 1..3 = local chunks). Towers without fusion read channel 0 only.
    """

    out_dim: int
    supports_fusion: bool = False
    # "mel": forward takes the log-mel batch above; "waveform": raw audio (B, C, N) instead
    # (towers with their own trainable time-frequency front end, e.g. ESResNeXt).
    input_kind: str = "mel"

    def forward(self, mel: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward to save memory (large towers)."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def load_pretrained(self, path: str) -> None:
        """Initialise from the checkpoint at ``model.audio.pretrained``."""
        raise NotImplementedError(f"{type(self).__name__} cannot load model.audio.pretrained={path!r}")


def check_mel(mel: torch.Tensor, n_mels: int, where: str) -> None:
    """Raise a clear error unless ``mel`` is ``(B, 1 | 4, T, n_mels)``."""
    if mel.dim() != 4 or mel.shape[1] not in (1, 4) or mel.shape[-1] != n_mels:
        raise ValueError(
            f"{where}: expected a log-mel batch (B, 1 or 4, T, {n_mels}), got {tuple(mel.shape)}"
        )
