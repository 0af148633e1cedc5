"""Hybrid SSM / linear-attention decoders (models/hybrid.py, docs/hybrid.md) on the State of the Union corpus.

    effax train experiments/hybrid/hybrid.py --variants                         # the presets below
    effax train experiments/hybrid/hybrid.py:samba --workdir runs/samba          # Mamba2 + sliding window + MLP
    effax train experiments/hybrid/hybrid.py:smoke-gdn --workdir /tmp/gdn        # seconds; the tests run each smoke-*
    effax train experiments/hybrid/hybrid.py:sambay --workdir runs/sambay        # also samba_yoco, yoco, hydra
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
import math

from effax.models.hybrid import PRESETS, HybridConfig, HydraConfig
from effax.train.config import CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, OptimizerConfig, TrainConfig
from effax.train.sweeps.spec import Scaling

VARIANTS = {  # `effax train experiments/hybrid/hybrid.py --variants`
    None: "the Mamba2 preset (the default hybrid): d_model 256, 8 layers, 400 steps of 16 × 256 SOTU bytes",
    "mamba2": "Mamba2 only: 8 Mamba2 blocks without MLP (state 64, head dim 32), d_model 256",
    "samba": "Samba: Mamba2 and sliding-window attention (window 128) alternating, SwiGLU in each; 4 layers",
    "gdn": "gated DeltaNet + full attention 3:1, SwiGLU in each; 4 layers",
    "based": "Based: gated convolutions, Taylor linear attention (feature dim 16), sliding window 64; 5 layers",
    "attn": "the attention baseline on the same skeleton (dense Llama block), 4 layers",
    "smoke-mamba2": "2 Mamba2 layers, d_model 32, 10 steps of 8 × 64 bytes: seconds; make test-slow runs it",
    "smoke-gdn": "GDN then attention (the preset's layer types once each), d_model 32, 10 steps; the tests run it",
    "smoke-based": "gated conv, Based, sliding window (Based's layer types once each), d_model 32, 10 steps; the tests run it",
    "smoke-samba": "Mamba2 then sliding window, d_model 32, 10 steps; make test-slow runs it",
    "sambay": "SambaY: Samba self-decoder, memory Mamba, one KV layer, GMU / cross-attention cross-decoder, no RoPE; 8 layers",
    "samba_yoco": "Samba+YOCO (SambaY's baseline): SambaY with cross-attention in place of the GMUs; 8 layers",
    "yoco": "YOCO: sliding-window self-decoder, one KV layer, cross-attention cross-decoder; 8 layers",
    "hydra": "Hydra: Mamba2 backbone, block-sparse attention, chunk-level MoE (4 experts, top 2), product-key memory; 4 layers",
    "smoke-sambay": "memory Mamba, KV layer, GMU, cross-attention (SambaY's own layers once), d_model 32, 10 steps; the tests run it",
    "smoke-yoco": "KV layer then cross-attention (YOCO's own layers), d_model 32, 10 steps; make test-slow runs it",
    "smoke-hydra": "block-sparse attention with a chunk-level MoE, then with a product-key memory, d_model 32, 10 steps; the tests run it",
}
ARCHS = ("attn", "mamba2", "samba", "gdn", "based")  # the architectures of the comparison, in sweep order
DEPTH = {"attn": 4, "mamba2": 8, "samba": 4, "gdn": 4, "based": 5,  # layers (Mamba2 layers have no MLP)
         "sambay": 8, "samba_yoco": 8, "yoco": 8, "hydra": 4}  # decoder-decoders: depth a multiple of 4
CPU_SIZES = dict(ssm_state=64, ssm_head_dim=32, chunk_size=64)  # smaller SSM state and heads than Mamba2's 128 / 64
WINDOWS = {"samba": 128, "based": 64, "sambay": 128, "samba_yoco": 128, "yoco": 128}  # scaled to seq_len 256 (papers: 2048; Based 64-256; ArchScale's decoder-decoders 128)
# Hydra at CPU scale: 4 experts (top 2) routed per chunk of 64, a product-key memory of 64^2 slots, blocks of 32.
HYDRA_SIZES = dict(n_experts=4, top_k=2, moe_chunk=64, pkm_heads=4, pkm_keys=64, pkm_topk=8, pkm_key_dim=64,
                   sparse_block_size=32)
# The smoke variants hold a preset's own layer types once, in the order they need (the memory and KV layers before
# the layers reading them; mamba2_memory is a Mamba2 block), with one SwiGLU each: the test suite pays for every
# compiled layer, so the layers other smokes train are left out (the self-decoders' sliding windows and Mamba2 are
# smoke-samba's and smoke-mamba2's, and by default smoke-based's and smoke-sambay's memory Mamba; Hydra's Mamba2
# backbone likewise). SambaY's smoke runs its SSM in one chunk of 64; Hydra's grouped matmul is the exact ragged_dot
# (it compiles in about half the time).
SMOKE_PATTERNS = {"sambay": ("mamba2_memory+none", "yoco_kv+none", "gmu", "yoco_cross+none"),
                  "yoco": ("yoco_kv+none", "yoco_cross"), "hydra": ("block_sparse+chunk_moe", "block_sparse+pkm")}
SMOKE_FIELDS = {"sambay": dict(chunk_size=64),
                "hydra": dict(moe_chunk=16, pkm_heads=2, pkm_keys=16, pkm_topk=4, pkm_key_dim=16, sparse_block_size=16,
                              gmm_impl="reference")}

# The comparison sweep: every architecture at each target non-embedding size N, each trained to each budget C.
SWEEP_N = (100e3, 200e3, 400e3)
SWEEP_BUDGETS = (1e12, 2e12)
SWEEP_HEAD_DIM = 16  # head dim of every attention / GDN / Based layer at these widths (n_heads = d_model / 16)
LR_WIDTH = 0.2  # η = LR_WIDTH / d_model, the dense CPU mini-sweep's rule (experiments/scaling/dense.py)


def model(arch: str, d_model: int, **fields) -> HybridConfig:
    """One architecture of the comparison at a width (and its depth from DEPTH)."""
    pattern = {"attn": dict(pattern=("attn",))}.get(arch) or PRESETS[arch]
    window = {"sliding_window": WINDOWS[arch]} if arch in WINDOWS else {}
    merged = {**pattern, **window, **CPU_SIZES, **(HYDRA_SIZES if arch == "hydra" else {}), "d_model": d_model,
              "n_layers": DEPTH[arch], "n_heads": max(1, d_model // 64), **fields}
    if callable(merged["pattern"]):  # the decoder-decoders' layout depends on the depth
        merged["pattern"] = merged["pattern"](merged["n_layers"])
    return (HydraConfig if arch == "hydra" else HybridConfig)(**merged)


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
    if variant in DEPTH:
        return dataclasses.replace(cfg, model=model(variant, 256))
    if variant.startswith("smoke-") and variant in VARIANTS:  # the preset's layer types once each: compiles stay small
        arch = variant.removeprefix("smoke-")
        layer_types = SMOKE_PATTERNS.get(arch) or tuple(dict.fromkeys(PRESETS[arch]["pattern"]))
        tiny = model(arch, 32, pattern=layer_types, n_layers=max(2, len(layer_types)), n_heads=4, ssm_state=16,
                     ssm_head_dim=16, feature_dim=4, **({"sliding_window": 16} if arch in WINDOWS else {}),
                     **{"chunk_size": 16, **SMOKE_FIELDS.get(arch, {})})
        return dataclasses.replace(
            cfg, model=tiny, data=dataclasses.replace(cfg.data, seq_len=64),
            train=dataclasses.replace(cfg.train, steps=10, batch_size=8, log_every=1),
            optimizer=dataclasses.replace(cfg.optimizer, lr=1e-2, warmup_steps=2),
            checkpoint=CheckpointConfig(every=0, keep_last=1), eval=EvalConfig(every=0, batches=1))
    raise ConfigError(f"unknown variant {variant!r} of experiments/hybrid/hybrid.py; "
                      f"valid: {', '.join(filter(None, VARIANTS))}")


def matched_size(arch: str, target: float, tolerance: float = 0.02) -> dict:
    """The overrides of `arch`, at its depth, whose non-embedding parameter count is within `tolerance` of
    `target`: d_model on a grid of the head dim and, for architectures with an MLP, the SwiGLU width d_ff
    on a grid of 16 in [d_model, 4 d_model] (the finer knob), preferring d_ff nearest the usual 8/3 d_model;
    else the nearest count.
    η = LR_WIDTH / d_model."""
    grid = 8 if arch == "mamba2" else SWEEP_HEAD_DIM  # Mamba2: heads of ssm_head_dim 16 over expand * d_model

    def heads(d):  # Mamba2 has no attention heads: n_heads only has to divide d_model
        return 1 if arch == "mamba2" else max(1, d // SWEEP_HEAD_DIM)

    def error(d, d_ff):
        cfg = model(arch, d, n_heads=heads(d), d_ff=d_ff, **({"ssm_head_dim": 16} if arch == "mamba2" else {}))
        return abs(math.log(cfg.param_count(non_embedding=True) / target))

    shapes = [(d, f) for d in range(grid, 513, grid) for f in ([0] if arch == "mamba2" else range(d, 4 * d + 1, 16))]
    close = [p for p in shapes if error(*p) <= tolerance]
    d, d_ff = min(close, key=lambda p: abs(math.log(max(p[1], 1) / (8 * p[0] / 3)))) if close else min(shapes, key=lambda p: error(*p))
    size = {"model.d_model": d, "model.n_heads": heads(d), "optimizer.lr": round(LR_WIDTH / d, 6)}
    return {**size, "model.ssm_head_dim": 16} if arch == "mamba2" else {**size, "model.d_ff": d_ff}


def get_sweep(variant: str | None = None):
    """One IsoFLOP block per architecture: the same parameter targets and budgets for all (module docstring).
    A smoke-* variant gives a one-budget, one-size plan for tests and a first look."""
    targets, budgets = (SWEEP_N[:1], (2e11,)) if variant and variant.startswith("smoke-") else (SWEEP_N, SWEEP_BUDGETS)
    blocks = []
    for arch in ARCHS:
        fixed = model(arch, 64)  # the architecture's pattern and mixer sizes; width and heads come per size
        extra = [f"model.pattern={','.join(fixed.pattern)}", f"model.n_layers={fixed.n_layers}",
                 f"model.sliding_window={fixed.sliding_window}", "data.seq_len=256", "model.n_kv_heads=0"]
        blocks.append(Scaling(budgets=list(budgets), sizes=[matched_size(arch, n) for n in targets], lr="config",
                              batch=[8], arch=arch, warmup_fraction=0.1, extra=tuple(extra), min_steps=10))
    return blocks
