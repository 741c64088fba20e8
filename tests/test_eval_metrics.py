"""Metrics against hand-computed cases, an independent transcription of the Clotho/AudioCaps
reference evaluation (Mei et al., used by LAION-CLAP), exact enumeration for chance levels,
and scikit-learn for average precision and logistic regression."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from clapscale.eval.linear_probe import fit_linear_probe, linear_probe_metrics
from clapscale.eval.metrics import (
    average_precision,
    macro_recall,
    per_class_recall,
    majority_baseline,
    mean_average_precision,
    ranks_multi_relevant,
    ranks_single_relevant,
    retrieval_chance,
    retrieval_metrics,
    single_caption_retrieval,
    topk_accuracy,
    zeroshot_chance,
    zeroshot_metrics,
)


def test_multi_caption_retrieval_hand_computed():
    # clip 0 has captions 0 and 1, clip 1 has caption 2.
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1]))
    # t2a ranks: caption0 -> 1, caption1 -> 2, caption2 -> 1.
    assert m["t2a/R@1"] == pytest.approx(200 / 3)
    assert m["t2a/R@5"] == 100.0
    assert m["t2a/mean_rank"] == pytest.approx(4 / 3)
    assert m["t2a/median_rank"] == 1.0
    assert m["t2a/mAP@10"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    # a2t: clip0 ranked list c0, c2, c1 -> relevant at 1 and 3: AP = (1/1 + 2/3) / 2, best rank 1.
    #      clip1 ranked list c1, c2, c0 -> relevant at 2: AP = (1/2) / 1, best rank 2.
    assert m["a2t/R@1"] == 50.0
    assert m["a2t/R@5"] == 100.0
    assert m["a2t/mean_rank"] == 1.5
    assert m["a2t/median_rank"] == 1.0  # floor(median(1, 2)) as in the reference
    assert m["a2t/mAP@10"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 0.5) / 2)


def test_ties_are_pessimistic():
    # A collapsed model (all scores equal) gets no free hits.
    flat = torch.zeros(3, 3)
    m = single_caption_retrieval(flat)
    assert m["t2a/R@1"] == 0.0 and m["a2t/R@1"] == 0.0
    assert m["t2a/mean_rank"] == 3.0 and m["a2t/mean_rank"] == 3.0
    # Relevant captions tied with an irrelevant one sit behind it, in index order among themselves.
    ranks = ranks_multi_relevant(torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[True, True, False]]))
    assert ranks.tolist() == [[2, 3, 0]]
    m = retrieval_metrics(torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 1.0]]), torch.tensor([0, 0, 1]))
    assert m["a2t/mAP@10"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1.0) / 2)
    # Ties among relevant captions only do not hurt: both at the top.
    ranks = ranks_multi_relevant(torch.tensor([[0.9, 0.9, 0.1]]), torch.tensor([[True, True, False]]))
    assert ranks.tolist() == [[1, 2, 0]]
    assert ranks_single_relevant(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0])).tolist() == [2]
    assert topk_accuracy(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1]), ks=(1, 2))["top1"] == 0.0
    assert topk_accuracy(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1]), ks=(1, 2))["top2"] == 100.0


def _reference_clotho_eval(audio_embs: np.ndarray, cap_embs: np.ndarray, per: int):
    """Independent transcription of the reference Clotho/AudioCaps evaluation (argsort-based,
    audio embeddings repeated once per caption, `per` captions per clip)."""
    n = audio_embs.shape[0] // per
    audios = audio_embs[::per]
    # text -> audio
    t_ranks = np.zeros(per * n)
    for i in range(n):
        d = cap_embs[per * i : per * i + per] @ audios.T
        for j in range(per):
            order = np.argsort(d[j])[::-1]
            t_ranks[per * i + j] = np.where(order == i)[0][0]
    # audio -> text
    a_ranks = np.zeros(n)
    ap10 = np.zeros(n)
    for i in range(n):
        order = np.argsort(audios[i] @ cap_embs.T)[::-1]
        pos = np.array([np.where(order == c)[0][0] for c in range(per * i, per * i + per)])
        a_ranks[i] = pos.min()
        hits = np.sort(pos[pos < 10] + 1)
        ap10[i] = np.sum(np.arange(1, len(hits) + 1) / hits) / per if len(hits) else 0.0

    def summary(r):
        return {
            "R@1": 100 * np.mean(r < 1), "R@5": 100 * np.mean(r < 5), "R@10": 100 * np.mean(r < 10),
            "median_rank": np.floor(np.median(r)) + 1, "mean_rank": r.mean() + 1,
        }

    t = {f"t2a/{k}": v for k, v in summary(t_ranks).items()}
    t["t2a/mAP@10"] = 100 * np.sum(1 / (t_ranks[t_ranks < 10] + 1)) / len(t_ranks)
    a = {f"a2t/{k}": v for k, v in summary(a_ranks).items()}
    a["a2t/mAP@10"] = 100 * ap10.mean()
    return {**t, **a}


def test_matches_reference_clotho_evaluation():
    g = torch.Generator().manual_seed(0)
    n, per, d = 40, 5, 8
    audio = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    # Captions are noisy copies of their clip so ranks spread over the whole range.
    caps = torch.nn.functional.normalize(audio.repeat_interleave(per, 0) + 1.2 * torch.randn(n * per, d, generator=g), dim=1)
    ours = retrieval_metrics(audio @ caps.T, torch.arange(n).repeat_interleave(per))
    ref = _reference_clotho_eval(audio.repeat_interleave(per, 0).double().numpy(), caps.double().numpy(), per)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
    assert 5 < ours["t2a/R@1"] < 95 and 5 < ours["a2t/mAP@10"] < 95  # the case is not trivial


def test_chance_matches_exact_enumeration():
    owner = torch.tensor([0, 0, 1, 2])  # clip 0: two captions; C = 4, A = 3
    chance = retrieval_chance(owner, ks=(1, 2))
    a2t, t2a = [], []
    for perm in itertools.permutations(range(4)):
        sim = torch.tensor(perm, dtype=torch.float32).repeat(3, 1)  # every clip sees this ordering
        a2t.append(retrieval_metrics(sim, owner, ks=(1, 2)))
    for perm in itertools.permutations(range(3)):
        sim = torch.tensor(perm, dtype=torch.float32)[:, None].repeat(1, 4)
        t2a.append(retrieval_metrics(sim, owner, ks=(1, 2)))
    for key in ("R@1", "R@2", "mean_rank", "mAP@10"):
        assert chance[f"a2t/{key}"] == pytest.approx(np.mean([m[f"a2t/{key}"] for m in a2t])), key
        assert chance[f"t2a/{key}"] == pytest.approx(np.mean([m[f"t2a/{key}"] for m in t2a])), key


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        single_caption_retrieval(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="square"):
        single_caption_retrieval(torch.zeros(2, 3))


def test_zeroshot_single_label_hand_computed():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.4, 0.4, 0.1]])
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 1]), 3).bool()
    m = zeroshot_metrics(logits, targets, ks=(1, 2))
    # clip0 rank 1; clip1 rank 2; clip2 tied with label 0 -> rank 2 (pessimistic).
    assert m["top1"] == pytest.approx(100 / 3)
    assert m["top2"] == 100.0
    # class 0: scores (0.9, 0.2, 0.4), positive clip0 -> AP 1; class 1: (0.1, 0.3, 0.4),
    # positives clips 1,2 -> ranked 2,1 -> AP 1; class 2 has no positive -> skipped.
    assert m["mAP"] == pytest.approx(100.0)
    # macro recall: class 0 (clip0 right) 1.0, class 1 (clip1 wrong, clip2 tie -> wrong) 0.0.
    assert m["macro_recall"] == pytest.approx(50.0)
    assert zeroshot_chance(targets, ks=(1, 2)) == {
        "top1": pytest.approx(100 / 3), "top2": pytest.approx(200 / 3), "macro_recall": pytest.approx(100 / 3),
        "mAP": pytest.approx(50.0)}
    # Majority baseline: always label 1 -> 2 of 3 clips right; recall 1 for class 1, 0 for class 0.
    assert majority_baseline(targets) == {"top1": pytest.approx(200 / 3), "macro_recall": pytest.approx(50.0)}
    assert majority_baseline(torch.tensor([[1, 1, 0]]).bool()) == {}  # multi-label: no single answer


def test_macro_recall_matches_sklearn_balanced_accuracy():
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        target = torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(1, 5, (12,), generator=g)])
        logits = torch.randn(52, 5, generator=g) + 1.5 * torch.nn.functional.one_hot(target, 5)
        assert macro_recall(logits, target) == pytest.approx(
            100 * skm.balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy()))


def test_per_class_recall_matches_sklearn_recall_and_counts_answers():
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(4)
    target = torch.cat([torch.zeros(30, dtype=torch.long), torch.randint(2, 5, (20,), generator=g)])  # class 1 absent
    logits = torch.randn(50, 5, generator=g) + torch.nn.functional.one_hot(target, 5)
    logits[:3, 1] = 100.0  # class 1 has no clips but takes three answers: it is listed
    rows = per_class_recall(logits, target)
    present = sorted(set(target.tolist()))
    assert sorted(rows) == sorted(present + [1])
    answers = logits.argmax(1).numpy()
    assert rows[1] == {"clips": 0, "recall": None, "predicted": int((answers == 1).sum())}
    assert rows[1]["predicted"] >= 3
    want = skm.recall_score(target.numpy(), answers, labels=present, average=None)
    for c, r in zip(present, want):
        assert rows[c]["recall"] == pytest.approx(100 * r)
        assert rows[c]["clips"] == int((target == c).sum()) and rows[c]["predicted"] == int((answers == c).sum())


def test_average_precision_matches_sklearn_with_ties():
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = torch.randint(0, 4, (30,), generator=g).double()  # many ties
        positive = torch.rand(30, generator=g) < 0.3
        if positive.sum() == 0:
            continue
        assert average_precision(scores, positive) == pytest.approx(
            skm.average_precision_score(positive.numpy(), scores.numpy())
        )
    # Hand case with a tie group: scores (3, 2, 2, 1), positives at 0 and 2.
    # thresholds: 3 -> P=1, R=.5 ; 2 -> P=2/3, R=1 ; AP = .5*1 + .5*2/3
    assert average_precision(torch.tensor([3.0, 2, 2, 1]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5 + 1 / 3)
    scores = torch.randn(25, 6, generator=g)
    targets = torch.rand(25, 6, generator=g) < 0.4
    assert mean_average_precision(scores, targets) == pytest.approx(
        100 * skm.average_precision_score(targets.numpy(), scores.numpy(), average="macro")
    )


def test_zeroshot_multi_label():
    logits = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.7]])
    targets = torch.tensor([[0, 1, 1], [1, 0, 1]]).bool()
    m = zeroshot_metrics(logits, targets)
    # top1 = best label is one of the clip's labels: clip0 best is label 0 (no), clip1 label 2 (yes).
    assert m["top1"] == 50.0
    assert "top5" not in m
    with pytest.raises(ValueError, match="at least one label"):
        zeroshot_metrics(logits, torch.zeros(2, 3, dtype=torch.bool))


def test_linear_probe_matches_sklearn():
    lm = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(2)
    n, d, k = 120, 6, 3
    centers = torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    x = centers[y] + 0.9 * torch.randn(n, d, generator=g)
    wd = 1e-2
    probe = fit_linear_probe(x, y, weight_decay=wd)
    ref = lm.LogisticRegression(C=1.0 / (wd * n), tol=1e-12, max_iter=10000).fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(probe.predict_proba(x).numpy(), ref.predict_proba(x.double().numpy()), atol=1e-5)
    # Deterministic: a second fit is bit-identical.
    again = fit_linear_probe(x, y, weight_decay=wd)
    assert torch.equal(probe.weight, again.weight)


def test_linear_probe_metrics_separable_and_multilabel():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(60) % 4
    x = torch.nn.functional.one_hot(y, 4).float() * 3 + 0.1 * torch.randn(60, 4, generator=g)
    m = linear_probe_metrics(x[:40], y[:40], x[40:], y[40:])
    assert m["top1"] == 100.0
    multi = torch.stack([y % 2 == 0, y >= 2], 1)
    m = linear_probe_metrics(x[:40], multi[:40], x[40:], multi[40:])
    assert m["mAP"] == 100.0
    with pytest.raises(ValueError, match="weight_decay"):
        fit_linear_probe(x, y, weight_decay=0.0)
    assert not math.isnan(m["mAP"])


def test_multilabel_top1_matches_rank_definition():
    g = torch.Generator().manual_seed(4)
    logits = torch.randint(0, 3, (50, 5), generator=g).float()  # plenty of ties
    targets = torch.rand(50, 5, generator=g) < 0.4
    targets[:, 0] |= targets.sum(1) == 0
    targets[0] = True  # no wrong label at all: always a hit
    ranks = ranks_multi_relevant(logits, targets)
    best = torch.where(targets, ranks, 10**9).min(1).values
    if bool((targets.sum(1) == 1).all()):
        pytest.skip("random draw happened to be single-label")
    assert zeroshot_metrics(logits, targets)["top1"] == pytest.approx(100 * (best <= 1).double().mean().item())
