"""`clapscale eval`, `clapscale embed`, `clapscale zeroshot`.

``eval`` runs on one process or under torchrun (every rank evaluates its share; rank 0 prints and
writes the JSON). ``embed`` and ``zeroshot`` run on one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from clapscale.config import ConfigError
from clapscale.errors import UserError
from clapscale.eval.gather import command_ranks, default_device
from clapscale.eval.zeroshot import check_label_set

# Readable names for the metric keys in the printed table.
_LABELS = {
    "t2a": "text->audio",
    "a2t": "audio->text",
}


def _split_labels(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _read_labels(arg: str | None) -> list[str] | None:
    """``a,b,c`` or ``@file`` (one label per line) -> list; None when not given."""
    if arg is None:
        return None
    if arg.startswith("@"):
        path = Path(arg[1:])
        if not path.is_file():
            raise FileNotFoundError(f"label file not found: {path}")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return _split_labels(arg)


def _override(cfg, overrides: list[str]):
    """Apply ``section.field=value`` overrides to a loaded config (validated as a whole)."""
    import tempfile

    from clapscale.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cfg.to_yaml())
        return load_config(path, overrides)


def _fail(prog: str, err: Exception) -> int:
    print(f"clapscale {prog}: error: {err}", file=sys.stderr)
    return 2


def check_writable(path: str | Path, flag: str) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose another path") from e
    if not existed:
        path.unlink()


def format_results(results, checkpoint: str = "") -> str:
    """A plain-text table per task: metric, value, chance, and value / chance where higher is better."""
    lines = []
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint}")
    for r in results:
        info = ", ".join(f"{k} {v}" for k, v in r.info.items())
        lines.append("")
        lines.append(f"{r.task} on {r.spec} ({info})")
        majority = r.baseline
        lines.append(f"  {'metric':<24}{'value':>9}{'chance':>9}{'x chance':>10}" + (f"{'majority':>10}" if majority else ""))
        for k, v in r.metrics.items():
            direction, _, name = k.rpartition("/")
            shown = f"{_LABELS.get(direction, direction)} {name}".strip()
            chance = r.chance.get(k)
            chance_s = f"{chance:>9.2f}" if chance is not None else f"{'-':>9}"
            higher_is_better = "rank" not in name
            ratio_s = f"{v / chance:>10.1f}" if chance and higher_is_better else f"{'':>10}"
            base = majority.get(k)
            base_s = (f"{base:>10.2f}" if base is not None else f"{'-':>10}") if majority else ""
            lines.append(f"  {shown:<24}{v:>9.2f}{chance_s}{ratio_s}{base_s}")
    lines.append("")
    lines.append("Recall, mAP and accuracy in percent (higher is better); ranks are 1-based (lower is better);")
    lines.append("chance = the expected value for a random ranking.")
    if any(r.baseline for r in results):
        lines.append("majority = always answering the most frequent label; macro_recall = balanced accuracy.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- eval


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clapscale eval",
        description="Evaluate a checkpoint on shards: retrieval (R@1/5/10, mAP@10, ranks), zero-shot "
        "(top-1/top-5, mAP) or a linear probe. Run it under torchrun to split the work over ranks.",
    )
    p.add_argument("--checkpoint", required=True, help="exported model dir, trainer checkpoint dir or run dir")
    p.add_argument("--shards", help="shard spec to evaluate (default: the checkpoint config's data.val)")
    p.add_argument("--task",
                   help="comma-separated: retrieval, zeroshot, linear_probe (default: retrieval,zeroshot, "
                   "zeroshot left out when the shards carry no tags and no --labels are given)")
    p.add_argument("--labels", help="zero-shot labels: a,b,c or @file (default: every tag in the shards)")
    p.add_argument("--template", action="append",
                   help="zero-shot prompt with {label}; repeat to ensemble (default: 'This is a sound of {label}.')")
    p.add_argument("--probe-train", help="linear_probe: shard spec to fit the probe on")
    p.add_argument("--batch-size", type=int, help="clips per batch per rank (eval.batch_size)")
    p.add_argument("--max-clips", type=int, help="evaluate at most this many clips per split")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the checkpoint, e.g. data.workers=0")
    args = p.parse_args(argv)

    import dataclasses

    from clapscale.eval.gather import RankFailedError
    from clapscale.eval.runner import evaluate_tasks

    try:
        tasks = _split_labels(args.task or "retrieval,zeroshot")
        labels = _read_labels(args.labels)
        if labels is not None:
            labels = check_label_set(labels)
        from clapscale.models.loading import load_trained_model

        if args.out:
            check_writable(args.out, "--out")
        model, cfg = load_trained_model(args.checkpoint)
        if args.set:
            cfg = _override(cfg, args.set)
        ev = cfg.eval
        ev = dataclasses.replace(
            ev,
            batch_size=args.batch_size or ev.batch_size,
            max_clips=args.max_clips if args.max_clips is not None else ev.max_clips,
            templates=args.template or ev.templates,
            linear_probe_train=args.probe_train or ev.linear_probe_train,
        )
        ev.validate("eval")
        cfg = dataclasses.replace(cfg, eval=ev)
        specs = {t: args.shards for t in tasks} if args.shards else None
    except (ValueError, FileNotFoundError, ConfigError) as e:
        return _fail("eval", e)

    with command_ranks(args.device) as (rank, world_size, device):
        try:
            results = evaluate_tasks(
                model.to(device), cfg, rank=rank, world_size=world_size, device=device,
                tasks=tasks, specs=specs, labels=labels,
                # Default tasks on a caption-only set (Clotho, AudioCaps): report the retrieval it has.
                skip_unlabelled=args.task is None,
            )
        except (ValueError, FileNotFoundError, RankFailedError) as e:
            return _fail("eval", e)
    if rank == 0:
        print(format_results(results, args.checkpoint))
        skipped = [t for t in tasks if t not in {r.task for r in results}]
        if skipped:
            print(f"skipped {', '.join(skipped)}: the shards carry no tags; pass --labels to score them")
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"checkpoint": str(args.checkpoint), "world_size": world_size,
                       "results": [r.to_dict() for r in results]}
            out.write_text(json.dumps(payload, indent=2) + "\n")
            print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------- embed


def embed_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clapscale embed",
        description="Embed audio files (any format, length, sample rate, channels) into an (N, D) float32 "
        ".npy matrix, rows in the order the files are given. Deterministic. A file that cannot be read "
        "does not stop the others: its row is NaN, it is listed on stderr with the reason, and the exit "
        "code is 1.",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device")
    args = p.parse_args(argv)
    from clapscale.inference import load

    try:
        check_writable(args.out, "--out")
        clap = load(args.checkpoint, device=default_device(args.device))
        emb, failures = clap.embed_audio_files(args.files, batch_size=args.batch_size, progress=True)
    except (ValueError, FileNotFoundError) as e:
        return _fail("embed", e)
    out = Path(args.out)
    np.save(out, emb.numpy())
    for i, reason in failures.items():
        print(f"FAILED {args.files[i]}: {reason}", file=sys.stderr)
    print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32")
    if failures:
        print(f"clapscale embed: {len(failures)} of {len(args.files)} file(s) could not be embedded (listed above); "
              "their rows are NaN", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------- zeroshot


def zeroshot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clapscale zeroshot",
        description="Zero-shot classify audio files against labels (at least two): prints the top labels with "
        "probabilities. A file that cannot be read is listed on stderr with the reason and the others are "
        "still classified; the exit code is then 1.",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--labels", required=True, help="a,b,c or @file (one label per line)")
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument("--template", action="append", help="prompt with {label}; repeat to ensemble")
    p.add_argument("--top", type=int, default=3, help="labels shown per file")
    p.add_argument("--out", help="also write {file: {label: probability}} as JSON (files that were read)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device")
    args = p.parse_args(argv)
    from clapscale.inference import load

    try:
        labels = check_label_set(_read_labels(args.labels) or [])
        if args.out:
            check_writable(args.out, "--out")
        clap = load(args.checkpoint, device=default_device(args.device))
        probs, failures = clap.zero_shot_files(args.files, labels, templates=args.template,
                                               batch_size=args.batch_size, progress=len(args.files) > 1)
    except (ValueError, FileNotFoundError) as e:
        return _fail("zeroshot", e)
    table = {}
    for i, (f, row) in enumerate(zip(args.files, probs)):
        if i in failures:
            print(f"FAILED {f}: {failures[i]}", file=sys.stderr)
            continue
        order = torch.argsort(row, descending=True, stable=True)[: max(1, args.top)]
        print(f"{f}: " + ", ".join(f"{labels[j]} {row[j]:.3f}" for j in order.tolist()))
        table[f] = {lab: float(row[j]) for j, lab in enumerate(labels)}
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2) + "\n")
    if failures:
        print(f"clapscale zeroshot: {len(failures)} of {len(args.files)} file(s) could not be read (listed above)",
              file=sys.stderr)
        return 1
    return 0
