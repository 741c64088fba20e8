"""Audio + image + text in one embedding space: AudioCLIP (tri-modal) and VIP-ANT (bi-bi-modal).

``TriModalClap`` is a ``ClapModel`` with a third tower, so everything that embeds audio and text
(evaluation, zero-shot, inference) works unchanged on it, through the pivot when the audio tower was
trained only against images. With ``pivot`` the text and image embeddings are their towers' own
outputs (CLIP's shared space, no projection MLP), so a frozen CLIP keeps its image-text alignment and
the audio is trained into that space (papers/vip-ant-visually-pivoted-audio-text.txt sec. 3).

One learnable log-temperature per modality pair (AudioCLIP learns one per head pair): ``logit_scale``
(audio-text, ``ClapModel``'s), ``log_scale_audio_image`` and ``log_scale_image_text``, each clamped in
``scales()`` as ``ClapModel.scale()`` is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clapscale.models.clap import ClapModel, ProjectionMLP


class TriModalClap(ClapModel):
    def __init__(
        self,
        audio_tower: nn.Module,
        text_tower: nn.Module,
        image_tower: nn.Module,
        embed_dim: int = 512,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        freeze_audio: bool = False,
        freeze_text: bool = False,
        freeze_image: bool = False,
        pivot: bool = False,
    ):
        super().__init__(audio_tower, text_tower, embed_dim, init_logit_scale, max_logit_scale,
                         freeze_audio, freeze_text)
        self.image_tower = image_tower
        self.pivot = pivot
        if pivot:
            for name, tower in (("text", text_tower), ("image", image_tower)):
                if tower.out_dim != embed_dim:
                    from clapscale.config import ConfigError

                    raise ConfigError(
                        f"model.pivot=true uses the {name} tower's own {tower.out_dim}-d embedding as the shared "
                        f"space, but model.embed_dim={embed_dim}: set model.embed_dim={tower.out_dim}"
                    )
            self.text_projection = nn.Identity()
            self.image_projection = nn.Identity()
        else:
            self.image_projection = ProjectionMLP(image_tower.out_dim, embed_dim)
        self.log_scale_audio_image = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.log_scale_image_text = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.frozen["image_tower"] = freeze_image
        if freeze_image:
            image_tower.requires_grad_(False)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, 3, S, S)`` CLIP-normalised -> ``(B, D)`` unit rows."""
        return F.normalize(self.image_projection(self.image_tower(image)), dim=-1)

    def scales(self) -> dict[str, torch.Tensor]:
        """Clamped temperature of each pair, keyed by ``clapscale.losses.pair_name``."""
        return {"audio-text": self.scale(), "audio-image": self.scale(self.log_scale_audio_image),
                "image-text": self.scale(self.log_scale_image_text)}

    def forward(
        self,
        mel: torch.Tensor,
        is_longer: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor | None = None,
    ):
        """Without ``image``: ``ClapModel``'s ``(audio, text, scale)``. With it: ``({"audio", "text",
        "image"}: (B, D) unit rows, {pair: scale})`` for ``clapscale.losses.PairwiseInfoNCE``."""
        if image is None:
            return super().forward(mel, is_longer, input_ids, attention_mask)
        feats = {"audio": self.encode_audio(mel, is_longer), "text": self.encode_text(input_ids, attention_mask),
                 "image": self.encode_image(image)}
        return feats, self.scales()
