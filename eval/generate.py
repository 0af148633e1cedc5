"""The `generate` eval suite: samples from a restored checkpoint with the model's cache.

The decoding itself (batched prefill + jitted decode loop, temperature / top-k / top-p sampling) lives in
`effax.models.generate`, where training's end-of-run sample uses it too.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from effax.models.generate import Sampling, generate, generate_ids, sample_logits  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------------------------------
# The eval suite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generate suite")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    g.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1: off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gen-batch", type=int, default=16, help="prompts generated together")


def run(ctx, opts) -> dict:
    """{"samples": [{"prompt", "completion"}], "tokens_per_s": new tokens / generation time (compilation
    excluded), "compile_s": ...}. With no prompt given: the run's `train.sample_prompt`, else ""."""
    prompts = list(getattr(opts, "prompt", None) or [])
    if getattr(opts, "prompts_file", None):
        with open(opts.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        prompts = [getattr(getattr(ctx.cfg, "train", None), "sample_prompt", "")]
    sampling = Sampling(getattr(opts, "temperature", 0.0), getattr(opts, "top_k", 0), getattr(opts, "top_p", 1.0))
    max_new, seed = getattr(opts, "max_new_tokens", 128), getattr(opts, "seed", 0)
    batch = max(1, min(getattr(opts, "gen_batch", 16), len(prompts)))
    tok = ctx.tokenizer
    samples, new_tokens, seconds, compile_s = [], 0, 0.0, 0.0
    with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            ids = [tok.encode(p) for p in chunk]
            rows, stats = generate_ids(ctx.model, ids, max_new_tokens=max_new, eos_id=tok.eos_id, sampling=sampling,
                                       seed=seed + start, stop_at_eos=True, pad_batch_to=batch)
            samples += [{"prompt": p, "completion": tok.decode(np.asarray(r, np.int32))} for p, r in zip(chunk, rows)]
            new_tokens += stats["new_tokens"]
            seconds += stats["generate_s"]
            compile_s += stats["compile_s"]
    return {"samples": samples, "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
            "new_tokens": new_tokens, "compile_s": compile_s}
