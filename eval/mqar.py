"""The `mqar` eval suite: multi-query associative recall accuracy of a restored model.

    effax eval --workdir DIR --suite mqar [--mqar-pairs 8 --mqar-seq-len 128 --mqar-examples 1000]

Generates `--mqar-examples` held-out examples (the val stream of train/mqar.py, never trained on) and
scores the model's argmax at each query key against the value stored with that key:

    accuracy      correct answers / queries (Zoology's metric)
    all_correct   share of examples whose every query is answered correctly

Settings default to the run's own (data.mqar_*) when it trained on mqar; otherwise to Zoology's
middle setting (T=128, 8 pairs, V=8192) with V clipped to the model's vocabulary. Chance level is
about 1/(V/2) for a model that has learnt the value half of the vocabulary, 1/V for random logits.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effax.train import mesh as mesh_lib
from effax.train.mqar import MQARSource, problem

DEFAULTS = {"seq_len": 128, "n_pairs": 8, "vocab": 8192, "power_a": 0.01}  # when the run did not train on mqar
OPTION = {"seq_len": "--mqar-seq-len", "n_pairs": "--mqar-pairs", "vocab": "--mqar-vocab", "power_a": "--mqar-power-a"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mqar suite (defaults: the run's data.mqar_* if it trained on mqar)")
    g.add_argument("--mqar-examples", type=int, default=1000, help="examples to score (default 1000)")
    g.add_argument("--mqar-pairs", type=int, default=None, help="key-value pairs per example (else 8)")
    g.add_argument("--mqar-seq-len", type=int, default=None, help="example length (else 128)")
    g.add_argument("--mqar-vocab", type=int, default=None, help="vocabulary (else 8192, clipped to the model's)")
    g.add_argument("--mqar-power-a", type=float, default=None, help="query-gap power law (else 0.01)")
    g.add_argument("--mqar-batch-size", type=int, default=None, help="sequences per forward pass (default 32, "
                   "rounded up to the mesh's batch axes)")


def _opt(opts, name: str):
    if opts is None:
        return None
    return opts.get(name) if isinstance(opts, dict) else getattr(opts, name, None)


def settings(cfg, opts) -> dict:
    """The generator settings: explicit options, else the run's mqar data, else DEFAULTS (vocab clipped)."""
    data, model_vocab = cfg.data, cfg.model.vocab_size
    if data.source == "mqar":
        base = {"seq_len": data.seq_len, "n_pairs": data.mqar_pairs, "vocab": data.mqar_vocab, "power_a": data.mqar_power_a}
    else:
        base = dict(DEFAULTS, vocab=min(DEFAULTS["vocab"], model_vocab))
    given = {"seq_len": _opt(opts, "mqar_seq_len"), "n_pairs": _opt(opts, "mqar_pairs"),
             "vocab": _opt(opts, "mqar_vocab"), "power_a": _opt(opts, "mqar_power_a")}
    s = {k: (given[k] if given[k] is not None else base[k]) for k in base}
    bad = problem(**s)
    if bad:
        raise ValueError(f"{OPTION[bad[0]]}: {bad[1]}")
    if s["vocab"] > model_vocab:
        raise ValueError(f"--mqar-vocab={s['vocab']} exceeds the model's vocabulary ({model_vocab}); "
                         f"use at most {model_vocab}")
    return s


def _scorer(model):
    """jit (batch) -> sums, with the model's parameters as an argument (not baked-in constants)."""

    def score(model, batch):
        logits, _ = model(batch["tokens"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
        query_BT = batch["loss_mask"] > 0
        correct_BT = (jnp.argmax(logits, axis=-1) == batch["targets"]) & query_BT
        n_correct_B, n_query_B = correct_BT.sum(axis=1), query_BT.sum(axis=1)
        real_B = n_query_B > 0  # padding rows carry no queries
        return {"correct": correct_BT.sum(), "queries": n_query_B.sum(),
                "all_correct": ((n_correct_B == n_query_B) & real_B).sum(), "examples": real_B.sum()}

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, batch: score(nnx.merge(graphdef, state), batch))
        return lambda batch: fn(state, batch)
    return jax.jit(lambda batch: score(model, batch))  # a plain callable (tests, foreign models)


def run(ctx, opts=None) -> dict:
    """Scores ctx.model on MQAR; returns accuracy, all_correct and the settings used."""
    s = settings(ctx.cfg, opts)
    n_examples = _opt(opts, "mqar_examples")
    n_examples = 1000 if n_examples is None else n_examples
    if n_examples < 1:
        raise ValueError(f"--mqar-examples must be positive, got {n_examples}")
    ways = mesh_lib.batch_ways(ctx.mesh)
    batch = _opt(opts, "mqar_batch_size")
    batch = ways * math.ceil(32 / ways) if batch is None else batch
    pcount, pidx = jax.process_count(), jax.process_index()
    if batch < 1 or batch % ways or batch % pcount:
        raise ValueError(f"--mqar-batch-size={batch} must be divisible by the mesh's batch axes (data × fsdp × expert = "
                         f"{ways}) and the process count ({pcount})")
    source = MQARSource(vocab=s["vocab"], seq_len=s["seq_len"], n_pairs=s["n_pairs"], power_a=s["power_a"],
                        split="val", length=n_examples)
    sharding = mesh_lib.batch_sharding(ctx.mesh, ctx.rules)
    local = batch // pcount
    totals = {"correct": 0, "queries": 0, "all_correct": 0, "examples": 0}
    with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
        score = _scorer(ctx.model)
        for start in range(0, n_examples, batch):
            rows = []
            for i in range(start + pidx * local, start + (pidx + 1) * local):
                row = source[min(i, n_examples - 1)]
                if i >= n_examples:  # pad the last batch to full size; no queries, so not counted
                    row = dict(row, loss_mask=np.zeros_like(row["loss_mask"]))
                rows.append(row)
            host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            out = jax.device_get(score({k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}))
            totals = {k: totals[k] + int(out[k]) for k in totals}
    assert totals["examples"] == n_examples, totals
    return {
        "accuracy": totals["correct"] / totals["queries"],
        "all_correct": totals["all_correct"] / totals["examples"],
        "queries": totals["queries"],
        "examples": totals["examples"],
        "pairs": s["n_pairs"], "seq_len": s["seq_len"], "vocab": s["vocab"], "power_a": s["power_a"],
    }
