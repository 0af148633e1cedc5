"""Batched text generation with the model's cache (used by the `generate` eval suite and by training's
end-of-run sample).

    texts = generate(model, tokenizer, ["The state of", "We the people"], max_new_tokens=64,
                     temperature=0.8, top_k=50, top_p=0.95, seed=0)

Prompts are right-padded into one batch (per-row lengths), prefilled in one call, then decoded one
token per step inside a jitted `jax.lax.while_loop` that stops early once every row has emitted EOS.
It uses only the model contract's `init_cache / prefill / decode_step`, so any family with a cache
works. One compile per (batch, padded prompt length, max_new_tokens, sampling settings).

Sampling is in fp32, in Hugging Face's order: temperature, then top-k, then top-p (nucleus, over the
top-k renormalised). temperature=0 is greedy (argmax), whatever top-k/top-p say.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_MULTIPLE = 16  # prompt batches are padded to a multiple of this length: fewer distinct compiles


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")


def sample_logits(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token id per row (int32 [B]) from logits [B, V] under `sampling` (static Python values).

    top-p keeps the most probable tokens until their mass reaches top_p: sorted token j stays iff the
    mass of the tokens before it is < top_p (so the top token always stays). Done in sorted order and
    mapped back through the sort's indices, so ties never widen the nucleus or the top-k.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / sampling.temperature
    V = logits_BV.shape[-1]
    if not sampling.top_k and sampling.top_p == 1:
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
    k = min(sampling.top_k, V) if sampling.top_k else V
    top_BK, ids_BK = jax.lax.top_k(logits_BV, k)  # descending
    if sampling.top_p < 1:
        probs_BK = jax.nn.softmax(top_BK, axis=-1)
        mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
        top_BK = jnp.where(mass_before_BK < sampling.top_p, top_BK, -jnp.inf)
    choice_B = jax.random.categorical(key, top_BK, axis=-1)
    return jnp.take_along_axis(ids_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_id", "stop_at_eos"))
def _generate(state, tokens_BT, lengths_B, key, *, graphdef, max_new_tokens, sampling, eos_id, stop_at_eos):
    """-> (new tokens int32 [B, N], count of generated tokens per row [B]); after a row stops, eos_id."""
    model = nnx.merge(graphdef, state)
    B, T = tokens_BT.shape
    N = max_new_tokens
    cache = model.init_cache(B, T + N)
    logits_BV, cache = model.prefill(tokens_BT, lengths_B, cache)
    tok_B = sample_logits(logits_BV, jax.random.fold_in(key, 0), sampling)
    out_BN = jnp.full((B, N), eos_id, jnp.int32).at[:, 0].set(tok_B)
    count_B = jnp.ones((B,), jnp.int32)
    done_B = (tok_B == eos_id) if stop_at_eos else jnp.zeros((B,), bool)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < N) & ~jnp.all(done_B)

    def body(carry):
        i, tok_B, cache, out_BN, done_B, count_B = carry
        logits_BV, cache = model.decode_step(tok_B, cache)  # finished rows keep decoding EOS: harmless
        new_B = jnp.where(done_B, eos_id, sample_logits(logits_BV, jax.random.fold_in(key, i), sampling))
        count_B = count_B + ~done_B
        if stop_at_eos:
            done_B = done_B | (new_B == eos_id)
        return i + 1, new_B, cache, out_BN.at[:, i].set(new_B), done_B, count_B

    carry = (jnp.int32(1), tok_B, cache, out_BN, done_B, count_B)
    _, _, _, out_BN, _, count_B = jax.lax.while_loop(cond, body, carry)
    return out_BN, count_B


def generate_ids(model, prompts_ids, *, max_new_tokens: int, eos_id: int, sampling: Sampling = Sampling(),
                 seed: int = 0, stop_at_eos: bool = True, pad_batch_to: int = 0) -> tuple[list[list[int]], dict]:
    """Token-level generation for a batch of prompts (lists of ids; an empty prompt becomes [eos_id],
    the document separator the model was trained on). Returns the new ids per prompt (cut before EOS
    when stop_at_eos) and timings {"compile_s", "generate_s", "new_tokens"} (generate_s excludes
    compilation; new_tokens counts the sampled tokens of the given prompts, EOS included).
    pad_batch_to: run at least this many rows (dummy ones dropped), so batches of a suite share a compile."""
    n_real = len(prompts_ids)
    if max_new_tokens < 1 or not n_real:
        return [[] for _ in prompts_ids], {"compile_s": 0.0, "generate_s": 0.0, "new_tokens": 0}
    prompts_ids = [list(map(int, p)) or [eos_id] for p in prompts_ids]
    prompts_ids += [[eos_id]] * max(0, pad_batch_to - n_real)
    lengths = [len(p) for p in prompts_ids]
    T = -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens_BT = np.full((len(prompts_ids), T), eos_id, np.int32)
    for b, p in enumerate(prompts_ids):
        tokens_BT[b, : len(p)] = p
    graphdef, state = nnx.split(model)
    args = (state, jnp.asarray(tokens_BT), jnp.asarray(lengths, jnp.int32), jax.random.key(seed))
    static = dict(graphdef=graphdef, max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
                  stop_at_eos=stop_at_eos)
    t0 = time.perf_counter()
    _generate.lower(*args, **static).compile()  # fills jit's cache, so the call below is compile-free
    t1 = time.perf_counter()
    out_BN, count_B = jax.block_until_ready(_generate(*args, **static))
    t2 = time.perf_counter()
    out_BN, count_B = np.asarray(out_BN)[:n_real], np.asarray(count_B)[:n_real]
    rows = []
    for b in range(n_real):
        row = out_BN[b, : count_B[b]].tolist()
        if stop_at_eos and eos_id in row:
            row = row[: row.index(eos_id)]
        rows.append(row)
    return rows, {"compile_s": t1 - t0, "generate_s": t2 - t1, "new_tokens": int(count_B.sum())}


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> list[str]:
    """Completions (the new text only) of `prompts`, batched in one call."""
    ids = [tokenizer.encode(p) for p in prompts]
    rows, _ = generate_ids(model, ids, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                           sampling=Sampling(temperature, top_k, top_p), seed=seed, stop_at_eos=stop_at_eos)
    return [tokenizer.decode(np.asarray(r, np.int32)) for r in rows]
