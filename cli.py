"""The `effax` command: the front door. It knows every subcommand and imports each one lazily, so
`effax --help` is instant and no library folder imports this file."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("effax.train.cli", "train a model from an experiment file, or resume a run"),
    "prepare": ("effax.train.prepare", "tokenize a corpus into ArrayRecord shards (optionally train a BPE)"),
    "eval": ("effax.eval.cli", "evaluate checkpoints: loss, bpb, MQAR, generation, throughput (--watch for new ones)"),
    "fit": ("effax.eval.fits.cli", "scaling-law fits, plots and a report from a sweep root"),
    "sweep": ("effax.train.sweeps.cli", "launch, resume and inspect a sweep of runs"),
    "bench": ("effax.train.bench", "performance tables: model (a config's training step), attention, kernels, peer, profile"),
}

USAGE = "usage: effax COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    f"  {name:<9} {desc}" for name, (_, desc) in COMMANDS.items()
) + "\n\n`effax COMMAND --help` explains each one."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(f"effax: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
