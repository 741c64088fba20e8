"""``clapscale train CONFIG [section.field=value ...] [--resume auto|none|PATH]``.

Runs on one process, under ``torchrun --nproc_per_node N -m clapscale.train.cli ...``, or under
``srun`` (launch/pretrain.sh); the rank comes from the environment either way. Exit codes: 0 done
(or stopped at ``train.stop_at``), 1 failed, 2 bad command line or config, 3 stopped by
SIGTERM / SIGUSR1 after saving a checkpoint (requeue me).
"""

from __future__ import annotations

import argparse
import sys

EXIT_REQUEUE = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clapscale train",
        description="Train a CLAP model from a YAML recipe (see launch/ for SLURM and submitit).",
    )
    p.add_argument("config", help="YAML recipe, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 data.batch_size=8")
    p.add_argument("--resume", help="auto (newest complete checkpoint of this run), none, or a checkpoint directory; "
                   "same as train.resume=...")
    return p


def main(argv: list[str] | None = None) -> int:
    from clapscale.config import ConfigError, load_config

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"clapscale train: {e}", file=sys.stderr)
        return 2

    from clapscale.train.checkpoint import CheckpointWriteError
    from clapscale.train.distributed import describe_peer_failure, is_peer_failure, request_requeue
    from clapscale.train.loop import NonFiniteLossError, Trainer

    trainer = Trainer(cfg)
    try:
        result = trainer.train()
    except ConfigError as e:
        print(f"clapscale train: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointWriteError) as e:
        print(f"clapscale train: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        print(f"clapscale train: {describe_peer_failure(trainer.denv, e)}. The other ranks stop too; "
              "rerun with train.resume=auto to continue from the newest complete checkpoint", file=sys.stderr)
        return 1
    if result.stopped_by == "signal":
        request_requeue(trainer.denv)
        print(f"clapscale train: stopped by signal at step {result.step}; checkpoint {result.checkpoint}", flush=True)
        return EXIT_REQUEUE
    if trainer.denv.is_main:
        print(f"clapscale train: {result.stopped_by} at step {result.step}; checkpoint {result.checkpoint}"
              + (f"; model {result.export}" if result.export else ""), flush=True)
    return 0


if __name__ == "__main__":
    # torchrun / srun start this module directly: the same user-error rule as `clapscale train`.
    from clapscale.errors import debug_enabled, run_command

    sys.exit(run_command("clapscale train", main, sys.argv[1:], debug=debug_enabled()))
