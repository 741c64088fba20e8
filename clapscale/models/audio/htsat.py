"""HTSAT audio tower (tiny / base / large) wrapping transformers' ``ClapAudioModel``.

The weights live in a real ``ClapAudioModel`` (``self.model``), so released LAION / Hugging Face HTSAT
checkpoints load by name and an export is a plain prefix rename. The forward pass is ours, built
from its submodules, to avoid three pitfalls of ``ClapAudioEncoder.forward`` (DESIGN.md):

- its fusion block crashes in training when exactly one sample is longer (BatchNorm on one value);
  our fusion modules (``clapscale.models.fusion``, same parameter names) use running statistics then;
- it writes the fused rows into the batch in place and skips the fusion modules when no sample is
  longer (their parameters then get no gradient: data-parallel "unused parameters"); we fuse out of
  place and always run the branch (on an empty batch if need be);
- it returns output objects; we return the pooled ``(B, hidden)`` tensor.

Pooling: the mean over all final tokens after the last LayerNorm, which is what transformers'
grouped-2-D-then-``AdaptiveAvgPool1d`` computes (and LAION's ``fine_grained_embedding`` mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

from clapscale.config import ConfigError
from clapscale.models.audio.base import AudioTower, check_mel
from clapscale.models.fusion import build_fusion, fuse_longer, local_chunks, longer_index

# LAION-CLAP's create_htsat_model sizes (window 8, patch 4, spec 256 in all three).
HTSAT_SIZES: dict[str, dict] = {
    "tiny": dict(patch_embeds_hidden_size=96, depths=[2, 2, 6, 2], num_attention_heads=[4, 8, 16, 32]),
    "base": dict(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], num_attention_heads=[4, 8, 16, 32]),
    "large": dict(patch_embeds_hidden_size=256, depths=[2, 2, 12, 2], num_attention_heads=[4, 8, 16, 32]),
}
SPEC_SIZE = 256


def htsat_config(size: str, fusion: str, n_mels: int, n_frames: int):
    """The ``ClapAudioConfig`` of an HTSAT size; ``ConfigError`` if the mel does not fit its image."""
    from transformers import ClapAudioConfig

    if n_mels <= 0 or SPEC_SIZE % n_mels or n_mels > SPEC_SIZE:
        raise ConfigError(
            f"audio.n_mels={n_mels} does not fit HTSAT: its {SPEC_SIZE}x{SPEC_SIZE} spectrogram image "
            f"folds time into freq_ratio = {SPEC_SIZE} / n_mels bands, so n_mels must divide {SPEC_SIZE} "
            "(64 is the standard; 32, 128 also divide)"
        )
    ratio = SPEC_SIZE // n_mels
    if n_frames > SPEC_SIZE * ratio:
        raise ConfigError(
            f"audio: {n_frames} mel frames (clip_seconds / hop_length) exceed HTSAT's "
            f"{SPEC_SIZE * ratio} frames for audio.n_mels={n_mels}; shorten audio.clip_seconds, raise "
            "audio.hop_length, or use fewer mel bins"
        )
    dims = HTSAT_SIZES[size]
    num_features = dims["patch_embeds_hidden_size"] * 2 ** (len(dims["depths"]) - 1)
    return ClapAudioConfig(
        **dims,
        num_mel_bins=n_mels,
        spec_size=SPEC_SIZE,
        window_size=8,
        patch_size=4,
        patch_stride=[4, 4],
        hidden_size=num_features,
        enable_fusion=fusion != "none",
        # LAION's released fused models are "aff_2d"; DAF / iAFF swap in their own module below.
        fusion_type="aff_2d" if fusion != "none" else None,
        # LAION trained HTSAT with drop_path 0.1 and no other dropout.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.1,
    )


class HTSAT(AudioTower):
    """``forward(mel (B, 1|4, T, n_mels), is_longer (B,)) -> (B, hidden)``; hidden = 768 / 1024 / 2048."""

    supports_fusion = True

    def __init__(self, size: str = "tiny", fusion: str = "none", n_mels: int = 64, n_frames: int = 1001, config=None):
        super().__init__()
        from transformers import ClapAudioModel

        config = config if config is not None else htsat_config(size, fusion, n_mels, n_frames)
        self.model = ClapAudioModel(config)
        self.fusion = fusion
        self.n_mels = config.num_mel_bins
        self.out_dim = int(config.hidden_size)
        self.grad_checkpointing = False
        pe = self.model.audio_encoder.patch_embed
        if fusion != "none":
            ours = build_fusion(fusion, config.patch_embeds_hidden_size, config.aff_block_r)
            if fusion == "aff":
                ours.load_state_dict(pe.fusion_model.state_dict())
            pe.fusion_model = ours
        if self.model.audio_encoder.num_features != self.out_dim:
            raise ConfigError(
                f"HTSAT hidden_size={self.out_dim} differs from its final width "
                f"{self.model.audio_encoder.num_features}"
            )

    @property
    def config(self):
        return self.model.config

    def _patch_embed(self, img: torch.Tensor, mel: torch.Tensor, is_longer: torch.Tensor | None) -> torch.Tensor:
        pe = self.model.audio_encoder.patch_embed
        size = pe.img_size
        if tuple(img.shape[-2:]) != tuple(size):
            raise ValueError(f"HTSAT expects a {size} spectrogram image, got {tuple(img.shape[-2:])}")
        glob = pe.proj(img[:, :1])  # (B, C, H, W)
        if self.fusion != "none":
            idx = longer_index(mel, is_longer)
            local = local_chunks(img, idx)  # (k, 3, S, S)
            k, n, h, w = local.shape
            loc = pe.mel_conv2d(local.reshape(k * n, 1, h, w))
            _, c, lh, lw = loc.shape
            # The three chunks side by side along the width (time) axis, zero-padded to the global width.
            loc = loc.reshape(k, n, c, lh, lw).permute(0, 2, 3, 1, 4).flatten(3)
            loc = F.pad(loc, (0, glob.shape[-1] - loc.shape[-1]))
            glob = fuse_longer(pe.fusion_model, glob, loc, idx)
        tokens = glob.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return pe.norm(tokens)

    def forward(self, mel: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        check_mel(mel, self.n_mels, "HTSAT")
        enc = self.model.audio_encoder
        # batch_norm normalises each mel bin (bins are its channels), all fusion views alike.
        x = enc.batch_norm(mel.transpose(1, 3)).transpose(1, 3)
        img = enc.reshape_mel2img(x)  # (B, C, 256, 256)
        h = self._patch_embed(img, mel, is_longer)
        for i, stage in enumerate(enc.layers):
            dims = enc.input_resolutions[i]
            if self.grad_checkpointing and self.training and h.requires_grad:
                h = checkpoint(stage, h, dims, False, False, use_reentrant=False)[0]
            else:
                h = stage(h, dims, False, False)[0]
        return enc.norm(h).mean(dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attention(self, kind: str) -> None:
        """``"sdpa"``: every window attention computed by ``scaled_dot_product_attention``; ``"eager"``:
        transformers' own. The modules keep their parameters (and names) either way."""
        cls = {"eager": ClapAudioSelfAttention, "sdpa": SdpaWindowAttention}[kind]
        for m in self.modules():
            if isinstance(m, ClapAudioSelfAttention):
                m.__class__ = cls

    def load_pretrained(self, path: str) -> None:
        from clapscale.models.interop import load_htsat_weights

        load_htsat_weights(self, path)


class SdpaWindowAttention(ClapAudioSelfAttention):
    """Swin window attention (``(B * windows, L, C)`` tokens, L = window_size ** 2) by
    ``F.scaled_dot_product_attention``: the relative position bias ``(heads, L, L)`` and the shifted
    windows' mask ``(windows, L, L)`` go in as one additive mask, as transformers adds them to the
    scores. Flash attention takes no such mask; on a GPU the memory-efficient kernel does.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool | None = False) -> tuple[torch.Tensor]:
        if output_attentions:  # the probabilities are never formed here
            return super().forward(hidden_states, attention_mask, output_attentions)
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        mask = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, L, L)
        if attention_mask is not None:
            windows = attention_mask.shape[0]
            mask = mask.unsqueeze(0) + attention_mask.unsqueeze(1).unsqueeze(0)  # (1, windows, heads, L, L)
            mask = mask.expand(b // windows, -1, -1, -1, -1).reshape(b, -1, n, n)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype),
                                             dropout_p=self.dropout.p if self.training else 0.0)
        return (ctx.transpose(1, 2).reshape(b, n, self.all_head_size),)


def build_htsat(size: str, fusion: str = "none", n_mels: int = 64, n_frames: int = 1001) -> HTSAT:
    """HTSAT ``tiny`` | ``base`` | ``large`` for ``(B, C, n_frames, n_mels)`` mels."""
    return HTSAT(size, fusion, n_mels, n_frames)
