"""The `throughput` eval suite: prefill and decode speed of the model's cached inference path.

Measured on `--batch` rows of `--context` random prompt tokens, then `--decode-tokens` greedy decode
steps (one jitted loop, so host dispatch is not in the figure). Each phase runs once to compile and
warm up, then `--repeats` times; the median is reported. Timings end at `block_until_ready`.

FLOPs convention (the same as training MFU, `ModelConfig.flops_per_token(c) / 3` = forward FLOPs of
one token attending c keys; for dense 2 * matmul params + 4 * L * H * P * c, no causal halving):
  prefill = B * T * fwd(T) - B * (T - 1) * 2 * D * V   (the LM head runs at each row's last token only)
  decode  = B * sum over steps i = 1..N of fwd(T + i)  (the i-th new token attends the T + i keys up to
            itself; the cache's unused slots, which the XLA path also multiplies, are not counted)
MFU = FLOPs / (seconds * peak FLOP/s per chip * chips in the mesh), reported only for chips with a known
peak (`train.metrics.PEAK_FLOPS`); None elsewhere (CPU). Decode is memory-bound, so its MFU is small
by nature; `kv_cache_bytes` says how much cache each step reads.
Peak memory is the platform's `peak_bytes_in_use` (process-wide since start, so it includes restoring
the checkpoint; the largest over the mesh's devices), None where the platform does not report it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effax.train.metrics import peak_flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("throughput suite")
    g.add_argument("--batch", type=int, default=8, help="rows decoded together")
    g.add_argument("--context", type=int, default=256, help="prompt length (tokens)")
    g.add_argument("--decode-tokens", type=int, default=128, help="decode steps after the prompt")
    g.add_argument("--repeats", type=int, default=5, help="timed runs per phase (median reported)")


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up, not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_bytes(devices) -> int | None:
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # some platforms raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def flops(model_cfg, batch: int, context: int, decode_tokens: int) -> tuple[float, float]:
    """(prefill FLOPs, decode FLOPs) under the module docstring's convention."""
    fwd = lambda c: model_cfg.flops_per_token(c) / 3  # noqa: E731
    head = 2 * model_cfg.d_model * model_cfg.vocab_size
    prefill = batch * context * fwd(context) - batch * (context - 1) * head
    decode = batch * sum(fwd(context + i) for i in range(1, decode_tokens + 1))
    return prefill, decode


def measure(model, model_cfg, *, batch: int, context: int, decode_tokens: int, repeats: int, devices) -> dict:
    if min(batch, context, decode_tokens, repeats) < 1:
        raise ValueError("throughput: --batch, --context, --decode-tokens and --repeats must be >= 1")
    B, T, N = batch, context, decode_tokens
    graphdef, state = nnx.split(model)
    tokens_BT = jax.random.randint(jax.random.key(0), (B, T), 0, model_cfg.vocab_size, jnp.int32)
    lengths_B = jnp.full((B,), T, jnp.int32)

    @jax.jit
    def prefill(state, tokens_BT):
        m = nnx.merge(graphdef, state)
        return m.prefill(tokens_BT, lengths_B, m.init_cache(B, T + N))

    @jax.jit
    def decode(state, logits_BV, cache):
        m = nnx.merge(graphdef, state)

        def step(_, carry):
            logits_BV, cache = carry
            return m.decode_step(jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), cache)

        return jax.lax.fori_loop(0, N, step, (logits_BV, cache))

    prefill_s = _median_seconds(lambda: prefill(state, tokens_BT), repeats)
    logits_BV, cache = prefill(state, tokens_BT)
    decode_s = _median_seconds(lambda: decode(state, logits_BV, cache), repeats)

    prefill_flops, decode_flops = flops(model_cfg, B, T, N)
    peak = peak_flops(devices[0])
    mfu = (lambda f, s: f / (s * peak * len(devices))) if peak else (lambda f, s: None)
    return {
        "batch": B, "context": T, "decode_tokens": N, "repeats": repeats,
        "device": devices[0].device_kind, "n_devices": len(devices),
        "prefill_s": prefill_s, "prefill_tokens_per_s": B * T / prefill_s,
        "decode_s": decode_s, "decode_tokens_per_s": B * N / decode_s, "decode_ms_per_step": 1e3 * decode_s / N,
        "prefill_flops": prefill_flops, "decode_flops": decode_flops,
        "prefill_mfu": mfu(prefill_flops, prefill_s), "decode_mfu": mfu(decode_flops, decode_s),
        "kv_cache_bytes": int(sum(x.nbytes for x in jax.tree.leaves(cache))),
        "peak_bytes": _peak_bytes(devices),
    }  # fmt: skip


def run(ctx, opts) -> dict:
    devices = list(np.asarray(ctx.mesh.devices).flat)
    with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
        return measure(ctx.model, ctx.cfg.model, batch=getattr(opts, "batch", 8), context=getattr(opts, "context", 256),
                       decode_tokens=getattr(opts, "decode_tokens", 128), repeats=getattr(opts, "repeats", 5),
                       devices=devices)
