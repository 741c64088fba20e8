"""Distributed-safe evaluation: the code path shared by ``clapscale eval`` and the trainer.

Every rank calls ``evaluate`` (never rank 0 alone: under ZeRO-3 each forward gathers
parameters from all ranks). Each rank embeds its share of the split, the embeddings are gathered,
and the metrics are computed from the same gathered tensors on every rank, so every rank returns
the same numbers, and they do not depend on the number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from clapscale.config import Config
from clapscale.eval.embedding import EmbeddedSplit, EmptySplitError, embed_split, make_text_encoder
from clapscale.eval.gather import gather_objects
from clapscale.eval.linear_probe import linear_probe_metrics
from clapscale.eval.metrics import (
    majority_baseline, per_class_recall, retrieval_chance, retrieval_metrics, zeroshot_chance,
)
from clapscale.eval.zeroshot import NoLabelsError, encode_labels, targets_from_tags, zeroshot_result, zeroshot_scores

TASKS = ("retrieval", "zeroshot", "linear_probe", "image_retrieval")

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """One task on one split: metrics, their chance levels and, for single-label zero-shot, what
    always answering the most frequent label scores (``baseline``; same keys where defined)."""

    task: str
    spec: str
    metrics: dict[str, float]
    chance: dict[str, float]
    info: dict[str, object] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def unwrap(model: nn.Module) -> nn.Module:
    """The CLAP module itself, from a DeepSpeed engine or DDP wrapper (``.module``)."""
    while not hasattr(model, "encode_audio") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "encode_audio") or not hasattr(model, "encode_text"):
        raise TypeError(f"{type(model).__name__} has no encode_audio / encode_text: pass a clapscale ClapModel")
    return model


def task_spec(cfg: Config, task: str) -> str:
    """The shard spec a task evaluates: ``eval.<task>`` or, when empty, ``data.val``."""
    if task == "linear_probe":
        return cfg.eval.linear_probe_test or cfg.data.val
    return getattr(cfg.eval, task) or cfg.data.val


def limit_spec(spec: str, max_clips: int) -> str:
    """The leading shards of ``spec`` (spec order) that hold its first ``max_clips`` samples.

    ``eval.max_clips`` keeps the ``max_clips`` smallest sample keys of these shards (``embed_split``),
    a subset that depends on the spec alone, never on the world size; reading only these shards is
    what bounds the cost. Shard sizes come from ``shard_sizes`` (``sizes.json``, the manifest, ``.idx``
    or a header scan), as the evaluation loader's split over ranks does. Bad samples in these shards
    leave fewer than ``max_clips`` clips. ``max_clips == 0`` returns ``spec`` unchanged.
    """
    if not max_clips:
        return spec
    from clapscale.data.specs import all_urls, parse_spec, shard_sizes

    urls = all_urls(parse_spec(spec))
    sizes = shard_sizes(urls)
    total = 0
    for n, url in enumerate(urls, 1):
        total += sizes[url]
        if total >= max_clips:
            # Expanded URLs carry no braces, so '::' joins them into a spec of one source each.
            return spec if n == len(urls) else "::".join(urls[:n])
    return spec


def _eval_loader(cfg: Config, spec: str, rank: int, world_size: int):
    from clapscale.data import build_loader

    data = dataclasses.replace(cfg.data, batch_size=cfg.eval.batch_size)
    return build_loader(dataclasses.replace(cfg, data=data), spec, rank=rank, world_size=world_size, train=False)


def evaluate_tasks(
    model: nn.Module,
    cfg: Config,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    tasks: list[str] | None = None,
    specs: dict[str, str] | None = None,
    labels: list[str] | None = None,
    tokenizer: Callable[[list[str]], dict] | None = None,
    loader_factory: Callable[[str], object] | None = None,
    skip_unlabelled: bool = False,
) -> list[TaskResult]:
    """Run ``tasks`` (default ``cfg.eval.tasks``) and return one ``TaskResult`` each, identical on all ranks.

    Args:
        model: a ClapModel (or an engine / wrapper holding one in ``.module``).
        specs: per-task shard spec overriding ``task_spec(cfg, task)``.
        labels: zero-shot / linear-probe label set; default ``cfg.eval.labels`` or, if that is empty,
            the sorted set of every tag in the split.
        loader_factory: spec -> iterable of batches for this rank (default: ``clapscale.data.build_loader``
            with ``train=False`` and ``eval.batch_size``).
        skip_unlabelled: leave out (with a warning) zero-shot / linear-probe tasks whose split has no
            usable tags, instead of raising ``NoLabelsError`` (periodic eval in training uses this:
            a caption-only validation set must not end a run). Every rank decides alike.
    """
    from clapscale.features import AudioFrontend

    tasks = list(cfg.eval.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; choose from {', '.join(TASKS)}")
    specs = dict(specs or {})
    for t in tasks:
        specs.setdefault(t, task_spec(cfg, t))
        if not specs[t]:
            raise ValueError(f"no shards to evaluate {t!r} on: set eval.{t} or data.val (or pass --shards)")
    if "linear_probe" in tasks and not cfg.eval.linear_probe_train:
        raise ValueError("the linear_probe task needs eval.linear_probe_train (a shard spec with tagged clips)")
    labels = list(labels if labels is not None else cfg.eval.labels) or None

    clap = unwrap(model)
    if tokenizer is None:
        from clapscale.models import build_tokenizer

        tokenizer = build_tokenizer(cfg.model.text)
    make_loader = loader_factory or (lambda spec: _eval_loader(cfg, spec, rank, world_size))
    frontend = AudioFrontend(cfg.audio).to(device)
    max_clips = cfg.eval.max_clips

    was_training = clap.training
    clap.eval()
    try:
        cache: dict[str, EmbeddedSplit] = {}
        skip_log: dict[str, dict[str, int]] = {}
        caption_specs = {specs["retrieval"]} if "retrieval" in tasks else set()
        image_specs = {specs["image_retrieval"]} if "image_retrieval" in tasks else set()

        def split(spec: str) -> EmbeddedSplit:
            # Each spec is embedded once; captions only where retrieval needs them.
            if spec not in cache:
                loader = make_loader(limit_spec(spec, max_clips))
                error = None
                try:
                    cache[spec] = embed_split(
                        clap, frontend, tokenizer, loader, world_size=world_size, device=device,
                        with_captions=spec in caption_specs, max_clips=max_clips, with_images=spec in image_specs,
                    )
                except EmptySplitError as e:  # raised on every rank alike, so the gather below pairs up
                    error = e
                skipped = _gather_skipped(loader, world_size)
                if error is not None:
                    detail = f"; samples skipped: {skipped}" if skipped else ""
                    raise ValueError(f"no sample could be read from {spec!r}{detail}") from error
                skip_log[spec] = skipped
            return cache[spec]

        encode_texts = make_text_encoder(clap, tokenizer, device, cfg.eval.batch_size)

        def run(task: str, spec: str) -> TaskResult:
            if task == "retrieval":
                return retrieval_task(split(spec), spec)
            if task == "image_retrieval":
                return image_retrieval_task(split(spec), spec)
            if task == "zeroshot":
                return zeroshot_task(split(spec), spec, labels, encode_texts, cfg.eval.templates)
            return _linear_probe(split(cfg.eval.linear_probe_train), split(spec), labels, cfg, spec)

        results = []
        for task in tasks:
            spec = specs[task]
            try:
                result = run(task, spec)
            except NoLabelsError as e:
                if not skip_unlabelled:
                    raise
                log.warning("evaluation task %s on %s skipped: %s", task, spec, e)
                continue
            if skip_log.get(spec):
                # A skipped sample changes the numbers: say so next to them.
                result.info["skipped"] = skip_log[spec]
            results.append(result)
        return results
    finally:
        clap.train(was_training)


def retrieval_task(es: EmbeddedSplit, spec: str) -> TaskResult:
    """Retrieval metrics (one or several captions per clip) of an embedded split."""
    return TaskResult(
        "retrieval", spec, retrieval_metrics(es.audio @ es.captions.T, es.caption_to_audio),
        retrieval_chance(es.caption_to_audio),
        {"clips": len(es.keys), "captions": int(es.captions.shape[0])},
    )


def image_retrieval_task(es: EmbeddedSplit, spec: str) -> TaskResult:
    """Audio<->image retrieval of a tri-modal model: each clip's own picture is its one relevant item.
    Keys ``i2a/...`` (picture queries, clips ranked) and ``a2i/...`` (clip queries, pictures ranked)."""
    def rename(metrics: dict[str, float]) -> dict[str, float]:
        return {k.replace("t2a/", "i2a/").replace("a2t/", "a2i/"): v for k, v in metrics.items()}

    owner = torch.arange(len(es.keys))
    return TaskResult(
        "image_retrieval", spec, rename(retrieval_metrics(es.audio @ es.images.T, owner)),
        rename(retrieval_chance(owner)), {"clips": len(es.keys)},
    )


@torch.inference_mode()
def zeroshot_task(
    es: EmbeddedSplit,
    spec: str,
    labels: list[str] | None,
    encode_texts: Callable[[list[str]], torch.Tensor],
    templates: list[str],
) -> TaskResult:
    """Zero-shot metrics of an embedded split against ``labels`` (None: every tag in the split).

    Every rank calls this with the same labels, so the text forwards pair up under ZeRO-3.
    """
    targets = targets_from_tags(es.tags, labels)
    label_emb = encode_labels(encode_texts, targets.labels, templates).cpu()
    metrics, chance = zeroshot_result(es.audio, label_emb, targets)
    info: dict[str, object] = {
        "clips": int(targets.kept.numel()), "labels": len(targets.labels), "clips_without_label": targets.dropped,
        "multi_label": bool((targets.targets.sum(1) > 1).any()),
    }
    if not info["multi_label"]:
        scores = zeroshot_scores(es.audio[targets.kept], label_emb)
        rows = per_class_recall(scores, targets.targets.float().argmax(1))
        info["per_class"] = {targets.labels[c]: row for c, row in rows.items()}
    return TaskResult("zeroshot", spec, metrics, chance, info, majority_baseline(targets.targets))


def _linear_probe(train_es: EmbeddedSplit, test_es: EmbeddedSplit, labels, cfg: Config, spec: str) -> TaskResult:
    if labels is None:
        labels = sorted({t for clip in train_es.tags for t in clip})
    tr = targets_from_tags(train_es.tags, labels)
    te = targets_from_tags(test_es.tags, tr.labels)
    single = bool((tr.targets.sum(1) == 1).all() and (te.targets.sum(1) == 1).all())
    if single:
        ytr, yte = tr.targets.float().argmax(1), te.targets.float().argmax(1)
    else:
        ytr, yte = tr.targets, te.targets
    metrics = linear_probe_metrics(
        train_es.audio[tr.kept], ytr, test_es.audio[te.kept], yte, weight_decay=cfg.eval.linear_probe_weight_decay
    )
    chance = zeroshot_chance(te.targets)
    chance = {k: v for k, v in chance.items() if k in metrics}
    return TaskResult(
        "linear_probe", spec, metrics, chance,
        {"train_clips": int(tr.kept.numel()), "clips": int(te.kept.numel()), "labels": len(tr.labels)},
    )


def _gather_skipped(loader, world_size: int) -> dict[str, int]:
    """Bad samples the loaders of all ranks skipped, by reason (summed)."""
    total: dict[str, int] = {}
    for part in gather_objects(dict(getattr(loader, "skipped", {}) or {}), world_size):
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + int(n)
    return total


def flatten(results: list[TaskResult]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for logging (TensorBoard scalars)."""
    return {f"{r.task}/{k}": float(v) for r in results for k, v in r.metrics.items()}


def evaluate(
    model: nn.Module,
    cfg: Config,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    tokenizer: Callable[[list[str]], dict] | None = None,
) -> dict[str, float]:
    """Run ``cfg.eval.tasks`` on their splits; every rank must call this and gets the same dict.

    Keys: ``retrieval/t2a/R@1`` ... ``retrieval/a2t/mAP@10``, ``zeroshot/top1``, ``zeroshot/mAP``,
    ``linear_probe/top1`` ... (percent; ranks 1-based). The model is put in eval mode and restored.
    A zero-shot / linear-probe task whose split carries no tags is skipped with a warning.
    """
    results = evaluate_tasks(
        model, cfg, rank=rank, world_size=world_size, device=device, tokenizer=tokenizer, skip_unlabelled=True
    )
    return flatten(results)
