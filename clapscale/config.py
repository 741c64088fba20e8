"""Typed run configuration: YAML + dotted overrides, validated once at start-up.

A config is a tree of dataclasses. ``load_config("configs/tiny.yaml", ["train.steps=50"])``
reads the YAML, applies overrides, checks every key and type, and returns a frozen-in-spirit
``Config``. Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the
dotted field, the offending value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clapscale.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AudioConfig:
    """The audio front end every loader and tower agrees on (DESIGN.md, "Audio front end")."""

    sample_rate: int = 48000
    clip_seconds: float = 10.0
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 480
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0
    # "slaney": librosa/Slaney mel scale and area norm (LAION non-fusion models);
    # "htk": HTK mel scale, no norm (LAION fusion models).
    mel_scale: str = "slaney"
    # Training length policy: rand_trunc | repeatpad | pad | fusion.
    length_policy: str = "rand_trunc"
    # Decoded audio beyond this is dropped before the front end (bounds memory for long clips).
    max_seconds: float = 60.0

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def n_frames(self) -> int:
        """Frames of one centred STFT over a clip: 1001 for 10 s at hop 480."""
        return self.clip_samples // self.hop_length + 1

    def validate(self, path: str) -> None:
        _choice(f"{path}.mel_scale", self.mel_scale, ("slaney", "htk"))
        _choice(f"{path}.length_policy", self.length_policy, LENGTH_POLICIES)
        _positive(f"{path}.sample_rate", self.sample_rate)
        _positive(f"{path}.clip_seconds", self.clip_seconds)
        _positive(f"{path}.hop_length", self.hop_length)
        _positive(f"{path}.n_mels", self.n_mels)
        if self.win_length > self.n_fft:
            raise ConfigError(
                f"{path}.win_length={self.win_length} exceeds {path}.n_fft={self.n_fft}"
            )
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ConfigError(
                f"{path}.f_min/f_max must satisfy 0 <= f_min < f_max <= sample_rate/2, "
                f"got f_min={self.f_min}, f_max={self.f_max}, sample_rate={self.sample_rate}"
            )
        if self.max_seconds < self.clip_seconds:
            raise ConfigError(
                f"{path}.max_seconds={self.max_seconds} is shorter than "
                f"{path}.clip_seconds={self.clip_seconds}"
            )


LENGTH_POLICIES = ("rand_trunc", "repeatpad", "pad", "fusion")


@dataclass
class AugmentConfig:
    """Training-time augmentation of the log-mel batch, on the device after the front end.

    Evaluation never augments. All zeros (the default) is off. ``gain_db`` shifts each clip's level
    by a uniform draw in +-gain_db dB (an additive offset on the dB mel: real libraries are mastered at
    different levels). SpecAugment (Park et al. 2019): ``time_masks`` stripes of up to
    ``time_mask_frames`` frames and ``freq_masks`` stripes of up to ``freq_mask_bins`` mel bins per
    clip, filled with the clip's mean (per channel). Draws depend only on (train.seed, step, rank): a resumed run
    augments exactly as the uninterrupted one (clapscale/train/augment.py).
    """

    gain_db: float = 0.0
    time_masks: int = 0
    time_mask_frames: int = 0
    freq_masks: int = 0
    freq_mask_bins: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.gain_db or (self.time_masks and self.time_mask_frames)
                    or (self.freq_masks and self.freq_mask_bins))

    def validate(self, path: str) -> None:
        for name in ("gain_db", "time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ReplayConfig:
    """Replay against forgetting (curation students): each training batch is, with probability
    ``prob``, replaced by a batch of ``spec`` (the teacher's training set for DU, the DS set for ADS)."""

    spec: str = ""  # shard spec of the replay set; empty = no replay
    prob: float = 0.0

    def validate(self, path: str) -> None:
        if not 0.0 <= self.prob < 1.0:
            raise ConfigError(f"{path}.prob must be in [0, 1) (1 would never train on data.train), got {self.prob}")
        if bool(self.spec) != (self.prob > 0):
            raise ConfigError(
                f"{path}.spec={self.spec!r} with {path}.prob={self.prob}: give both (a shard spec and a "
                "probability > 0) or neither"
            )


@dataclass
class DataConfig:
    """Where training / evaluation samples come from and how they are batched."""

    # Shard spec: brace expansion, several sources joined by "::".
    train: str = ""
    # Mixing weights for the "::"-separated sources, e.g. "0.7::0.3"; empty = equal weights.
    train_weights: str = ""
    val: str = ""
    backend: str = "wds"  # wds | dali
    # True: sample shards with replacement forever (epochs are nominal);
    # False: each epoch visits every shard once.
    resampled: bool = True
    batch_size: int = 32  # per rank
    workers: int = 2
    shuffle_buffer: int = 1000
    # Which caption a sample contributes: text | text_augment_t5 | text_augment_all | tag_template |
    # text_or_tags (clapscale/data/captions.py)
    caption: str = "text"
    seed: int = 0
    # > 0: batches also carry each clip's picture (<key>.jpg) as "image" (B, 3, S, S), CLIP-normalised
    # at S x S (224 for CLIP ViT-B/32); samples without one are skipped. 0: audio and text only.
    image_size: int = 0
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def validate(self, path: str) -> None:
        _choice(f"{path}.backend", self.backend, ("wds", "dali"))
        self.replay.validate(f"{path}.replay")
        if self.replay.spec and self.backend == "dali":
            raise ConfigError(
                f"{path}.replay is not supported with {path}.backend=dali (its data position does not "
                f"cover a second reader yet): use {path}.backend=wds for replay"
            )
        _choice(
            f"{path}.caption",
            self.caption,
            ("text", "text_augment_t5", "text_augment_all", "tag_template", "text_or_tags"),
        )
        _positive(f"{path}.batch_size", self.batch_size)
        if self.workers < 0:
            raise ConfigError(f"{path}.workers must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"{path}.shuffle_buffer must be >= 0 (0 or 1: no shuffle), got {self.shuffle_buffer}")
        if self.image_size < 0:
            raise ConfigError(f"{path}.image_size must be >= 0 (0 = no images), got {self.image_size}")
        if self.train_weights:
            weights = self.train_weights.split("::")
            if len(weights) != len(self.train.split("::")):
                raise ConfigError(
                    f"{path}.train_weights={self.train_weights!r} gives {len(weights)} weight(s) for "
                    f"{len(self.train.split('::'))} '::'-separated source(s) in {path}.train"
                )
            for w in weights:
                try:
                    ok = float(w) > 0
                except ValueError:
                    ok = False
                if not ok:
                    raise ConfigError(f"{path}.train_weights={self.train_weights!r}: {w!r} is not a number > 0")
            if not self.resampled and len(set(float(w) for w in weights)) > 1:
                raise ConfigError(
                    f"{path}.train_weights={self.train_weights!r} needs {path}.resampled=true (epoch "
                    "mode visits every shard once, so the sources' sizes set their shares)"
                )


@dataclass
class AudioTowerConfig:
    name: str = "htsat"  # a key of clapscale.models.registry.AUDIO_TOWERS
    size: str = "tiny"
    fusion: str = "none"  # none | aff | daf | iaff
    # Local checkpoint (file or directory) to initialise from; empty = random init.
    pretrained: str = ""
    grad_checkpointing: bool = False
    frozen: bool = False
    # HTSAT's window attention: "eager" (transformers' matmul + softmax) or "sdpa"
    # (torch's scaled_dot_product_attention: fused kernels on a GPU; same parameters and outputs).
    # The text towers already use SDPA (transformers' default; open_clip's nn.MultiheadAttention).
    attention: str = "eager"
    # CNN towers: run convolutions in channels_last (NHWC) memory format, which cuDNN's tensor-core
    # kernels prefer under bf16; the outputs are unchanged.
    channels_last: bool = False


@dataclass
class TextTowerConfig:
    name: str = "minilm"  # a key of clapscale.models.registry.TEXT_TOWERS
    # Local directory or hub name for weights + tokenizer; empty = the tower's default.
    path: str = ""
    pretrained: bool = True  # False: random init from the config at `path` (tests)
    max_length: int = 77
    grad_checkpointing: bool = False
    frozen: bool = False


@dataclass
class ImageTowerConfig:
    # "" = no image tower (CLAP); "clip": open_clip's CLIP image ViT (AudioCLIP / VIP-ANT pivot).
    name: str = ""
    # b32: CLIP ViT-B/32 (weights from `path`); tiny: a CPU-sized ViT (patch 8, width 64, 2 layers).
    size: str = "b32"
    # Local CLIP checkpoint file whose visual.* tensors initialise the tower; empty = random init.
    path: str = ""
    frozen: bool = False


@dataclass
class ModelConfig:
    audio: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    # With an image tower: true = text and image embeddings are their towers' own outputs (no
    # projection MLP), the shared space the audio is trained into (VIP-ANT / AudioCLIP keep CLIP's
    # space); their widths must equal embed_dim.
    pivot: bool = False
    embed_dim: int = 512
    # Temperature: learnable log-scale, init ln(1/0.07), clamped to ln(max_logit_scale) in forward.
    init_logit_scale: float = 14.285714285714286
    max_logit_scale: float = 100.0

    def validate(self, path: str) -> None:
        _choice(f"{path}.audio.fusion", self.audio.fusion, ("none", "aff", "daf", "iaff"))
        _choice(f"{path}.audio.attention", self.audio.attention, ("eager", "sdpa"))
        _choice(f"{path}.image.name", self.image.name, ("", "clip"))
        _choice(f"{path}.image.size", self.image.size, ("b32", "tiny"))
        if self.pivot and not self.image.name:
            raise ConfigError(f"{path}.pivot=true needs an image tower: set {path}.image.name=clip")
        _positive(f"{path}.embed_dim", self.embed_dim)
        _positive(f"{path}.text.max_length", self.text.max_length)
        if not 0 < self.init_logit_scale <= self.max_logit_scale:
            raise ConfigError(
                f"{path}.init_logit_scale={self.init_logit_scale} must lie in "
                f"(0, max_logit_scale={self.max_logit_scale}]"
            )


@dataclass
class LossConfig:
    # infonce | duplicate_aware (identical captions in a batch are positives, not negatives:
    # for path / template captions that repeat) | soft_label
    kind: str = "infonce"
    # Each rank scores its own rows against all gathered columns: memory O(b x N).
    local_loss: bool = True
    # all_gather that carries gradient back to the owning rank. local_loss without it is refused.
    gather_with_grad: bool = True
    soft_label_beta: float = 0.3
    # Temperature of the soft targets: softmax(teacher cosines / T). Its own, not the teacher's
    # learned one (~0.01 once trained), at which every neighbour's weight vanishes. 0.1 measured
    # (benchmarks/soft_label_targets.py: demo recipe trained 200 steps, held-out synthetic clips,
    # batch 64; audio-text): the soft row keeps 25-33% on the sample itself, ~9 effective targets,
    # and 9-15x chance of its off-diagonal mass on clips with the same tags; at 0.05 it is 38-53%
    # self, at 0.01 (a trained scale of 100) 66-80%; at 0.2 same-tag precision falls to 6-9x.
    soft_label_temperature: float = 0.1
    # Checkpoint of a frozen teacher CLAP for soft labels; empty = the model itself, detached.
    teacher: str = ""
    # kind=pairwise: weight of each modality pair's InfoNCE; pairs with weight 0 are left out.
    # All three = AudioCLIP; audio_image + image_text with frozen image/text towers = VIP-ANT.
    weight_audio_text: float = 1.0
    weight_audio_image: float = 0.0
    weight_image_text: float = 0.0

    def pair_weights(self) -> dict[str, float]:
        """``{pair name: weight}`` of the pairs with a positive weight (``kind=pairwise``)."""
        weights = {"audio-text": self.weight_audio_text, "audio-image": self.weight_audio_image,
                   "image-text": self.weight_image_text}
        return {name: w for name, w in weights.items() if w > 0.0}

    def validate(self, path: str) -> None:
        _choice(f"{path}.kind", self.kind, ("infonce", "duplicate_aware", "soft_label", "pairwise"))
        for pair in ("audio_text", "audio_image", "image_text"):
            if getattr(self, f"weight_{pair}") < 0.0:
                raise ConfigError(f"{path}.weight_{pair} must be >= 0, got {getattr(self, f'weight_{pair}')}")
        if self.kind == "pairwise" and not self.pair_weights():
            raise ConfigError(
                f"{path}.kind=pairwise but every {path}.weight_* is 0: give at least one pair a positive weight"
            )
        if self.local_loss and not self.gather_with_grad:
            raise ConfigError(
                f"{path}.local_loss=true with {path}.gather_with_grad=false trains with a silently "
                "wrong gradient (the other ranks' features get none): set gather_with_grad=true "
                "or local_loss=false"
            )
        if not 0.0 <= self.soft_label_beta <= 1.0:
            raise ConfigError(f"{path}.soft_label_beta must be in [0, 1], got {self.soft_label_beta}")
        _positive(f"{path}.soft_label_temperature", self.soft_label_temperature)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.99, 0.9)  # as in the LAION-CLAP paper
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr: float = 0.0
    grad_clip: float = 1.0

    def validate(self, path: str) -> None:
        _positive(f"{path}.lr", self.lr)
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{path}.betas must each be in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{path}.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs"
    steps: int = 1000
    zero_stage: int = 1  # 0 | 1 | 2 | 3
    precision: str = "bf16"  # bf16 | fp16 | fp32
    # Under bf16: the dtype gradients are accumulated over micro-batches and all-reduced across
    # ranks in. fp32 keeps small contributions that bf16's 8-bit mantissa rounds away when many
    # micro-batches / ranks are summed; bf16 halves the gradient traffic (DeepSpeed's default).
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16
    grad_accum: int = 1
    checkpoint_every: int = 500
    keep_last: int = 3
    eval_every: int = 0  # > 0: every N steps and at the end; 0: only at the end; < 0: never
    log_every: int = 10
    # Stop (after a checkpoint) at this step, keeping the LR schedule of train.steps; 0 = run to
    # train.steps. For fixed time slots: the next job resumes with train.resume=auto.
    stop_at: int = 0
    max_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    # Longest wait in one collective (s): a rank whose peer died or hangs stops with an error
    # naming it instead of waiting torch's default 30 min. Must exceed the slowest legitimate
    # wait: rank 0 writing the export or a checkpoint while the others wait for it.
    dist_timeout_s: float = 600.0
    seed: int = 0
    resume: str = "auto"  # auto | none | <checkpoint dir>
    # fp32 matmuls and convolutions on TF32 tensor cores (CUDA; 10-bit mantissa inputs): what is
    # left in fp32 under bf16 (the loss, the log-mel) or everything under precision=fp32.
    tf32: bool = False
    # torch.compile backend for each tower, compiled in place (parameter names, hence checkpoints,
    # unchanged); "" = eager. "inductor" generates kernels; "aot_eager" only traces (tests).
    compile: str = ""
    # Start from another run's weights (an exported model directory, a trainer checkpoint or a run
    # directory; models.loading.load_trained_model): weights only, with a fresh optimizer, LR
    # schedule and step 0 (two-stage pretraining). A checkpoint of this run found by train.resume
    # replaces them, so a requeued stage-2 job continues where it stopped. Empty = off.
    init_from: str = ""

    def validate(self, path: str) -> None:
        _choice(f"{path}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice(f"{path}.precision", self.precision, ("bf16", "fp16", "fp32"))
        _choice(f"{path}.grad_reduce_dtype", self.grad_reduce_dtype, ("fp32", "bf16"))
        _choice(f"{path}.compile", self.compile, ("", "inductor", "aot_eager", "eager"))
        if self.precision == "bf16" and self.zero_stage == 0 and self.grad_reduce_dtype == "fp32":
            raise ConfigError(
                f"{path}.zero_stage=0 with {path}.precision=bf16 accumulates gradients in bf16 (DeepSpeed "
                f"has no fp32 accumulation without ZeRO): use {path}.zero_stage=1 (it partitions only the "
                f"optimizer state; same update), or accept bf16 with {path}.grad_reduce_dtype=bf16"
            )
        _positive(f"{path}.steps", self.steps)
        _positive(f"{path}.grad_accum", self.grad_accum)
        _positive(f"{path}.keep_last", self.keep_last)
        _positive(f"{path}.max_nonfinite", self.max_nonfinite)
        _positive(f"{path}.dist_timeout_s", self.dist_timeout_s)
        _positive(f"{path}.log_every", self.log_every)
        if self.checkpoint_every < 0 or self.stop_at < 0:
            raise ConfigError(
                f"{path}.checkpoint_every and {path}.stop_at must be >= 0 (0 = off), got "
                f"{self.checkpoint_every} and {self.stop_at}"
            )


@dataclass
class EvalConfig:
    # Tasks run by `clapscale eval` defaults and periodically in training: retrieval | zeroshot | linear_probe
    # | image_retrieval (audio<->image, tri-modal models).
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "zeroshot"])
    # Shard spec per task; empty = data.val.
    retrieval: str = ""
    zeroshot: str = ""
    image_retrieval: str = ""  # audio<->image, tri-modal models (model.image.name) only
    # Zero-shot prompts; "{label}" is replaced by the label with underscores read as spaces.
    # Several templates: the label embedding is the normalised mean of its prompts (ensembling).
    templates: list[str] = field(default_factory=lambda: ["This is a sound of {label}."])
    # Zero-shot / linear-probe classes; empty = the sorted set of all `tag`s in the split.
    labels: list[str] = field(default_factory=list)
    # Linear probe on frozen audio embeddings: fit on linear_probe_train, score on linear_probe_test
    # (empty = data.val); L2 strength of the logistic regression.
    linear_probe_train: str = ""
    linear_probe_test: str = ""
    linear_probe_weight_decay: float = 1e-3
    batch_size: int = 64  # per rank
    # Cap on clips per split (the smallest keys of the leading shards; the same subset for any
    # number of ranks), bounds periodic eval in training; 0 = all.
    max_clips: int = 0

    def validate(self, path: str) -> None:
        for t in self.tasks:
            _choice(f"{path}.tasks[]", t, ("retrieval", "zeroshot", "linear_probe", "image_retrieval"))
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.linear_probe_weight_decay", self.linear_probe_weight_decay)
        if self.max_clips < 0:
            raise ConfigError(f"{path}.max_clips must be >= 0 (0 = all), got {self.max_clips}")
        if not self.templates:
            raise ConfigError(f"{path}.templates is empty; the default is ['This is a sound of {{label}}.']")
        for t in self.templates:
            if "{label}" not in t:
                raise ConfigError(f"{path}.templates: {t!r} has no {{label}} placeholder")


@dataclass
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        """Check every section; raise ``ConfigError`` naming the first bad field."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            check = getattr(section, "validate", None)
            if check is not None:
                check(f.name)
        if self.augment.time_mask_frames >= self.audio.n_frames or self.augment.freq_mask_bins >= self.audio.n_mels:
            raise ConfigError(
                f"augment masks must be narrower than the mel ({self.audio.n_frames} frames x {self.audio.n_mels} "
                f"bins), got time_mask_frames={self.augment.time_mask_frames}, "
                f"freq_mask_bins={self.augment.freq_mask_bins}"
            )
        self._validate_modalities()
        return self

    def _validate_modalities(self) -> None:
        """An image tower, image batches and the pairwise loss go together (AudioCLIP / VIP-ANT)."""
        uses_image = any("image" in p for p in self.loss.pair_weights()) and self.loss.kind == "pairwise"
        if uses_image and not self.model.image.name:
            raise ConfigError("loss.weight_audio_image / weight_image_text need an image tower: set model.image.name=clip")
        if self.model.image.name and self.loss.kind != "pairwise":
            raise ConfigError(
                f"model.image.name={self.model.image.name!r} trains with the pairwise loss: set loss.kind=pairwise "
                "and give loss.weight_audio_image / weight_image_text"
            )
        if self.model.image.name and not self.data.image_size:
            raise ConfigError(f"model.image.name={self.model.image.name!r} needs data.image_size (224 for CLIP ViT-B/32)")
        if "image_retrieval" in self.eval.tasks and not self.model.image.name:
            raise ConfigError("eval.tasks has image_retrieval (audio<->image) but the model has no image tower "
                              "(model.image.name is empty)")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults), apply ``a.b.c=value`` overrides, validate.

    Override values are parsed as YAML scalars/lists (``train.steps=10``, ``optim.betas=[0.9,0.98]``).
    """
    return config_from_dict(read_raw_config(path, overrides))


def load_typed_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """``load_config`` for another root dataclass (e.g. the captioner's); its ``validate()`` is called."""
    return _build(cls, read_raw_config(path, overrides), "").validate()


def read_raw_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML at ``path`` (or {}) with ``a.b.c=value`` overrides applied, not yet typed."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _parse_yaml(path.read_text(), str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        _set_dotted(raw, key.strip(), _parse_yaml(value, f"override {item!r}") if value.strip() else "")
    return raw


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from e


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a ``Config`` from plain data (e.g. a config saved in a checkpoint)."""
    return _build(Config, raw, "").validate()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config field(s) {', '.join(where + u for u in unknown)}; "
            f"{path or 'the top level'} accepts: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in args:
            if alt is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(alt, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}={value!r} matches none of {tp}: {'; '.join(errors)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path} must have {len(args)} items, got {list(value)}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-3" (no dot in the mantissa) as a string; accept what float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path} must be a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported config type {tp}")


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(path: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{path} must be > 0, got {value!r}")
