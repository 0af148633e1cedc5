"""The eval suites by name. Each is `run(ctx: EvalContext, opts: argparse.Namespace) -> dict` of JSON-able
figures; its module may define `add_arguments(parser)` for its own options (prefix them with the suite's
name, e.g. --mqar-keys, to stay clear of the others). Modules are imported only when used."""

from __future__ import annotations

import importlib
import importlib.util

SUITES = {
    "loss": "effax.eval.loss:run_loss",
    "bpb": "effax.eval.loss:run_bpb",
    "mqar": "effax.eval.mqar:run",
    "generate": "effax.eval.generate:run",
    "throughput": "effax.eval.throughput:run",
}

# Suites whose figures depend on --data / --split (their results are filed per corpus).
DATA_SUITES = ("loss", "bpb")


def _module_name(suite: str) -> str:
    return SUITES[suite].partition(":")[0]


def available(suite: str) -> bool:
    """Registered and its module exists (a suite still being written is listed but not available)."""
    return suite in SUITES and importlib.util.find_spec(_module_name(suite)) is not None


def parse(text: str) -> list[str]:
    """"loss,bpb" → ["loss", "bpb"]; unknown or not-yet-present suites raise ValueError naming them."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("--suite is empty; choose from " + ", ".join(SUITES))
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        if not available(name):
            raise ValueError(f"suite {name!r} is registered but its module {_module_name(name)} is not installed")
    return list(dict.fromkeys(names))


def get(suite: str):
    module, _, function = SUITES[suite].partition(":")
    return getattr(importlib.import_module(module), function)


def add_arguments(parser) -> None:
    """Lets every present suite module add its options (once per module)."""
    for module in dict.fromkeys(_module_name(s) for s in SUITES if available(s)):
        add = getattr(importlib.import_module(module), "add_arguments", None)
        if add is not None:
            add(parser)
