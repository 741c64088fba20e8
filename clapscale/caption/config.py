"""Typed config of a captioner run (``clapscale caption train CONFIG [a.b=c ...]``).

Same machinery and rules as ``clapscale.config``: YAML + dotted overrides, every field typed and
validated once; ``audio`` and ``data`` are the CLAP trainer's own sections (one front end, one
loader). Defaults follow the paper's captioner (papers/clap-synthetic-captions-audioset.txt, 5.1):
AdamW, linear warmup to 5e-4 then exponential decay to 5e-7, label smoothing, scheduled sampling,
the average of the last five checkpoints as the final model, beam size 3 at generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clapscale.config import (
    AudioConfig,
    AudioTowerConfig,
    ConfigError,
    DataConfig,
    TextTowerConfig,
    load_typed_config,
)


@dataclass
class CaptionerModelConfig:
    # Audio encoder: any tower of clapscale.models.registry (model.audio.* fields).
    audio: AudioTowerConfig = field(default_factory=lambda: AudioTowerConfig(name="cnn", size="tiny"))
    # A trained clapscale model (export, checkpoint or run directory) whose audio tower (and audio
    # front end) the captioner starts from; empty = `audio` as configured.
    clap_model: str = ""
    # The tokenizer the decoder writes with: a text tower's (model.text.*); only its tokenizer is used.
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    # The pooled audio embedding becomes this many memory tokens for cross-attention.
    audio_tokens: int = 4
    max_tags: int = 8  # tag-guidance tokens per clip (the first ones, in shard order)
    max_length: int = 32  # caption tokens incl. BOS / EOS

    def validate(self, path: str) -> None:
        for name in ("d_model", "layers", "heads", "ff_dim", "audio_tokens", "max_tags", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ConfigError(f"{path}.d_model={self.d_model} is not divisible by {path}.heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout must be in [0, 1), got {self.dropout}")
        if self.max_length < 3:
            raise ConfigError(f"{path}.max_length must be >= 3 (BOS, a token, EOS), got {self.max_length}")


@dataclass
class CaptionOptimConfig:
    lr: float = 5e-4  # peak, after the linear warmup
    final_lr: float = 5e-7  # reached by exponential decay at train.steps
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    # Scheduled sampling (Bengio et al. 2015; two-pass for transformers): the probability that a
    # decoder input token is the model's own previous prediction rises linearly from 0 to this.
    scheduled_sampling: float = 0.25

    def validate(self, path: str) -> None:
        if not 0 < self.final_lr <= self.lr:
            raise ConfigError(f"{path}.final_lr must be in (0, lr={self.lr}], got {self.final_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{path}.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("label_smoothing", "scheduled_sampling"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{path}.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class CaptionTrainConfig:
    name: str = "captioner"
    out_dir: str = "runs"
    steps: int = 1000
    checkpoint_every: int = 100
    # The final model is the average of the last this-many checkpoints (stochastic weight averaging).
    average_last: int = 5
    log_every: int = 10
    seed: int = 0
    resume: str = "auto"  # auto | none | <checkpoint dir>
    dist_timeout_s: float = 600.0

    def validate(self, path: str) -> None:
        for name in ("steps", "checkpoint_every", "average_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class CaptionRunConfig:
    audio: AudioConfig = field(default_factory=lambda: AudioConfig(length_policy="repeatpad"))
    data: DataConfig = field(default_factory=DataConfig)
    model: CaptionerModelConfig = field(default_factory=CaptionerModelConfig)
    optim: CaptionOptimConfig = field(default_factory=CaptionOptimConfig)
    train: CaptionTrainConfig = field(default_factory=CaptionTrainConfig)

    def validate(self) -> "CaptionRunConfig":
        self.audio.validate("audio")
        self.data.validate("data")
        self.model.validate("model")
        self.optim.validate("optim")
        self.train.validate("train")
        if self.audio.length_policy == "fusion":
            raise ConfigError("audio.length_policy=fusion is not supported by the captioner: use repeatpad, pad "
                              "or rand_trunc")
        return self

    def to_yaml(self) -> str:
        import dataclasses

        import yaml

        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return x

        return yaml.safe_dump(plain(dataclasses.asdict(self)), sort_keys=False)


def load_caption_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CaptionRunConfig:
    """A validated ``CaptionRunConfig`` from a YAML recipe and dotted overrides (``ConfigError`` names the field)."""
    return load_typed_config(CaptionRunConfig, path, overrides)
