"""Evaluation metrics as pure functions over similarity matrices.

Nothing here touches a model, a process group or a data loader: every function takes scores
(already gathered from all ranks) and returns plain floats, so the same numbers come out on
one process or many.

Tie rule (retrieval and zero-shot top-k): **pessimistic**. A relevant candidate is ranked
behind every irrelevant candidate with an equal score; relevant candidates that tie with each
other keep their index order (they are interchangeable, so this never changes a metric). A model
that maps everything to one point therefore scores the worst possible ranks, never a free hit.
Multi-label mAP follows the usual average-precision definition (scikit-learn's
``average_precision_score``): a group of tied scores is one threshold, so its positives and
negatives enter precision together.

Retrieval with several captions per clip follows the LAION-CLAP paper's appendix C (and the
Clotho/AudioCaps evaluation of Mei et al. it cites): text->audio treats each caption as its own
query with one relevant clip; audio->text takes, for R@k and ranks, the best rank among the
clip's captions, and for mAP@10 uses ``AP@10 = (1/R) * sum_{r=1..10} P(r) * rel(r)`` with R the
clip's caption count. Ranks are 1-based; the median rank is ``floor(median)`` of the ranks, as
in the reference implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_KS = (1, 5, 10)
MAP_CUTOFF = 10

# Rows of a similarity matrix scored at once; bounds memory at chunk x candidates x extra.
_CHUNK = 256


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------


def ranks_single_relevant(scores: Tensor, target: Tensor) -> Tensor:
    """1-based rank of one relevant candidate per query, ties pessimistic.

    Args:
        scores: (Q, N) query-by-candidate scores.
        target: (Q,) index of the relevant candidate of each query.
    Returns:
        (Q,) int64 ranks in [1, N]: 1 + the number of *other* candidates scoring >= the target.
    """
    _check_scores(scores)
    target = torch.as_tensor(target, dtype=torch.long, device=scores.device)
    if target.shape != (scores.shape[0],):
        raise ValueError(f"target must have shape ({scores.shape[0]},), got {tuple(target.shape)}")
    if scores.shape[0] and (target.min() < 0 or target.max() >= scores.shape[1]):
        raise ValueError(f"target indices must lie in [0, {scores.shape[1]}), got {target.tolist()}")
    out = []
    for start in range(0, scores.shape[0], _CHUNK):
        s = scores[start : start + _CHUNK]
        t = target[start : start + _CHUNK]
        own = s.gather(1, t[:, None])
        # Counts the target itself once, which is exactly the "+1" of a 1-based rank.
        out.append((s >= own).sum(dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(out).long().cpu()


def ranks_multi_relevant(scores: Tensor, relevant: Tensor) -> Tensor:
    """1-based rank of every relevant candidate of every query, ties pessimistic.

    The ranked list of a query is: descending score; among equal scores irrelevant candidates
    first, then relevant ones in index order.

    Args:
        scores: (Q, N) scores.
        relevant: (Q, N) bool, True where the candidate is relevant to the query.
    Returns:
        (Q, N) int64: the rank of each relevant candidate, 0 where the candidate is irrelevant.
    """
    _check_scores(scores)
    relevant = torch.as_tensor(relevant, dtype=torch.bool, device=scores.device)
    if relevant.shape != scores.shape:
        raise ValueError(
            f"relevant must have the shape of scores {tuple(scores.shape)}, got {tuple(relevant.shape)}"
        )
    q, n = scores.shape
    out = torch.zeros(q, n, dtype=torch.long)
    for row in range(q):
        rel = relevant[row].nonzero().squeeze(1)
        if rel.numel() == 0:
            continue
        s = scores[row]
        s_rel = s[rel]  # (k,)
        irrelevant = ~relevant[row]
        beaten_by_irrelevant = ((s[None, :] >= s_rel[:, None]) & irrelevant[None, :]).sum(1)
        r_s = s_rel[None, :]
        ahead_relevant = (r_s > s_rel[:, None]) | ((r_s == s_rel[:, None]) & (rel[None, :] < rel[:, None]))
        rank = 1 + beaten_by_irrelevant + ahead_relevant.sum(1)
        out[row, rel.cpu()] = rank.cpu()
    return out


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor (queries x candidates), got {_describe(scores)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the embeddings fed to the metric")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------
# Summaries of ranks
# --------------------------------------------------------------------------------------------


def rank_summary(ranks: Tensor, prefix: str, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@k (percent), mean rank and median rank (``floor(median)``) of 1-based ranks (Q,)."""
    r = ranks.double()
    if r.numel() == 0:
        raise ValueError(f"{prefix}: no queries to evaluate")
    out = {f"{prefix}/R@{k}": 100.0 * (r <= k).double().mean().item() for k in ks}
    out[f"{prefix}/mean_rank"] = r.mean().item()
    out[f"{prefix}/median_rank"] = float(math.floor(_median(r)))
    return out


def _median(x: Tensor) -> float:
    # torch.median returns the lower of the two middle values; the reference takes numpy's mean.
    v, _ = x.sort()
    n = v.numel()
    mid = n // 2
    return v[mid].item() if n % 2 else 0.5 * (v[mid - 1] + v[mid]).item()


def average_precision_at_k(rel_ranks: Tensor, n_relevant: Tensor, k: int = MAP_CUTOFF) -> Tensor:
    """AP@k per query: ``(1/R) * sum_{r<=k} P(r) rel(r)`` (LAION-CLAP appendix C).

    Args:
        rel_ranks: (Q, M) 1-based ranks of relevant items, 0 = padding (not a relevant item).
        n_relevant: (Q,) R, the number of relevant items of each query (>= 1).
    Returns:
        (Q,) float64 AP@k in [0, 1].
    """
    ranks = rel_ranks.long()
    valid = ranks > 0
    # With the ranks of the relevant items sorted, the j-th (1-based) sits at position r_j and
    # P(r_j) = j / r_j; positions holding irrelevant items contribute rel(r) = 0.
    sorted_ranks, _ = torch.where(valid, ranks, torch.iinfo(torch.long).max).sort(dim=1)
    j = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)[None, :]
    hit = (sorted_ranks <= k) & (sorted_ranks < torch.iinfo(torch.long).max)
    contrib = torch.where(hit, j / sorted_ranks.double().clamp(min=1), torch.zeros((), dtype=torch.float64))
    return contrib.sum(1) / n_relevant.double()


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def retrieval_metrics(
    sim: Tensor, caption_to_audio: Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Audio<->text retrieval with one or more captions per clip.

    Args:
        sim: (A, C) cosine similarity of every clip to every caption.
        caption_to_audio: (C,) index of the clip each caption describes. Every clip needs >= 1
            caption. With ``arange(A)`` (one caption each) this is standard single-caption retrieval.
        ks: recall cut-offs.
    Returns:
        ``t2a/R@k``, ``t2a/mAP@10``, ``t2a/mean_rank``, ``t2a/median_rank`` and the same for
        ``a2t``; recalls and mAP in percent, ranks 1-based.
    """
    _check_scores(sim)
    a, c = sim.shape
    owner = torch.as_tensor(caption_to_audio, dtype=torch.long)
    if owner.shape != (c,):
        raise ValueError(f"caption_to_audio must have shape ({c},) to match sim {tuple(sim.shape)}, got {tuple(owner.shape)}")
    if c and (owner.min() < 0 or owner.max() >= a):
        raise ValueError(f"caption_to_audio holds clip indices outside [0, {a})")
    per_clip = torch.bincount(owner, minlength=a)
    if a == 0 or (per_clip == 0).any():
        missing = (per_clip == 0).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(f"every clip needs at least one caption; clips without one: {missing} (of {a})")

    # text -> audio: each caption is a query with exactly one relevant clip.
    t2a = ranks_single_relevant(sim.t(), owner.to(sim.device))
    out = rank_summary(t2a, "t2a", ks)
    out[f"t2a/mAP@{MAP_CUTOFF}"] = 100.0 * torch.where(
        t2a <= MAP_CUTOFF, 1.0 / t2a.double(), torch.zeros((), dtype=torch.float64)
    ).mean().item()

    # audio -> text: the clip's captions are all relevant.
    relevant = owner[None, :] == torch.arange(a)[:, None]
    rel_ranks = ranks_multi_relevant(sim, relevant.to(sim.device))
    best = torch.where(relevant, rel_ranks, torch.iinfo(torch.long).max).min(dim=1).values
    out.update(rank_summary(best, "a2t", ks))
    ap = average_precision_at_k(rel_ranks, per_clip, MAP_CUTOFF)
    out[f"a2t/mAP@{MAP_CUTOFF}"] = 100.0 * ap.mean().item()
    return out


def single_caption_retrieval(sim: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Standard retrieval where caption i describes clip i. sim: (N, N) clip-by-caption."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"single-caption retrieval needs a square (N, N) matrix, got {tuple(sim.shape)}")
    return retrieval_metrics(sim, torch.arange(sim.shape[0]), ks)


def retrieval_chance(caption_to_audio: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected value of each retrieval metric under a random ranking (same keys, no median).

    text->audio: one relevant clip among A. audio->text: a clip with m captions among C: the
    best of m random positions is within k with probability 1 - C(C-m, k)/C(C, k); expected best
    position (C+1)/(m+1); E[AP@10] = (1/C) * sum_{r<=10} (1 + (r-1)(m-1)/(C-1)) / r.
    """
    owner = torch.as_tensor(caption_to_audio, dtype=torch.long)
    c = owner.numel()
    a = int(owner.max().item()) + 1 if c else 0
    if c == 0:
        raise ValueError("retrieval_chance needs at least one caption")
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2a/R@{k}"] = 100.0 * min(k, a) / a
    out["t2a/mean_rank"] = (a + 1) / 2
    out[f"t2a/mAP@{MAP_CUTOFF}"] = 100.0 * sum(1.0 / r for r in range(1, min(MAP_CUTOFF, a) + 1)) / a
    ms = torch.bincount(owner, minlength=a).tolist()
    for k in ks:
        out[f"a2t/R@{k}"] = 100.0 * sum(1.0 - _comb_ratio(c, m, k) for m in ms) / a
    out["a2t/mean_rank"] = sum((c + 1) / (m + 1) for m in ms) / a
    aps = []
    for m in ms:
        step = (m - 1) / (c - 1) if c > 1 else 0.0
        aps.append(sum((1.0 + (r - 1) * step) / r for r in range(1, min(MAP_CUTOFF, c) + 1)) / c)
    out[f"a2t/mAP@{MAP_CUTOFF}"] = 100.0 * sum(aps) / a
    return out


def _comb_ratio(c: int, m: int, k: int) -> float:
    """C(c-m, k) / C(c, k): probability that none of m marked items lands in a random top k."""
    if k >= c:
        return 0.0
    p = 1.0
    for i in range(k):
        p *= (c - m - i) / (c - i)
        if p <= 0:
            return 0.0
    return p


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------


def topk_accuracy(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Single-label top-k accuracy (percent), ties pessimistic.

    Args:
        logits: (N, L) clip-by-label scores.
        target: (N,) true label index per clip.
    Returns:
        ``top{k}`` for each k (k larger than L is clamped to L, i.e. 100 %).
    """
    ranks = ranks_single_relevant(logits, target)
    if ranks.numel() == 0:
        raise ValueError("topk_accuracy: no clips to evaluate")
    return {f"top{k}": 100.0 * (ranks <= k).double().mean().item() for k in ks}


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Average precision of one class over samples (scikit-learn's definition; ties = one threshold).

    Args:
        scores: (N,) score of every sample for the class.
        positive: (N,) bool ground truth.
    Returns:
        AP in [0, 1]; NaN when the class has no positive sample.
    """
    scores = scores.double().flatten()
    positive = torch.as_tensor(positive).bool().flatten()
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    s = scores[order]
    p = positive[order].double()
    tp = p.cumsum(0)
    seen = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    # Only the last position of each group of tied scores is a threshold.
    last_of_group = torch.ones_like(s, dtype=torch.bool)
    last_of_group[:-1] = s[:-1] != s[1:]
    tp, seen = tp[last_of_group], seen[last_of_group]
    precision = tp / seen
    recall = tp / n_pos
    prev_recall = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - prev_recall) * precision).sum())


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mAP (percent) over classes that have at least one positive.

    Args:
        scores: (N, L) scores; targets: (N, L) multi-hot ground truth.
    """
    _check_scores(scores)
    targets = torch.as_tensor(targets).bool()
    if targets.shape != scores.shape:
        raise ValueError(f"targets must have the shape of scores {tuple(scores.shape)}, got {tuple(targets.shape)}")
    aps = [average_precision(scores[:, j].cpu(), targets[:, j].cpu()) for j in range(scores.shape[1])]
    aps = [x for x in aps if not math.isnan(x)]
    if not aps:
        raise ValueError("mean_average_precision: no class has a positive sample")
    return 100.0 * sum(aps) / len(aps)


def zeroshot_metrics(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot classification metrics from clip-by-label scores.

    Args:
        logits: (N, L) scores.
        targets: (N, L) multi-hot labels; every clip needs at least one.
    Returns:
        If every clip has exactly one label: ``top1``, ``top5``, ``macro_recall`` (percent) and ``mAP``.
        Otherwise ``mAP`` plus ``top1`` meaning "the best-scoring label is one of the clip's".
    """
    _check_scores(logits)
    targets = torch.as_tensor(targets).bool()
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
    per_clip = targets.sum(1)
    if (per_clip == 0).any():
        raise ValueError("every clip needs at least one label for zero-shot metrics")
    out: dict[str, float] = {}
    if bool((per_clip == 1).all()):
        target = targets.float().argmax(1)
        out.update(topk_accuracy(logits, target, ks))
        out["macro_recall"] = macro_recall(logits, target)
    else:
        # Best label is one of the clip's: some true label beats every other label strictly
        # (a tie with a wrong label is a miss, the pessimistic rule).
        neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        best_true = torch.where(targets.to(logits.device), logits, neg_inf).max(1).values
        best_false = torch.where(targets.to(logits.device), neg_inf, logits).max(1).values
        out["top1"] = 100.0 * (best_true > best_false).double().mean().item()
    out["mAP"] = mean_average_precision(logits, targets)
    return out


def macro_recall(logits: Tensor, target: Tensor) -> float:
    """Balanced accuracy (percent): the mean over classes present in ``target`` of the share of their
    clips whose top-1 label is right (ties pessimistic, as in ``topk_accuracy``).

    With unbalanced classes top-1 rewards predicting the big class; this does not (a constant answer
    scores 1 / the number of classes present).

    Args:
        logits: (N, L) clip-by-label scores; target: (N,) true label index per clip.
    """
    recalls = [row["recall"] for row in per_class_recall(logits, target).values() if row["clips"]]
    if not recalls:
        raise ValueError("macro_recall: no clips to evaluate")
    return sum(recalls) / len(recalls)


def per_class_recall(logits: Tensor, target: Tensor) -> dict[int, dict[str, float | None]]:
    """For each class index present in ``target`` or answered: its ``clips``, ``recall`` (percent of
    them whose top-1 label is right, ties pessimistic; None for a class with no clips) and
    ``predicted`` (clips whose top-1 answer it is, ties to the lowest index). Shows which classes a
    model never finds and which ones it answers for everything, including labels with no clips in
    the set; ``macro_recall`` is the mean of ``recall`` over the classes with clips.
    """
    hit = ranks_single_relevant(logits, target) <= 1
    target = target.to(hit.device)
    answers = logits.argmax(1).to(hit.device)
    rows: dict[int, dict[str, float | None]] = {}
    for c in torch.unique(torch.cat([target, answers])).tolist():
        mine = target == c
        rows[int(c)] = {"clips": int(mine.sum()),
                        "recall": 100.0 * hit[mine].double().mean().item() if bool(mine.any()) else None,
                        "predicted": int((answers == c).sum())}
    return rows


def majority_baseline(targets: Tensor) -> dict[str, float]:
    """What always answering the most frequent label scores (single-label sets; percent):
    ``top1`` = that label's share, ``macro_recall`` = 1 / the number of labels present."""
    targets = torch.as_tensor(targets).bool()
    if not bool((targets.sum(1) == 1).all()):
        return {}
    counts = targets.sum(0)
    return {"top1": 100.0 * counts.max().item() / targets.shape[0],
            "macro_recall": 100.0 / int((counts > 0).sum())}


def zeroshot_chance(targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Expected zero-shot metrics for random scores: top-k = k/L and macro recall 1/L (single
    label), mAP ~ class prevalence."""
    targets = torch.as_tensor(targets).bool()
    n, n_labels = targets.shape
    per_clip = targets.sum(1).double()
    out: dict[str, float] = {}
    if bool((per_clip == 1).all()):
        for k in ks:
            out[f"top{k}"] = 100.0 * min(k, n_labels) / n_labels
        out["macro_recall"] = 100.0 / n_labels
    else:
        out["top1"] = 100.0 * (per_clip / n_labels).mean().item()
    prevalence = targets.double().mean(0)
    out["mAP"] = 100.0 * prevalence[prevalence > 0].mean().item()
    return out
