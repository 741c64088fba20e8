"""CLIP's image tower (open_clip ``VisionTransformer``): the image modality of AudioCLIP and the frozen
visual pivot of VIP-ANT.

``b32`` is CLIP ViT-B/32 (the configuration ``clapscale.models.audio.vit`` adapts to spectrograms),
initialised from the ``visual.*`` tensors of a local CLIP checkpoint; ``tiny`` is a CPU-sized ViT
(patch 8, width 64, 2 layers) for tests and the pivot miniature. Both output CLIP's pooled, projected
embedding: ``forward(image (B, 3, S, S)) -> (B, out_dim)``, images CLIP-normalised
(``clapscale.data.images``).
"""

from __future__ import annotations

import torch
from torch import nn

from clapscale.config import ConfigError
from clapscale.models.audio.vit import VIT_B32

CLIP_IMAGE_SIZE = 224  # ViT-B/32's positional embedding is for 7 x 7 patches of a 224-pixel image


def image_vit_config(size: str, image_size: int, embed_dim: int) -> dict:
    """open_clip ``VisionTransformer`` arguments for ``model.image.size`` at ``data.image_size``."""
    if size == "b32":
        return {**VIT_B32, "image_size": image_size}
    if size == "tiny":
        return dict(image_size=image_size, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
                    output_dim=embed_dim)
    raise ConfigError(f"model.image.size={size!r} is not one of 'b32', 'tiny'")


class ClipImageTower(nn.Module):
    """``forward(image (B, 3, S, S)) -> (B, out_dim)``: CLS token after ``ln_post`` and CLIP's projection."""

    def __init__(self, size: str = "b32", image_size: int = CLIP_IMAGE_SIZE, embed_dim: int = 512):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        cfg = image_vit_config(size, image_size, embed_dim)
        if image_size % cfg["patch_size"]:
            raise ConfigError(
                f"data.image_size={image_size} must be a multiple of the image ViT's patch size {cfg['patch_size']}"
            )
        self.vit = VisionTransformer(**cfg)
        self.image_size = image_size
        self.out_dim = cfg["output_dim"]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"image tower: expected images (B, 3, {self.image_size}, {self.image_size}), got {tuple(image.shape)}"
            )
        return self.vit(image)

    def load_pretrained(self, path: str) -> None:
        """Initialise from a CLIP checkpoint's image tower (``visual.*`` keys, or a bare visual dict)."""
        from clapscale.models.checkpoint import check_shapes, read_state_dict

        state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        check_shapes(self.vit, state, where=f"model.image.path={path!r} (CLIP image tower at data.image_size="
                     f"{self.image_size}; CLIP ViT-B/32 needs 224)")
        self.vit.load_state_dict(state, strict=True)
