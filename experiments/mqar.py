"""MQAR (Zoology, Arora et al. 2023; as used by Based): can a 2-layer model recall key-value pairs?

    effax train experiments/mqar.py --workdir runs/mqar                 # T=64, 4 pairs, V=8192
    effax train experiments/mqar.py:seq128 --workdir runs/mqar128       # T=128, 8 pairs
    effax train experiments/mqar.py:seq256 --workdir runs/mqar256       # T=256, 16 pairs
    effax train experiments/mqar.py:smoke --workdir /tmp/mqar-smoke     # tiny, seconds (tests run it)
    effax eval --workdir runs/mqar --suite mqar                         # recall accuracy on held-out examples

The data (data.source=mqar, train/mqar.py) is generated on the fly: keys from the first half of the
vocabulary, values from the second, each key queried once after power-law gaps (a = 0.01); the loss
and the val bpb count only the answers. The model follows Zoology's attention baseline in size: 2
layers, d_model 128, one head (our dense block keeps its SwiGLU MLP and RoPE; Zoology's has a short
convolution and no MLP). Zoology trains 32-64 epochs of 100k examples at batch 256 with lr swept over
1e-3 … 3e-2 and reports attention at ~100% accuracy in all these settings; sweep optimizer.lr likewise.

Expected: accuracy near 1.0 for the default variant once trained as long as Zoology (an attention model
solves MQAR; the val loss is the cross-entropy of the answers alone). Not yet measured here.

Measured (2 CPU cores, ~4 min; far from converged, recall still rising):

    effax train experiments/mqar.py:smoke --workdir /tmp/mqar-short --set train.steps=2000 train.batch_size=32 \
        eval.every=250 eval.batches=4 optimizer.warmup_steps=100 data.mqar_vocab=256
    effax eval --workdir /tmp/mqar-short --suite mqar

  → val answer loss 2.22 nats at step 2000 (4.85 = uniform over the 128 values); mqar accuracy 0.2185
  on 1000 held-out examples (4000 queries), all_correct 0.0 (chance 1/128 ≈ 0.008).
"""

import dataclasses

from effax.models.dense import DenseConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig

VARIANTS = {  # `effax train experiments/mqar.py --variants`
    None: "Zoology's attention baseline: 2 layers, d_model 128, 1 head; T=64, 4 pairs, vocab 8192; 4000 steps",
    "seq128": "the default at T=128 with 8 key-value pairs",
    "seq256": "the default at T=256 with 16 key-value pairs",
    "smoke": "d_model 64, vocab 128, 20 steps of batch 16: seconds; the tests run it",
}
LENGTHS = {"seq128": (128, 8), "seq256": (256, 16)}  # variant: (seq_len, pairs)


def get_config(variant: str | None = None) -> Config:
    cfg = Config(
        model=DenseConfig(d_model=128, n_layers=2, n_heads=1),
        data=DataConfig(source="mqar", seq_len=64, mqar_vocab=8192, mqar_pairs=4, mqar_power_a=0.01),
        train=TrainConfig(steps=4000, batch_size=64, seed=0, log_every=50),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=200, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=1000, keep_last=2),
        eval=EvalConfig(every=250, batches=8),
    )
    if variant is None:
        return cfg
    if variant in LENGTHS:
        seq_len, pairs = LENGTHS[variant]
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len, mqar_pairs=pairs))
    if variant == "smoke":
        return dataclasses.replace(
            cfg,
            model=DenseConfig(d_model=64, n_layers=2, n_heads=1),
            data=dataclasses.replace(cfg.data, mqar_vocab=128),
            train=dataclasses.replace(cfg.train, steps=20, batch_size=16, log_every=1),
            optimizer=dataclasses.replace(cfg.optimizer, warmup_steps=5),
            checkpoint=CheckpointConfig(every=10, keep_last=2),
            eval=EvalConfig(every=10, batches=2),
        )
    raise ConfigError(f"unknown variant {variant!r} of experiments/mqar.py; "
                      f"valid: {', '.join(filter(None, VARIANTS))}")
