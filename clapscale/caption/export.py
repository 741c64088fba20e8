"""Building, saving and loading a captioner: the directory ``clapscale caption generate`` reads.

Layout of ``runs/<name>/captioner/`` (written by the captioner trainer from the average of its last
checkpoints)::

    config.yaml              the run's CaptionRunConfig (audio tower, decoder sizes, tokenizer, front end)
    vocab.json               decoder tokens and tag vocabulary (the generation filter)
    captioner.safetensors    fp32 weights
    text/                    the tokenizer files, so the directory works offline anywhere

``captioner_checksum`` (sha256 over weights and vocabulary) is what generated shard sets record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from clapscale.caption.config import CaptionRunConfig, load_caption_config
from clapscale.caption.model import CaptionVocab, TagGuidedCaptioner
from clapscale.config import ConfigError
from clapscale.errors import UserError

CONFIG_FILE = "config.yaml"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "captioner.safetensors"
TEXT_DIR = "text"


class CaptionerLoadError(UserError, ValueError):
    """A captioner directory is incomplete or does not fit its config."""


def hf_tokenizer_of(cfg: CaptionRunConfig):
    """The transformers tokenizer the decoder writes with (``model.text``)."""
    from clapscale.models import build_tokenizer

    if cfg.model.text.name == "clip":
        raise ConfigError("model.text.name=clip: the captioner needs a transformers tokenizer "
                          "(minilm, bert or roberta)")
    return build_tokenizer(cfg.model.text).hf_tokenizer


def adopt_clap_audio(cfg: CaptionRunConfig) -> nn.Module:
    """The audio tower of the trained clapscale model ``model.clap_model``, with ``cfg``'s audio
    tower and front end set to that model's (in place), so the saved config rebuilds it."""
    from clapscale.models.loading import load_trained_model

    clap, clap_cfg = load_trained_model(cfg.model.clap_model)
    if clap_cfg.audio.length_policy == "fusion":
        raise ConfigError(f"model.clap_model={cfg.model.clap_model!r} is a fusion model; the captioner reads "
                          "one 10 s view: use a non-fusion model")
    cfg.model.audio = dataclasses.replace(clap_cfg.model.audio, pretrained="", frozen=cfg.model.audio.frozen)
    cfg.audio = dataclasses.replace(clap_cfg.audio, length_policy=cfg.audio.length_policy)
    return clap.audio_tower


def build_captioner(cfg: CaptionRunConfig, vocab: CaptionVocab, audio_tower: nn.Module | None = None) -> TagGuidedCaptioner:
    """A ``TagGuidedCaptioner`` for ``cfg.model`` and ``vocab`` (audio tower built from
    ``cfg.model.audio`` unless given)."""
    from clapscale.config import ModelConfig
    from clapscale.models import build_audio_tower

    m = cfg.model
    if audio_tower is None:
        audio_tower = build_audio_tower(ModelConfig(audio=m.audio), cfg.audio)
    return TagGuidedCaptioner(
        audio_tower, vocab.n_tokens, len(vocab.tags), d_model=m.d_model, layers=m.layers, heads=m.heads,
        ff_dim=m.ff_dim, dropout=m.dropout, audio_tokens=m.audio_tokens, max_length=m.max_length,
        freeze_audio=m.audio.frozen,
    )


def save_captioner(state: dict[str, torch.Tensor], cfg: CaptionRunConfig, vocab: CaptionVocab, directory: Path) -> Path:
    """Write the captioner directory (see module docstring); files are renamed into place when complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_tokenizer_of(cfg).save_pretrained(directory / TEXT_DIR)
    saved = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, clap_model="", audio=dataclasses.replace(cfg.model.audio, pretrained=""),
        text=dataclasses.replace(cfg.model.text, path=TEXT_DIR)))
    vocab.save(directory / (VOCAB_FILE + ".tmp"))
    os.replace(directory / (VOCAB_FILE + ".tmp"), directory / VOCAB_FILE)
    tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
               for k, v in state.items()}
    save_file(tensors, str(directory / (WEIGHTS_FILE + ".tmp")), metadata={"format": "clapscale-captioner"})
    os.replace(directory / (WEIGHTS_FILE + ".tmp"), directory / WEIGHTS_FILE)
    (directory / (CONFIG_FILE + ".tmp")).write_text(saved.to_yaml())
    os.replace(directory / (CONFIG_FILE + ".tmp"), directory / CONFIG_FILE)
    return directory


def captioner_checksum(directory: Path) -> str:
    """sha256 over the weights and the vocabulary of a captioner directory."""
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, VOCAB_FILE):
        with open(Path(directory) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_captioner(directory: str | Path) -> tuple[TagGuidedCaptioner, CaptionRunConfig, CaptionVocab]:
    """Read a captioner directory -> ``(model (eval mode, CPU), config, vocab)``."""
    from safetensors.torch import load_file

    from clapscale.models.checkpoint import check_shapes

    directory = Path(directory)
    missing = [n for n in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE) if not (directory / n).is_file()]
    if missing:
        raise CaptionerLoadError(f"{directory} is not a captioner directory (no {', '.join(missing)}): give "
                                 "runs/<name>/captioner of a finished `clapscale caption train`")
    cfg = load_caption_config(directory / CONFIG_FILE)
    cfg.model.text.path = str(directory / TEXT_DIR)
    vocab = CaptionVocab.load(directory / VOCAB_FILE)
    model = build_captioner(cfg, vocab)
    state = load_file(str(directory / WEIGHTS_FILE))
    check_shapes(model, state, where=str(directory / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, vocab
