"""Hybrid SSM / linear-attention decoders (models/hybrid.py, docs/hybrid.md) on the State of the Union corpus.

    effax train experiments/hybrid/hybrid.py --variants                         # the presets below
    effax train experiments/hybrid/hybrid.py:samba --workdir runs/samba          # Mamba2 + sliding window + MLP
    effax train experiments/hybrid/hybrid.py:smoke-gdn --workdir /tmp/gdn        # seconds; the tests run each smoke-*
    effax sweep experiments/hybrid/hybrid.py --root runs/hybrid --dry-run        # the comparison sweep's plan

The presets at d_model 256 are sized to about the same non-embedding parameter count as the attention
baseline (`attn`: the dense Llama block on the same skeleton), ~3.2M: Mamba2 takes 8 layers (no MLP),
the others 4 (5 for Based, whose pattern has period 5). Byte tokens, seq_len 256, 400 steps of 16 sequences.

The comparison sweep (`get_sweep`) trains every architecture at equal non-embedding parameters *and* equal
training FLOPs: for each target size it picks, per architecture, the d_model whose count is nearest the
target (at that architecture's depth), and `Scaling` gives every run of a budget the tokens D = C / f with f
the model's own FLOPs per token (chunked mixers, attention and the LM head included). `effax fit` then
compares the architectures' IsoFLOP curves. Expected on CPU at these sizes: not yet measured.
"""

import dataclasses

from effax.models.hybrid import PRESETS, HybridConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig
from effax.train.sweeps.spec import Scaling

VARIANTS = {  # `effax train experiments/hybrid/hybrid.py --variants`
    None: "the Mamba2 preset (the default hybrid): d_model 256, 8 layers, 400 steps of 16 × 256 SOTU bytes",
    "mamba2": "Mamba2 only: 8 Mamba2 blocks without MLP (state 64, head dim 32), d_model 256",
    "samba": "Samba: Mamba2 and sliding-window attention (window 128) alternating, SwiGLU in each; 4 layers",
    "gdn": "gated DeltaNet + full attention 3:1, SwiGLU in each; 4 layers",
    "based": "Based: gated convolutions, Taylor linear attention (feature dim 16), sliding window 64; 5 layers",
    "attn": "the attention baseline on the same skeleton (dense Llama block), 4 layers",
    "smoke-mamba2": "2 Mamba2 layers, d_model 32, 10 steps of 8 × 64 bytes: seconds; the tests run it",
    "smoke-gdn": "GDN then attention (the preset's layer types once each), d_model 32, 10 steps; the tests run it",
    "smoke-based": "gated conv, Based, sliding window (Based's layer types once each), d_model 32, 10 steps; the tests run it",
    "smoke-samba": "Mamba2 then sliding window, d_model 32, 10 steps; the tests run it",
}
ARCHS = ("attn", "mamba2", "samba", "gdn", "based")  # the architectures of the comparison, in sweep order
DEPTH = {"attn": 4, "mamba2": 8, "samba": 4, "gdn": 4, "based": 5}  # layers (Mamba2 layers have no MLP)
CPU_SIZES = dict(ssm_state=64, ssm_head_dim=32, chunk_size=64)  # smaller SSM state and heads than Mamba2's 128 / 64
WINDOWS = {"samba": 128, "based": 64}  # sliding windows scaled to seq_len 256 (papers: 2048; Based 64-256)


def model(arch: str, d_model: int, **fields) -> HybridConfig:
    """One architecture of the comparison at a width (and its depth from DEPTH)."""
    pattern = {"attn": dict(pattern=("attn",))}.get(arch) or PRESETS[arch]
    window = {"sliding_window": WINDOWS[arch]} if arch in WINDOWS else {}
    return HybridConfig(**{**pattern, **window, **CPU_SIZES, "d_model": d_model, "n_layers": DEPTH[arch],
                                         "n_heads": max(1, d_model // 64), **fields})


def get_config(variant: str | None = None) -> Config:
    cfg = Config(
        model=model("mamba2", 256),
        data=DataConfig(source="sotu", tokenizer="byte", seq_len=256),
        train=TrainConfig(steps=400, batch_size=16, seed=0, log_every=10),
        optimizer=OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=40, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=200, keep_last=2),
        eval=EvalConfig(every=100, batches=8),
    )
    if variant is None:
        return cfg
    if variant in ARCHS:
        return dataclasses.replace(cfg, model=model(variant, 256))
    if variant.startswith("smoke-") and variant in VARIANTS:  # the preset's layer types once each: compiles stay small
        arch = variant.removeprefix("smoke-")
        layer_types = tuple(dict.fromkeys(PRESETS[arch]["pattern"]))
        tiny = model(arch, 32, pattern=layer_types, n_layers=max(2, len(layer_types)), n_heads=4, ssm_state=16,
                     ssm_head_dim=16, chunk_size=16, feature_dim=4, **({"sliding_window": 16} if arch in WINDOWS else {}))
        return dataclasses.replace(
            cfg, model=tiny, data=dataclasses.replace(cfg.data, seq_len=64),
            train=dataclasses.replace(cfg.train, steps=10, batch_size=8, log_every=1),
            optimizer=dataclasses.replace(cfg.optimizer, lr=1e-2, warmup_steps=2),
            checkpoint=CheckpointConfig(every=0, keep_last=1), eval=EvalConfig(every=0, batches=1))
    raise ConfigError(f"unknown variant {variant!r} of experiments/hybrid/hybrid.py; "
                      f"valid: {', '.join(filter(None, VARIANTS))}")
