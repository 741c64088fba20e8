"""Zero-shot classification: labels -> prompt embeddings -> clip-by-label scores -> metrics.

Prompts follow the LAION-CLAP paper: ``"This is a sound of {label}."`` with underscores in the
label read as spaces. With several templates the label embedding is the re-normalised mean of
its prompts' embeddings (prompt ensembling, as CLIP does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from clapscale.eval.metrics import zeroshot_chance, zeroshot_metrics

DEFAULT_TEMPLATES = ("This is a sound of {label}.",)


class NoLabelsError(ValueError):
    """The split carries no usable labels for zero-shot or linear-probe evaluation."""


def prompts_for(label: str, templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """The prompt of ``label`` under each template (``{label}`` placeholder, ``_`` -> space)."""
    text = label.replace("_", " ").strip()
    out = []
    for t in templates:
        if "{label}" not in t:
            raise ValueError(f"zero-shot template {t!r} has no {{label}} placeholder")
        out.append(t.format(label=text))
    return out


def check_labels(labels: Sequence[str]) -> list[str]:
    """Validate a user's label list: non-empty, no blank or duplicate labels."""
    labels = list(labels)
    if not labels:
        raise ValueError("the label list is empty: give at least one label (e.g. --labels dog,rain,siren)")
    blank = [i for i, lab in enumerate(labels) if not str(lab).strip()]
    if blank:
        raise ValueError(f"labels at positions {blank} are blank; labels were {labels!r}")
    seen: set[str] = set()
    dups = sorted({lab for lab in labels if lab in seen or seen.add(lab)})  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"duplicate labels {dups}: each label must appear once")
    return labels


def check_label_set(labels: Sequence[str], flag: str = "--labels") -> list[str]:
    """Validate the labels a user gave a zero-shot command (``eval --labels``, ``zeroshot --labels``):
    at least two different ones, none blank or repeated. Zero-shot picks among the labels (a softmax
    over them), so with one label every clip scores 1.000 and is counted right."""
    labels = list(labels)
    if not labels:
        raise ValueError(f"{flag} is empty: give at least two labels, e.g. {flag} dog,rain,siren")
    if len(set(labels)) < 2:
        raise ValueError(
            f"{flag} {','.join(labels)}: give at least two labels; zero-shot picks among them, so with one "
            f"label every clip scores 1.000 and is counted right (add what it should be told apart from, "
            f"e.g. {flag} dog,cat,rain)"
        )
    return check_labels(labels)


def encode_labels(
    encode_texts: Callable[[list[str]], Tensor],
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> Tensor:
    """Label embeddings (L, D), L2-normalised.

    Args:
        encode_texts: list of N strings -> (N, D) L2-normalised text embeddings.
    """
    labels = check_labels(labels)
    if not templates:
        raise ValueError("no zero-shot templates given; the default is ['This is a sound of {label}.']")
    texts = [p for lab in labels for p in prompts_for(lab, templates)]
    emb = encode_texts(texts).float()
    emb = emb.reshape(len(labels), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


@dataclass
class ZeroShotTargets:
    """Multi-hot targets (N_kept, L) over ``labels`` for the clips at ``kept`` (indices into the set)."""

    labels: list[str]
    targets: Tensor
    kept: Tensor
    dropped: int = 0
    unknown_tags: list[str] = field(default_factory=list)


def targets_from_tags(tags: Sequence[Sequence[str]], labels: Sequence[str] | None = None) -> ZeroShotTargets:
    """Build targets from each clip's tags.

    ``labels`` None: the sorted set of all tags. Clips with no tag among the labels are left out
    (counted in ``dropped``), since no answer could be right for them.
    """
    if labels is None:
        labels = sorted({t for clip in tags for t in clip})
        if not labels:
            raise NoLabelsError(
                "zero-shot evaluation needs labels: the shards have no `tag` on any clip; pass --labels "
                "(or eval.labels) explicitly, or evaluate another task"
            )
    labels = check_labels(labels)
    index = {lab: j for j, lab in enumerate(labels)}
    rows, kept = [], []
    unknown: set[str] = set()
    for i, clip in enumerate(tags):
        row = torch.zeros(len(labels), dtype=torch.bool)
        for t in clip:
            if t in index:
                row[index[t]] = True
            else:
                unknown.add(t)
        if row.any():
            rows.append(row)
            kept.append(i)
    if not rows:
        raise NoLabelsError(
            f"no clip carries any of the {len(labels)} labels {labels[:10]}...; check the labels against "
            "the shards' `tag` fields"
        )
    return ZeroShotTargets(
        labels=labels,
        targets=torch.stack(rows),
        kept=torch.tensor(kept, dtype=torch.long),
        dropped=len(tags) - len(kept),
        unknown_tags=sorted(unknown),
    )


def zeroshot_scores(audio: Tensor, label_emb: Tensor) -> Tensor:
    """(N, D) audio x (L, D) labels -> (N, L) cosine similarities."""
    return audio.float() @ label_emb.float().T


def zeroshot_result(audio: Tensor, label_emb: Tensor, targets: ZeroShotTargets) -> tuple[dict, dict]:
    """Metrics and chance levels for the kept clips. audio: (N, D) for the whole set."""
    scores = zeroshot_scores(audio[targets.kept], label_emb)
    return zeroshot_metrics(scores, targets.targets), zeroshot_chance(targets.targets)
