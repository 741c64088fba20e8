"""`clapscale` command line: one subcommand per user task, each owned by its stage's module.

Each entry maps a subcommand to ``module:function``; the function takes the remaining argv and
returns an exit code. Modules are imported only when their command runs, so `clapscale --help`
stays fast and a broken optional stage cannot break the others. Every command runs under
``clapscale.errors.run_command``: a user error is one line on stderr and exit code 2, a bug keeps its
traceback (``--debug`` or ``CLAPSCALE_DEBUG=1`` shows tracebacks of user errors too).
"""

from __future__ import annotations

import importlib
import sys

from clapscale.errors import debug_enabled, run_command

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("clapscale.train.cli:main", "train a CLAP model from a YAML recipe (one node; see launch/ for clusters)"),
    "eval": ("clapscale.eval.cli:eval_main", "evaluate a checkpoint: retrieval or zero-shot on shards"),
    "embed": ("clapscale.eval.cli:embed_main", "embed audio files into a .npy matrix"),
    "zeroshot": ("clapscale.eval.cli:zeroshot_main", "zero-shot classify audio files against labels"),
    "models": ("clapscale.models.cli:models_main", "list towers with parameter counts and GFLOPs per 10 s clip"),
    "export-hf": ("clapscale.models.cli:export_hf_main", "export an HTSAT+RoBERTa model to a transformers ClapModel directory"),
    "import-hf": ("clapscale.models.cli:import_hf_main", "import a transformers ClapModel directory as a clapscale checkpoint"),
    "import-laion": ("clapscale.models.cli:import_laion_main", "import a whole laion_clap checkpoint (.pt) as a clapscale model"),
    "curate": ("clapscale.curate.cli:curate_main", "curate an Improvement-Set (DU / DS / ADS) with a teacher CLAP into new shards"),
    "shards": ("clapscale.shards.cli:main", "build, verify or index shards (same as tools/make_shards.py)"),
    "k2c": ("clapscale.k2c.cli:k2c_main", "keyword-to-caption: captions from tags with a local T5 into a new shard set (--train: train one)"),
    "caption": ("clapscale.caption.cli:main", "train a tag-guided captioner, generate synthetic captions, score them"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: clapscale [--debug] COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`clapscale COMMAND --help` describes each command. Errors in what you give a command are",
              "one line and exit code 2; --debug (or CLAPSCALE_DEBUG=1) adds their traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``clapscale [--debug] COMMAND args...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled()
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"clapscale: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return run_command(f"clapscale {name}", func, rest, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
