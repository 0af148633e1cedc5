"""Attention mixers that differ only in their mask (layers/masks.py); each is `Attention` with its own
`mask(cfg)`, so training, the blockwise schedule, FLOPs and the decode cache all follow from the mask.

    mixer         mask                                                   decode cache (per layer)
    sink_swa      the first `attention_sinks` tokens + the last          sinks + a ring of `sliding_window`
                  `sliding_window` (StreamingLLM, Xiao et al. 2024)
    chunked       attention within chunks of `attention_chunk` tokens    a ring of `attention_chunk`
                  (Llama 4's local layers)
    block_sparse  blocks of `sparse_block_size`: `sparse_local_blocks`   global blocks + a ring of the local
                  (own included), `sparse_global_blocks` at the start,   blocks; a full cache with strided
                  every `sparse_stride_blocks`-th before (BigBird /      blocks (they reach back anywhere)
                  Longformer with Sparse Transformer's strided blocks)
    moa           MoA's per-head spans alpha + beta * N from the JSON    `moa_sinks` + a ring of the widest
                  plan `moa_plan`, plus `moa_sinks` first tokens         span at the cache's length
                  (Fu et al. 2024)

docs/attention.md has each mask's definition, keys and paper.
"""

from __future__ import annotations

from effax.layers.attention import Attention
from effax.layers.masks import BlockSparse, Mask, Spans
from effax.layers.mixer import register_mixer


def _positive(cfg, *keys: str, minimum: int = 1) -> None:
    for key in keys:
        if getattr(cfg, key) < minimum:
            raise ValueError(f"model.{key} must be >= {minimum}, got {getattr(cfg, key)}")


@register_mixer("sink_swa")
class SinkWindowAttention(Attention):
    """Sliding-window attention that always keeps the first tokens (attention sinks)."""

    @classmethod
    def mask(cls, cfg) -> Mask:
        _positive(cfg, "sliding_window")
        _positive(cfg, "attention_sinks", minimum=0)
        return Mask(window=cfg.sliding_window, sinks=cfg.attention_sinks)


@register_mixer("chunked")
class ChunkedAttention(Attention):
    """Causal attention inside fixed chunks: token i sees j iff i // C == j // C."""

    @classmethod
    def mask(cls, cfg) -> Mask:
        _positive(cfg, "attention_chunk")
        return Mask(chunk=cfg.attention_chunk)


@register_mixer("block_sparse")
class BlockSparseAttention(Attention):
    """BigBird-style block-sparse causal attention: local, global and strided blocks."""

    @classmethod
    def mask(cls, cfg) -> Mask:
        _positive(cfg, "sparse_block_size", "sparse_local_blocks")
        _positive(cfg, "sparse_global_blocks", "sparse_stride_blocks", minimum=0)
        return Mask(block_sparse=BlockSparse(cfg.sparse_block_size, cfg.sparse_local_blocks, cfg.sparse_global_blocks,
                                             cfg.sparse_stride_blocks))


@register_mixer("moa")
class MixtureOfAttentionSpans(Attention):
    """MoA: heterogeneous per-head, per-layer spans S = alpha + beta * N loaded from a plan file (MoA's own
    format), with the first `moa_sinks` tokens always visible. N is the tokens seen so far, so a query at
    position i uses S(i + 1): the span MoA applies when that token is decoded."""

    @classmethod
    def mask(cls, cfg) -> Mask:
        if not cfg.moa_plan:
            raise ValueError("model.moa_plan must name a MoA plan (JSON with 'alphas' and 'betas', [layers][heads]) "
                             "for moa layers")
        _positive(cfg, "moa_sinks", minimum=0)
        try:
            spans = Spans.from_json(cfg.moa_plan)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.moa_plan={cfg.moa_plan!r}: {e}") from None
        if (spans.n_layers, spans.n_heads) != (cfg.n_layers, cfg.n_heads):
            raise ValueError(f"model.moa_plan={cfg.moa_plan!r} has {spans.n_layers} layers x {spans.n_heads} heads; "
                             f"the model has {cfg.n_layers} x {cfg.n_heads}")
        return Mask(spans=spans, sinks=cfg.moa_sinks)
