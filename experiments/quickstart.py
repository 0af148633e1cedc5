"""Quickstart: a small dense decoder on the State of the Union corpus, on a laptop CPU.

    effax train experiments/quickstart.py --workdir runs/quickstart          # `make demo`
    effax train experiments/quickstart.py:smoke --workdir /tmp/smoke         # a tiny model, seconds

Measured (2 CPU cores, docs/benchmarks.md, 2026-12-02): ~5,400 tokens/s, the whole command in about 3 minutes,
validation bits-per-byte 2.846 / 2.518 / 2.239 / 2.107 at steps 100 / 200 / 300 / 400 (the byte-unigram
entropy of English is about 4.5 bits); it ends with a sampled continuation.
"""

import dataclasses

from effax.models.dense import DenseConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig

VARIANTS = {  # `effax train experiments/quickstart.py --variants`
    None: "the demo (`make demo`): d_model 256, 4 layers, 400 steps of 8 × 256 SOTU bytes; ~5 min on 2 cores",
    "smoke": "d_model 64, 2 layers, 20 steps of 8 × 64 bytes: seconds; the tests run it",
}


def get_config(variant: str | None = None) -> Config:
    cfg = Config(
        # scan_unroll: the 4 layers unrolled compile as fast and train ~10% faster on CPU (docs/benchmarks.md)
        model=DenseConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, scan_unroll=4),
        data=DataConfig(source="sotu", tokenizer="byte", seq_len=256),
        # Tuned for < 300 s of training on 2 cores (~3,200 tokens/s): batch 8, as more updates per token beat
        # a bigger batch here (batch 16 reached 2.44 bpb after 300 steps, batch 8 2.29 after 300 steps, half
        # the tokens); lr 3e-3 (6e-3 trailed: 3.47 vs 3.16 bpb at step 100); 40 warm-up steps; cosine to 0
        # over 400 steps (a 600-step run passed 2.14 bpb at step 400, 291 s into training, and ended at 1.93).
        train=TrainConfig(steps=400, batch_size=8, seed=0, log_every=20,
                          sample_prompt="The state of the Union is", sample_tokens=200,
                          # sampled, not greedy: a small byte model's argmax loops on "the the the"
                          sample_temperature=0.8, sample_top_p=0.9),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=40, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=200, keep_last=2),
        eval=EvalConfig(every=100, batches=8, batch_size=16),  # the same 8 × 16 validation windows as before
    )
    if variant is None:
        return cfg
    if variant == "smoke":
        return dataclasses.replace(
            cfg,
            model=DenseConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2),
            data=dataclasses.replace(cfg.data, seq_len=64),
            train=dataclasses.replace(cfg.train, steps=20, batch_size=8, log_every=1, sample_prompt="", sample_tokens=0),
            optimizer=dataclasses.replace(cfg.optimizer, warmup_steps=5),
            checkpoint=CheckpointConfig(every=10, keep_last=2),
            eval=EvalConfig(every=10, batches=2),
        )
    raise ConfigError(f"unknown variant {variant!r} of experiments/quickstart.py; "
                      f"valid: {', '.join(filter(None, VARIANTS))}")
