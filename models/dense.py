"""The dense baseline: a Llama-style pre-norm decoder (RMSNorm, GQA attention with RoPE, SwiGLU).

    embed -> L x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head (tied: x @ E^T)

It is the decoder skeleton (models/decoder.py) with its default pattern: every layer "attn" + "swiglu".
`model.pattern` still applies (e.g. `swa,swa,swa,attn` for a Mistral/Gemma-style local-global stack).
"""

from __future__ import annotations

import dataclasses

from effax.models.decoder import Decoder, DecoderConfig
from effax.models.registry import register


@dataclasses.dataclass(frozen=True)
class DenseConfig(DecoderConfig):
    def matmul_params(self) -> int:
        """Parameters that enter a matmul once per token (the FLOPs-bearing N of an attention + SwiGLU
        stack: every projection plus the LM head, counted once whether tied or not)."""
        return sum(m.param_count(self) + (f.param_count(self) if f else 0) for m, f in self.layer_classes()) \
            + self.d_model * self.vocab_size


@register("dense", DenseConfig)
class Dense(Decoder):
    pass
