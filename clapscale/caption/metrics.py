"""Caption quality: BLEU-4 (sacrebleu), ROUGE-L (Google's rouge-score), tag recall (ours).

- ``bleu4``: corpus BLEU with up to 4-grams, sacrebleu's ``corpus_bleu`` (13a tokenisation,
  lower-cased, no smoothing beyond sacrebleu's default "exp"), as a fraction in [0, 1]. Clips with
  fewer references than the most are padded with ``None`` streams (sacrebleu skips them).
- ``rouge_l``: mean over clips of the best ROUGE-L F-measure against any reference
  (``rouge_scorer.RougeScorer(["rougeL"]).score_multi``).
- ``tag_recall``: the share of (clip, tag) pairs whose tag appears in the clip's caption: every
  word of the tag (underscores read as spaces, lower-cased) is a word of the caption. Measures
  whether the guidance reached the text.

METEOR and CIDEr are not computed: the maintained packages that provide them need a Java runtime
(METEOR 1.5 jar) or are unmaintained (pycocoevalcap, last release 2020).
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] of ``hypotheses`` against each clip's ``references`` (sacrebleu)."""
    import sacrebleu

    _check(hypotheses, references)
    most = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return sacrebleu.corpus_bleu(hypotheses, streams, lowercase=True).score / 100.0


def rouge_l(hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean over clips of the best ROUGE-L F-measure against the clip's references (rouge-score)."""
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return sum(scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)) / len(hypotheses)


def tag_recall(hypotheses: list[str], tags: list[list[str]]) -> float:
    """Share of (clip, tag) pairs whose tag's words all occur in the clip's caption; nan without tags."""
    hits = total = 0
    for hyp, clip_tags in zip(hypotheses, tags, strict=True):
        words = set(_words(hyp))
        for tag in clip_tags:
            total += 1
            hits += all(w in words for w in _words(tag.replace("_", " ")))
    return hits / total if total else float("nan")


def caption_metrics(hypotheses: list[str], references: list[list[str]], tags: list[list[str]]) -> dict[str, float]:
    """``{"bleu4", "rouge_l", "tag_recall", "clips"}`` of one set of generated captions."""
    return {"bleu4": bleu4(hypotheses, references), "rouge_l": rouge_l(hypotheses, references),
            "tag_recall": tag_recall(hypotheses, tags), "clips": float(len(hypotheses))}


def _check(hypotheses: list[str], references: list[list[str]]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need one reference list per hypothesis (got {len(hypotheses)} hypotheses, "
                         f"{len(references)} reference lists)")
    if any(not r for r in references):
        raise ValueError("every clip needs at least one reference caption")
