"""Multi-query associative recall (MQAR, Zoology: Arora, Eyuboglu et al. 2023), generated on the fly.

One example of `seq_len` T with `n_pairs` n, vocabulary V, is a stream w of T + 1 tokens
(inputs w[:T], targets w[1:], as the packed windows of train/data.py):

    k_1 v_1 k_2 v_2 … k_n v_n | x x k_3 v_3 x x x x k_1 v_1 x … x
    └──── 2n: the pairs ─────┘ └──── the query region: T + 1 - 2n ────┘

* Keys are n distinct ids from [0, V//2), values n distinct ids from [V//2, V) (Zoology's halves).
* Every key is queried exactly once: the query region is cut into S = (T - 2n) // 2 two-token slots;
  the n slots are drawn without replacement with P(slot s) ∝ (s + 1)^(power_a - 1), s = 0 … S-1, and
  the i-th pair is queried in the i-th slot drawn (as in Zoology's `multiquery_ar`). power_a = 0.01
  (Zoology's default) makes P ≈ 1/(s+1): short gaps dominate, as for repeated bigrams in real text;
  power_a = 1 is uniform. A query is its key followed by its value, so the value is the target at
  the key's position. Scored positions (`loss_mask` = 1) are exactly those query keys.
* Every other token is noise, uniform over the vocabulary *minus this example's keys*, so the only
  earlier occurrence of a query key is its pair and recall is unambiguous.

Differences from Zoology: the value follows its query in the input (Zoology leaves random noise
there), and noise avoids the example's keys (Zoology's may repeat one, which makes a few queries
ambiguous).

Example i of (split, seed) is a pure function of them, drawn from `np.random.default_rng([split id,
seed, i])`: random access for grain, identical on every process and after a resume; train and val
are different streams whatever the seed.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from effax.train.tokenizer import DataError

__all__ = ["MQARSource", "problem", "SPLITS", "TRAIN_EXAMPLES", "VAL_EXAMPLES"]

SPLITS = {"train": 0, "val": 1}  # the first entropy word: the two splits never share a stream
TRAIN_EXAMPLES = 2**40  # "infinite": a step draws at most a few thousand examples
VAL_EXAMPLES = 4096  # finite, so that "all validation batches" means something


def problem(*, vocab: int, seq_len: int, n_pairs: int, power_a: float) -> tuple[str, str] | None:
    """(parameter name, what is wrong) for the first bad MQAR setting, or None. Callers name the key
    in their own terms (data.mqar_pairs, --mqar-pairs, …)."""
    if n_pairs < 1:
        return "n_pairs", f"must be at least 1, got {n_pairs}"
    if seq_len < 4 * n_pairs:
        return "seq_len", (f"{seq_len} is too short for {n_pairs} pairs: the pairs take 2n tokens and the n "
                           f"queries (key, value) need n of the (seq_len - 2n) // 2 slots, so seq_len >= 4n = {4 * n_pairs}")
    if vocab // 2 < n_pairs:
        return "vocab", (f"{vocab} is too small for {n_pairs} distinct keys in [0, vocab//2) and values in "
                         f"[vocab//2, vocab); use at least {2 * n_pairs}")
    if not (math.isfinite(power_a) and power_a > 0):
        return "power_a", f"must be a positive number (0.01: Zoology's power law; 1: uniform gaps), got {power_a}"
    return None


class MQARSource:
    """grain RandomAccessDataSource: example i as the dict of [T] arrays of train/data.py (KEYS).

    tokens, targets int32; positions 0..T-1; segment_ids all 1 (one example per row); loss_mask 1.0
    exactly at the n query keys; target_bytes = loss_mask (so "bits per byte" is bits per answer)."""

    def __init__(self, *, vocab: int, seq_len: int, n_pairs: int, power_a: float = 0.01, seed: int = 0,
                 split: str = "train", length: int | None = None):
        bad = problem(vocab=vocab, seq_len=seq_len, n_pairs=n_pairs, power_a=power_a)
        if bad:
            raise DataError(f"MQAR {bad[0]}: {bad[1]}")
        if split not in SPLITS:
            raise DataError(f"MQAR split must be one of {list(SPLITS)}, got {split!r}")
        self.vocab, self.seq_len, self.n_pairs, self.power_a = vocab, seq_len, n_pairs, power_a
        self.seed, self.split = seed, split
        self._len = length if length is not None else (TRAIN_EXAMPLES if split == "train" else VAL_EXAMPLES)
        slots = np.arange(1, (seq_len - 2 * n_pairs) // 2 + 1, dtype=np.float64)
        p = slots ** (power_a - 1.0)  # Zoology's power_a * s^(power_a - 1); the constant cancels
        self._slot_p = p / p.sum()
        self.num_tokens = self._len * seq_len  # for TrainIterator's fingerprint
        self.name = f"the {split} split of mqar (V={vocab}, T={seq_len}, pairs={n_pairs}, a={power_a}, seed={seed})"

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        index = operator.index(index)
        if not 0 <= index < self._len:
            raise IndexError(f"MQAR example {index} out of range [0, {self._len})")
        # SeedSequence words must be non-negative; the mask keeps negative seeds distinct and valid.
        rng = np.random.default_rng([SPLITS[self.split], self.seed & (2**64 - 1), index])
        V, T, n, half = self.vocab, self.seq_len, self.n_pairs, self.vocab // 2
        keys = rng.choice(half, n, replace=False)
        values = half + rng.choice(V - half, n, replace=False)
        slots = rng.choice(len(self._slot_p), n, replace=False, p=self._slot_p)
        # Noise uniform over [0, V) minus the keys: draw from [0, V - n), then step over each key in
        # increasing order (r >= k_j moves r past k_j), a bijection onto the allowed ids.
        w = rng.integers(0, V - n, T + 1)
        for k in np.sort(keys):
            w += w >= k
        w[0:2 * n:2], w[1:2 * n:2] = keys, values
        query = 2 * n + 2 * slots
        w[query], w[query + 1] = keys, values
        mask = np.zeros(T, np.float32)
        mask[query] = 1.0
        w = w.astype(np.int32)
        return {
            "tokens": w[:-1],
            "targets": w[1:],
            "positions": np.arange(T, dtype=np.int32),
            "segment_ids": np.ones(T, np.int32),
            "loss_mask": mask,
            "target_bytes": mask.astype(np.int32),
        }

    def __repr__(self) -> str:
        return f"MQARSource({self.name}, examples={self._len})"
