"""The frozen teacher of the soft-label loss (``loss.kind=soft_label`` with ``loss.teacher``).

The teacher is fed the student's log-mel batch and token ids (one front end and one tokenizer
per step), so it must read them as the student does: ``check_teacher`` refuses one that would
not. Without ``loss.teacher`` the student itself, detached, provides the soft labels.
"""

from __future__ import annotations

import torch
from torch import nn

from clapscale.config import Config, ConfigError

# Front-end fields that shape the mel both models see (max_seconds and the crop rule do not).
_TEACHER_AUDIO_FIELDS = (
    "sample_rate", "clip_seconds", "n_fft", "win_length", "hop_length", "n_mels", "f_min", "f_max", "mel_scale",
)


def check_teacher(cfg: Config, teacher_cfg: Config) -> None:
    """Refuse a soft-label teacher that would read the student's inputs differently.

    The teacher is fed the student's log-mel batch and token ids, so its front end, its fusion
    layout and its tokenizer must be the student's; otherwise the soft labels are computed from
    garbage, silently. Raises ``ConfigError`` naming every differing field. ``model.text.path`` is
    not compared: an exported model points it at its own copy of the tokenizer files.
    """
    a, ta = cfg.audio, teacher_cfg.audio
    diffs = [f"audio.{f}: {getattr(a, f)!r} vs teacher {getattr(ta, f)!r}"
             for f in _TEACHER_AUDIO_FIELDS if getattr(a, f) != getattr(ta, f)]
    if (a.length_policy == "fusion") != (ta.length_policy == "fusion"):
        diffs.append(f"audio.length_policy: {a.length_policy!r} vs teacher {ta.length_policy!r} (fusion layout)")
    t, tt = cfg.model.text, teacher_cfg.model.text
    diffs += [f"model.text.{f}: {getattr(t, f)!r} vs teacher {getattr(tt, f)!r}"
              for f in ("name", "max_length") if getattr(t, f) != getattr(tt, f)]
    if diffs:
        raise ConfigError(
            f"loss.teacher={cfg.loss.teacher!r} reads inputs differently from the student (it gets the "
            f"student's mel batch and token ids): {'; '.join(diffs)}. Use a teacher trained with the same "
            "audio front end and text tokenizer, or leave loss.teacher empty"
        )


def load_teacher(cfg: Config, device: torch.device) -> nn.Module:
    """The checked, frozen teacher of ``cfg.loss.teacher`` on ``device``, in eval mode."""
    from clapscale.models import load_model

    teacher, teacher_cfg = load_model(cfg.loss.teacher)
    check_teacher(cfg, teacher_cfg)
    return teacher.to(device).eval().requires_grad_(False)


@torch.no_grad()
def teacher_features(teacher: nn.Module, micro_inputs: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (audio (A*b, D), text (A*b, D)) embeddings of the step's micro-batches, fp32.

    Each input holds ``mel`` (b, ..., T, F), ``is_longer`` (b,), ``input_ids`` and ``attention_mask`` (b, L).
    """
    outs = [teacher(x["mel"].float(), x["is_longer"], x["input_ids"], x["attention_mask"]) for x in micro_inputs]
    return torch.cat([o[0] for o in outs]).float(), torch.cat([o[1] for o in outs]).float()
