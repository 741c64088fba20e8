"""Building a ``ClapModel`` and its tokenizer from the typed config."""

from __future__ import annotations

from torch import nn

from clapscale.config import AudioConfig, Config, ConfigError, ModelConfig, TextTowerConfig
from clapscale.models.audio.base import AudioTower
from clapscale.models.clap import ClapModel
from clapscale.models.registry import audio_entry, resolve, text_entry
from clapscale.models.text import TextTower, Tokenizer, build_text_tokenizer


def build_audio_tower(model_cfg: ModelConfig, audio_cfg: AudioConfig) -> AudioTower:
    """The audio tower named by ``model.audio``, initialised from ``model.audio.pretrained`` if set."""
    a = model_cfg.audio
    entry = audio_entry(a.name, a.size, a.fusion)
    if audio_cfg.length_policy == "fusion" and a.fusion == "none":
        raise ConfigError(
            "audio.length_policy=fusion feeds 4-channel fusion batches but model.audio.fusion=none "
            "would read only the global view: set model.audio.fusion (aff | daf | iaff) or another "
            "audio.length_policy"
        )
    if a.fusion != "none" and audio_cfg.length_policy != "fusion":
        # Clips over 10 s would arrive flagged is_longer but as 1-channel crops without local
        # chunks: the tower would fail at the first long clip, possibly hours into a run.
        raise ConfigError(
            f"model.audio.fusion={a.fusion!r} needs audio.length_policy=fusion (global view + 3 local "
            f"chunks per long clip), got audio.length_policy={audio_cfg.length_policy!r}: set "
            "audio.length_policy=fusion, or model.audio.fusion=none"
        )
    extra = {"sample_rate": audio_cfg.sample_rate} if entry.waveform else {}
    tower = resolve(entry.builder)(
        str(a.size), fusion=a.fusion, n_mels=audio_cfg.n_mels, n_frames=audio_cfg.n_frames, **extra
    )
    if a.pretrained:
        tower.load_pretrained(a.pretrained)
    if a.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    if a.attention != "eager":
        if not hasattr(tower, "set_attention"):
            raise ConfigError(
                f"model.audio.attention={a.attention!r} applies to HTSAT's window attention; "
                f"model.audio.name={a.name!r} has none to switch (ViT's already uses SDPA): drop the setting"
            )
        tower.set_attention(a.attention)
    if a.channels_last:
        if not hasattr(tower, "set_channels_last"):
            raise ConfigError(
                f"model.audio.channels_last=true applies to the CNN towers, not model.audio.name={a.name!r}: "
                "drop the setting"
            )
        tower.set_channels_last(True)
    return tower


def build_text_tower(text_cfg: TextTowerConfig) -> TextTower:
    """The text tower named by ``model.text`` (weights from ``model.text.path`` when pretrained)."""
    entry = text_entry(text_cfg.name)
    tower = resolve(entry.builder)(text_cfg.name, text_cfg.path, text_cfg.pretrained)
    if text_cfg.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    return tower


def build_model(cfg: Config) -> ClapModel:
    """A ``ClapModel`` from ``cfg.model`` (towers, sizes, fusion, projection width, temperature) and
    ``cfg.audio`` (mel bins and frames the audio tower must accept). Bad fields raise ``ConfigError``
    naming them; nothing is downloaded."""
    m = cfg.model
    if m.image.name:
        return build_trimodal(cfg)
    return ClapModel(
        build_audio_tower(m, cfg.audio),
        build_text_tower(m.text),
        embed_dim=m.embed_dim,
        init_logit_scale=m.init_logit_scale,
        max_logit_scale=m.max_logit_scale,
        freeze_audio=m.audio.frozen,
        freeze_text=m.text.frozen,
    )


def build_trimodal(cfg: Config) -> ClapModel:
    """``TriModalClap`` when ``model.image.name`` is set: the image tower at ``data.image_size``."""
    from clapscale.models.image import ClipImageTower
    from clapscale.models.trimodal import TriModalClap

    m = cfg.model
    if not cfg.data.image_size:
        raise ConfigError(
            f"model.image.name={m.image.name!r} needs images in the batches: set data.image_size "
            "(224 for CLIP ViT-B/32)"
        )
    image = ClipImageTower(m.image.size, cfg.data.image_size, m.embed_dim)
    if m.image.path:
        image.load_pretrained(m.image.path)
    return TriModalClap(
        build_audio_tower(m, cfg.audio),
        build_text_tower(m.text),
        image,
        embed_dim=m.embed_dim,
        init_logit_scale=m.init_logit_scale,
        max_logit_scale=m.max_logit_scale,
        freeze_audio=m.audio.frozen,
        freeze_text=m.text.frozen,
        freeze_image=m.image.frozen,
        pivot=m.pivot,
    )


def build_tokenizer(text_cfg: TextTowerConfig) -> Tokenizer:
    """``tok(list[str]) -> {"input_ids": (B, L), "attention_mask": (B, L)}`` (LongTensors,
    ``L <= min(model.text.max_length, 77)``), loaded from where the text tower's weights come from."""
    text_entry(text_cfg.name)
    return build_text_tokenizer(text_cfg.name, text_cfg.path, text_cfg.max_length)


_NO_DECAY_SUFFIXES = (
    "logit_scale",
    "positional_embedding",
    "class_embedding",
    "relative_position_bias_table",
    "token_embedding.weight",
)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for parameters that weight decay should skip: every 0-d/1-d tensor (biases, LayerNorm /
    BatchNorm scales and shifts, the temperature) and embedding tables (token, position, class,
    relative-position bias), which decay would pull towards zero for rarely seen tokens."""
    if param.ndim <= 1:
        return True
    return name.endswith(_NO_DECAY_SUFFIXES) or "embeddings." in name
