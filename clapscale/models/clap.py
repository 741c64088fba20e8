"""The CLAP model: audio tower + text tower, two 2-layer MLP projections, one learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clapscale.models.audio.base import AudioTower
from clapscale.models.text import TextTower


class ProjectionMLP(nn.Module):
    """``Linear(d, D) -> ReLU -> Linear(D, D)``; names match transformers' ``ClapProjectionLayer``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class ClapModel(nn.Module):
    """Contrastive language-audio model.

    ``logit_scale`` is the learnable *log* temperature (init ``ln(init_logit_scale)``); the scale used in
    the loss is ``exp(min(logit_scale, ln(max_logit_scale)))`` computed in ``forward``. Clamping here
    rather than editing the parameter after the optimizer step keeps ZeRO's fp32 master copy consistent.
    """

    def __init__(
        self,
        audio_tower: AudioTower,
        text_tower: TextTower,
        embed_dim: int = 512,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        freeze_audio: bool = False,
        freeze_text: bool = False,
    ):
        super().__init__()
        self.audio_tower = audio_tower
        self.text_tower = text_tower
        self.audio_projection = ProjectionMLP(audio_tower.out_dim, embed_dim)
        self.text_projection = ProjectionMLP(text_tower.out_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        self.embed_dim = embed_dim
        self.frozen = {"audio_tower": freeze_audio, "text_tower": freeze_text}
        for name, frozen in self.frozen.items():
            if frozen:
                getattr(self, name).requires_grad_(False)

    def train(self, mode: bool = True) -> "ClapModel":
        super().train(mode)
        # A frozen tower stays in eval mode: its BatchNorm statistics and dropout must not change either.
        for name, frozen in self.frozen.items():
            if frozen:
                getattr(self, name).eval()
        return self

    def encode_audio(self, mel: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """``mel (B, C, T, F)`` (C = 4 for fusion batches, else 1), ``is_longer (B,)`` -> ``(B, D)`` unit rows."""
        if is_longer is None:
            is_longer = torch.zeros(mel.shape[0], dtype=torch.bool, device=mel.device)
        return F.normalize(self.audio_projection(self.audio_tower(mel, is_longer)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids, attention_mask (B, L)`` -> ``(B, D)`` unit rows."""
        return F.normalize(self.text_projection(self.text_tower(input_ids, attention_mask)), dim=-1)

    def scale(self, log_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The clamped temperature ``exp(min(log_scale, ln(max_logit_scale)))`` (a 0-d tensor) of
        ``log_scale``, by default the audio-text ``logit_scale``."""
        return (self.logit_scale if log_scale is None else log_scale).clamp(max=self.max_log_scale).exp()

    def forward(
        self,
        mel: torch.Tensor,
        is_longer: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> ``(audio_emb (B, D), text_emb (B, D), logit_scale ())``, embeddings L2-normalised."""
        return self.encode_audio(mel, is_longer), self.encode_text(input_ids, attention_mask), self.scale()
