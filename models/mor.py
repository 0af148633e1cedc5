"""Mixture-of-Recursions (Bae et al. 2025): one block of shared layers applied up to N_r times, each token
choosing (or being chosen for) its own number of recursions. `model.type=mor`; docs/mor.md has the keys.

    effax train experiments/mor/mor.py:smoke-ec --set model.n_recursions=3 model.sharing=middle-cycle

Depth. `model.n_layers` = L is the unrolled depth; the N_r recursions share a block of K layers:
    cycle            K = L / N_r;       recursion r runs shared layers 0 .. K-1            (1,2,3)(1,2,3)
    sequence         K = L / N_r;       unrolled layer l uses shared layer l // N_r        (1,1)(1,2)(2,2)...
    middle-cycle     K = (L - 2) / N_r; plus an unshared first and last layer (every token runs them)
    middle-sequence  as sequence on the L - 2 middle layers, plus the unshared first and last layer
Recursion r (0-based) is the unrolled layers r K .. r K + K - 1 of the shared part. The unique layers are
built as the skeleton's one scan group (`layer_specs` lists them), so `blocks/0/layers/0/...[U]` holds
U = K (+ 2) layers: unique index 0 is the first layer in the middle schedules, U - 1 the last.

Routing (`model.router`), at each recursion over the tokens still active:
    none            every token takes every recursion: the recursive transformer (x <- block(x))
    expert_choice   score s = w_r . x (a linear router per recursion); the top ceil(c_r T) of the previous
                    depth's tokens of each row continue, c_r = (N_r - r) / N_r unless `model.capacities`;
                    x <- x + g (block(x) - x) with g = router_alpha * sigmoid(s) (official code: 0.1);
                    loss router_bce_coef * BCE(s, selected) (1e-3). Top-k over a row is non-causal, so
                    generation decides per token: the auxiliary router (an MLP on the detached x, trained
                    with BCE against the top-k selection) or sigmoid(s) > router_threshold.
    token_choice    at the first recursion p = softmax(W x) over N_r depths; each token takes depth
                    argmax(p + bias) and g = p[depth]; balance_coef * Switch balance loss + z_loss_coef * z-loss
                    (layers/moe_routing.py), or the aux-loss-free bias (balance=aux_free). With `capacities`
                    set, recursion r keeps the top ceil(c_r T) by p[depth] of a row's candidates; the rest stop.
Capacity warm-up (`capacity_warmup_steps` W): in training (the loop's step, ctx.step) the kept count moves
linearly from T to ceil(c_r T) over W steps, on T-slot buffers chosen by a lax.cond until step W.

Real savings. A recursion gathers each row's active tokens, in causal order, into a static buffer of
C_r = ceil(c_r T) slots (under a capacity) or T slots (causal routing, whose counts are not static), runs
the shared layers on it with attention among those tokens only (original positions for RoPE, packed
documents kept apart by their segment ids; empty slots form a document of their own), and scatters the
results back. `flops_per_token` counts the buffers.

KV. Recursion-wise (default): each depth's attention sees the keys of the tokens active at that depth, and
decoding keeps one cache per (depth, layer), holding only its active tokens (pos = -1 elsewhere). KV
sharing (`model.kv_sharing`): depths >= 1 compute only queries and attend the first recursion's keys
and values of every earlier token of the document; decoding keeps the first recursion's caches only.
A decode step skips (lax.cond) a depth no token of the batch reaches. `model.remat` checkpoints every layer run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers import moe_routing
from effax.layers.attention import attention, cache_attention, choose_impl
from effax.layers.masks import Mask
from effax.layers.mixer import Buffer, LayerContext
from effax.layers.rope import apply_rope
from effax.layers.sharding import logical_init
from effax.models.decoder import (REMAT_POLICIES, Decoder, DecoderConfig, DecodeState, LayerSpec, _combine, _layer_ctx,
                                  _merge_reports)
from effax.models.registry import ConfigError, register

SHARINGS = ("cycle", "sequence", "middle-cycle", "middle-sequence")
_PAD_SEGMENT = jnp.iinfo(jnp.int32).min  # empty buffer slots: a document no real token belongs to
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def capacity_tokens(capacity: float, T: int) -> int:
    """ceil(capacity T), robust to the float error of fractions such as 2/3 (2/3 * 24 = 16.000000000000004)."""
    return max(1, math.ceil(round(capacity * T, 6)))


@dataclasses.dataclass(frozen=True)
class MoRConfig(DecoderConfig):
    type: str = "mor"
    n_recursions: int = 3  # N_r
    sharing: Literal["cycle", "sequence", "middle-cycle", "middle-sequence"] = "middle-cycle"
    router: Literal["none", "expert_choice", "token_choice"] = "expert_choice"
    capacities: tuple[float, ...] = ()  # fraction of each row kept at recursion r; (): (N_r - r) / N_r for expert
    #                                     choice, no capacity (dropless) for token choice
    capacity_warmup_steps: int = 0  # capacities move linearly from 1 to their targets over the first N training steps
    router_gate: Literal["sigmoid", "none"] = "sigmoid"  # "none": g = 1 (selection only, no scaling)
    router_alpha: float = 0.1  # expert choice: g = alpha * sigmoid(score) (official code: 0.1)
    router_bce_coef: float = 1e-3  # expert choice: BCE(score, top-k selection)
    generation_router: Literal["aux_router", "threshold"] = "aux_router"  # expert choice, causal decisions
    aux_router_dim: int = 64  # hidden width of the auxiliary causal router (MLP D -> dim -> 1, on detached x)
    aux_router_coef: float = 0.1  # its BCE against the top-k selection (it sees detached inputs only)
    router_threshold: float = 0.5  # generation_router=threshold: continue iff sigmoid(score) > this
    balance: Literal["aux_loss", "aux_free", "none"] = "aux_loss"  # token choice
    balance_coef: float = 0.1  # Switch balance loss over the N_r depths (official 360M config: 0.1)
    z_loss_coef: float = 1e-5  # router z-loss (official: 1e-5)
    bias_update_rate: float = 1e-3  # aux_free: u
    kv_sharing: bool = False  # depths >= 1 reuse the first recursion's keys and values

    # -- structure ---------------------------------------------------------------------------------------
    @property
    def middle(self) -> bool:
        return self.sharing.startswith("middle")

    @property
    def block_layers(self) -> int:
        """K: layers per recursion."""
        return (self.n_layers - 2 * self.middle) // self.n_recursions

    @property
    def unique_layers(self) -> int:
        return self.block_layers + 2 * self.middle

    def unique_index(self, r: int, j: int) -> int:
        """The unique layer that layer j of recursion r runs."""
        K, N = self.block_layers, self.n_recursions
        shared = j if self.sharing.endswith("cycle") else (r * K + j) // N
        return shared + self.middle

    def unrolled_layers(self) -> list[int]:
        """The unique layer of every unrolled layer, in order (a vanilla model with these weights is the
        recursive transformer)."""
        out = [self.unique_index(r, j) for r in range(self.n_recursions) for j in range(self.block_layers)]
        return [0, *out, self.unique_layers - 1] if self.middle else out

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return DecoderConfig.layer_specs.fget(dataclasses.replace(self, n_layers=self.unique_layers))

    @property
    def capacity_schedule(self) -> tuple[float, ...]:
        N = self.n_recursions
        return tuple(self.capacities) or tuple((N - r) / N for r in range(N))

    @property
    def capacity_limited(self) -> bool:
        """Whether a recursion keeps at most ceil(c_r T) tokens of a row: expert choice always, token choice
        when `capacities` is set (overflow tokens, by router score, stop there)."""
        return self.router == "expert_choice" or (self.router == "token_choice" and bool(self.capacities))

    def buffer_sizes(self, seq_len: int) -> list[int]:
        """Tokens per row each recursion computes after the capacity warm-up: C_r = ceil(c_r T) under a
        capacity, T otherwise."""
        if self.capacity_limited:
            return [capacity_tokens(c, seq_len) for c in self.capacity_schedule]
        return [seq_len] * self.n_recursions

    # -- counts --------------------------------------------------------------------------------------------
    def router_params(self) -> int:
        D, N = self.d_model, self.n_recursions
        if self.router == "expert_choice":
            return N * D + N * (D * self.aux_router_dim + self.aux_router_dim)
        return D * N if self.router == "token_choice" else 0

    def param_count(self, *, non_embedding: bool = False, active: bool = False) -> int:
        return super().param_count(non_embedding=non_embedding, active=active) + self.router_params()

    def flops_per_token(self, seq_len: int) -> float:
        """3 x forward; forward = LM head + unshared layers + per recursion (C_r / T) x the shared layers at a
        buffer of C_r tokens (attention over C_r keys; with KV sharing depths >= 1 project only q and o and
        attend all T first-recursion keys) + routers."""
        T, D, (mixer_cls, ffn_cls) = seq_len, self.d_model, self.layer_classes()[0]
        H, P = self.n_heads, self.dim_per_head

        def layer(C, shared_kv=False):
            ffn = 0 if ffn_cls is None else ffn_cls.flops_per_token(self, C)
            if shared_kv:
                return 2 * 2 * D * H * P + 4 * T * H * P + ffn
            return mixer_cls.flops_per_token(self, C) + ffn

        forward = 2 * D * self.vocab_size + 2 * self.middle * layer(T)
        for r, C in enumerate(self.buffer_sizes(T)):
            forward += C / T * self.block_layers * layer(C, self.kv_sharing and r > 0)
        if self.router == "expert_choice":
            forward += self.n_recursions * (2 * D + 2 * (D * self.aux_router_dim + self.aux_router_dim))
        elif self.router == "token_choice":
            forward += 2 * D * self.n_recursions
        return 3.0 * forward

    def validate(self) -> None:
        super().validate()
        N, L = self.n_recursions, self.n_layers
        if self.scan_unroll != 1:  # said, not ignored
            raise ConfigError(f"model.scan_unroll={self.scan_unroll} does not apply to mor: its layer loop is a Python "
                              "loop over the recursions already (no scan to unroll); leave it at 1")
        if N < 1:
            raise ConfigError(f"model.n_recursions must be >= 1, got {N}")
        if self.sharing not in SHARINGS:
            raise ConfigError(f"model.sharing={self.sharing!r} is not one of {SHARINGS}")
        shared = L - 2 * self.middle
        if shared < N or shared % N:
            raise ConfigError(f"model.n_layers={L}: the {shared} shared layers ({self.sharing}) must be a positive multiple "
                              f"of model.n_recursions={N}")
        specs = set(self.layer_specs)
        if len(specs) != 1 or next(iter(specs)).mixer != "attn" or next(iter(specs)).ffn not in ("swiglu", "none"):
            raise ConfigError(f"model.pattern={self.pattern!r}: Mixture-of-Recursions shares one kind of layer, "
                              f"attn with swiglu or none (e.g. model.pattern=attn)")
        caps = self.capacity_schedule
        if len(caps) != N or not all(0 < c <= 1 for c in caps) or any(b > a for a, b in zip(caps, caps[1:])):
            raise ConfigError(f"model.capacities={self.capacities!r} must list {N} non-increasing fractions in (0, 1] "
                              f"(one per recursion), or be empty for (N_r - r) / N_r")
        if self.kv_sharing and self.capacity_limited and caps[0] != 1:
            raise ConfigError("model.kv_sharing reuses the first recursion's keys of every token: model.capacities[0] must be 1")
        if self.capacity_warmup_steps < 0:
            raise ConfigError(f"model.capacity_warmup_steps must be >= 0, got {self.capacity_warmup_steps}")
        if self.capacity_warmup_steps and not self.capacity_limited:
            raise ConfigError(f"model.capacity_warmup_steps warms up capacities, which router={self.router!r} does not have "
                              f"here (expert choice, or token choice with model.capacities set)")
        for key in ("router_alpha", "router_bce_coef", "aux_router_coef", "balance_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if self.aux_router_dim < 1:
            raise ConfigError(f"model.aux_router_dim must be >= 1, got {self.aux_router_dim}")
        if not 0 < self.router_threshold < 1:
            raise ConfigError(f"model.router_threshold must lie in (0, 1), got {self.router_threshold}")


@dataclasses.dataclass
class Route:
    """One recursion's routing: which tokens run it and their gate."""

    active_BT: jax.Array
    gate_BT: jax.Array | None  # None: x <- block(x) (no router, or router_gate=none)
    buffer: int  # static: slots of the gathered buffer
    warming: jax.Array | None = None  # traced bool: in the capacity warm-up, whose buffer is T slots


@register("mor", MoRConfig)
class MoR(Decoder):
    def __init__(self, cfg: MoRConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        D, N, A = cfg.d_model, cfg.n_recursions, cfg.aux_router_dim
        normal, dt = nnx.initializers.normal(cfg.init_std), jnp.dtype(cfg.param_dtype)

        def param(shape, axes):
            return nnx.Param(logical_init(normal, axes)(rngs.params(), shape, dt))

        if cfg.router == "expert_choice":
            self.router_w = param((N, D), (None, "embed"))  # one linear scorer per recursion
            self.aux_w1 = param((N, D, A), (None, "embed", None))  # the auxiliary causal router
            self.aux_w2 = param((N, A), (None, None))
        elif cfg.router == "token_choice":
            self.router_w = param((D, N), ("embed", None))
            self.router_bias = Buffer(jnp.zeros((N,), jnp.float32))

    # -- pieces --------------------------------------------------------------------------------------------
    def layer(self, u: int):
        """Unique layer u as a Block (a slice of the stacked scan group)."""
        graphdef, state = nnx.split(self.blocks[0])
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[u], state)).layers[0]

    def _keep(self, score_BT, cand_BT, r: int, step) -> tuple[jax.Array, int, jax.Array | None]:
        """The top ceil(c_r T) candidates of each row by score -> (kept, buffer slots, warming). In the capacity
        warm-up (`step` < W) the kept count is k = T - floor((T - C_r) step / W), traced: T at step 0, C_r at
        step W; buffer shapes are static, so the warm-up runs its recursions on T slots (`warming`)."""
        T = score_BT.shape[1]
        C, W = capacity_tokens(self.cfg.capacity_schedule[r], T), self.cfg.capacity_warmup_steps
        masked_BT = jnp.where(cand_BT, score_BT, -jnp.inf)
        rows_B1 = jnp.arange(score_BT.shape[0])[:, None]
        _, idx_BC = jax.lax.top_k(masked_BT, C)
        kept_BT = jnp.zeros(cand_BT.shape, bool).at[rows_B1, idx_BC].set(True) & cand_BT
        if step is None or not W or C == T:
            return kept_BT, C, None
        step = jnp.minimum(jnp.asarray(step, jnp.int32), W)
        k = T - jnp.floor((T - C) * step.astype(jnp.float32) / W).astype(jnp.int32)
        _, order_BT = jax.lax.top_k(masked_BT, T)  # best first, ties as top_k breaks them above
        rank_BT = jnp.zeros(cand_BT.shape, jnp.int32).at[rows_B1, order_BT].set(jnp.arange(T, dtype=jnp.int32))
        warming = step < W
        return jnp.where(warming, cand_BT & (rank_BT < k), kept_BT), C, warming

    def _route(self, x_BTD, r: int, prev_BT, causal: bool, rctx: LayerContext, memo: dict, step=None) -> Route:
        cfg = self.cfg
        T = prev_BT.shape[1]
        if cfg.router == "none":
            return Route(prev_BT, None, T)
        x32 = x_BTD.astype(jnp.float32)
        if cfg.router == "token_choice":
            if r == 0:
                logits_BTN = x32 @ self.router_w[...].astype(jnp.float32)
                probs_BTN = jax.nn.softmax(logits_BTN, axis=-1)
                bias = self.router_bias[...] if cfg.balance == "aux_free" else None
                choice_BTZ, gate_BTZ = moe_routing.token_choice(probs_BTN, 1, renormalize=False, bias_O=bias)
                memo["depth_BT"], memo["gate_BT"] = choice_BTZ[..., 0] + 1, gate_BTZ[..., 0]
                if cfg.balance == "aux_loss":
                    rctx.aux_loss("mor/balance_loss", cfg.balance_coef * moe_routing.balance_loss(probs_BTN, choice_BTZ, "softmax"))
                if cfg.z_loss_coef:
                    rctx.aux_loss("mor/z_loss", cfg.z_loss_coef * moe_routing.router_z_loss(logits_BTN))
                load_N = moe_routing.assignment_counts(choice_BTZ, cfg.n_recursions)
                if cfg.balance == "aux_free":
                    rctx.diagnostic("mor/router_bias", self.router_bias[...])
                    if rctx.train:
                        memo["new_bias"] = moe_routing.aux_free_update(self.router_bias[...], load_N, cfg.bias_update_rate)
                rctx.diagnostic("mor/router_max_prob", jnp.mean(jnp.max(probs_BTN, axis=-1)))
            gate_BT = memo["gate_BT"] if cfg.router_gate == "sigmoid" else None
            cand_BT = prev_BT & (memo["depth_BT"] > r)
            if causal or not cfg.capacity_limited:  # a capacity compares a row's tokens: not causal
                return Route(cand_BT, gate_BT, T)
            # overflow tokens, lowest p_depth first (MoE's batch-priority dropping), stop at this recursion
            active_BT, buffer, warming = self._keep(memo["gate_BT"], cand_BT, r, step)
            return Route(active_BT, gate_BT, buffer, warming)
        # expert choice
        score_BT = x32 @ self.router_w[r].astype(jnp.float32)
        aux_BT = jax.nn.gelu(jax.lax.stop_gradient(x32) @ self.aux_w1[r].astype(jnp.float32)) @ self.aux_w2[r].astype(jnp.float32)
        warming = None
        if causal and cfg.capacity_schedule[r] == 1:  # top-k keeps every token here: so does the causal decision
            active_BT, buffer = prev_BT, T
        elif causal:
            go_BT = aux_BT > 0 if cfg.generation_router == "aux_router" else jax.nn.sigmoid(score_BT) > cfg.router_threshold
            active_BT, buffer = prev_BT & go_BT, T
        else:
            active_BT, buffer, warming = self._keep(score_BT, prev_BT, r, step)
        target_BT = jax.lax.stop_gradient(active_BT.astype(jnp.float32))
        n_prev = jnp.maximum(jnp.sum(prev_BT), 1)
        bce = lambda logit: jnp.sum(jnp.where(prev_BT, jax.nn.softplus(logit) - target_BT * logit, 0.0)) / n_prev  # noqa: E731
        rctx.aux_loss("mor/router_bce", cfg.router_bce_coef * bce(score_BT))
        rctx.aux_loss("mor/aux_router_bce", cfg.aux_router_coef * bce(aux_BT))
        prob_BT = jax.nn.sigmoid(score_BT)
        mean = jnp.sum(jnp.where(prev_BT, prob_BT, 0.0)) / n_prev
        rctx.diagnostic("mor/score_mean", mean, reduce="per_layer")
        rctx.diagnostic("mor/score_std", jnp.sqrt(jnp.sum(jnp.where(prev_BT, (prob_BT - mean) ** 2, 0.0)) / n_prev),
                        reduce="per_layer")
        rctx.diagnostic("mor/aux_router_acc", jnp.sum(jnp.where(prev_BT, (aux_BT > 0) == active_BT, False)) / n_prev,
                        reduce="per_layer")
        return Route(active_BT, cfg.router_alpha * prob_BT if cfg.router_gate == "sigmoid" else None, buffer, warming)

    def _attend_shared(self, block, h_BCD, pos_BC, seg_BC, idx_BC, kv, ctx):
        """A layer whose attention reads the first recursion's keys/values (kv sharing): only q is
        projected; query (pos q, doc s) sees key (pos p, doc s') iff s == s' and p <= q. `model.attention_impl`
        other than the masked einsum: the queries go back to their tokens' slots of the row (zeros elsewhere,
        outputs dropped) and the skeleton's `attention` runs causal attention with the documents' segment ids
        over the row, which is the same rule (a row is in causal order), at T x T instead of C x T scores."""
        mixer, dt = block.mixer, jnp.dtype(self.cfg.dtype)
        hn = block.mixer_norm(h_BCD).astype(dt)
        q_BCHP = apply_rope(jnp.einsum("btd,dhk->bthk", hn, mixer.q[...].astype(dt)), pos_BC, theta=mixer.rope_theta)
        k_BTKP, v_BTKP, kpos_BT, kseg_BT = kv
        B, C, H, P = q_BCHP.shape
        K, T = k_BTKP.shape[2], k_BTKP.shape[1]
        mask = Mask(segment_ids_BT=kseg_BT)
        q_BTHP = jnp.zeros((B, T, H, P), q_BCHP.dtype).at[jnp.arange(B)[:, None], idx_BC].set(q_BCHP)
        impl = choose_impl(q_BTHP, mask) if mixer.impl == "auto" else mixer.impl
        if impl != "xla":
            out_BTHP = attention(q_BTHP, k_BTKP, v_BTKP, mask=mask, impl=impl)
            out_BCHP = jnp.take_along_axis(out_BTHP, idx_BC[:, :, None, None], axis=1)
            out_BCHP = jnp.where((seg_BC != _PAD_SEGMENT)[:, :, None, None], out_BCHP, 0).astype(dt)  # empty slots
            return block._ffn(h_BCD + mixer.project_out(out_BCHP), ctx)
        q_BKGCP = q_BCHP.reshape(B, C, K, H // K, P).transpose(0, 2, 3, 1, 4)
        logits = jnp.einsum("bkgcp,btkp->bkgct", q_BKGCP, k_BTKP, preferred_element_type=jnp.float32) / math.sqrt(P)
        allowed_BCT = (seg_BC[:, :, None] == kseg_BT[:, None, :]) & (kpos_BT[:, None, :] <= pos_BC[:, :, None])
        allowed = allowed_BCT[:, None, None]
        probs = jax.nn.softmax(jnp.where(allowed, logits, _NEG), axis=-1)
        out = jnp.einsum("bkgct,btkp->bkgcp", probs.astype(v_BTKP.dtype), v_BTKP, preferred_element_type=jnp.float32)
        out = jnp.where(allowed.any(-1, keepdims=True), out, 0.0)  # empty slots see no key
        out_BCHP = out.transpose(0, 3, 1, 2, 4).reshape(B, C, H, P).astype(dt)
        h_BCD = h_BCD + mixer.project_out(out_BCHP)
        return block._ffn(h_BCD, ctx)

    def _self_block(self, block, h_BCD, ctx):
        """Block.__call__, also returning this layer's keys and values (for kv sharing)."""
        mixer = block.mixer
        q, k, v = mixer.qkv(block.mixer_norm(h_BCD), ctx.positions_BT)
        out = mixer.project_out(_attention(q, k, v, mixer, ctx))
        return block._ffn(h_BCD + out, ctx), (k, v)

    # -- training / evaluation forward --------------------------------------------------------------------
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, train: bool = False, rng=None, step=None,
                 causal_routing: bool = False, kv_delta=None, return_routing: bool = False):
        """As Decoder.__call__ (`step`: the training step, for the capacity warm-up). causal_routing: expert
        choice decides per token as in generation (the aux router or the threshold) instead of top-k over the
        row, token choice drops no tokens. kv_delta {j: (dk_BTKP, dv_BTKP)}: added to the first-recursion
        keys/values that depths >= 1 read under kv sharing (tests). return_routing: aux also holds
        "routing": per recursion (active_BT, hidden state before it, hidden state after it)."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        ctx = LayerContext(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, train=train, rng=rng, step=step)
        x_BTD, aux = self.run_layers(self.embed_tokens(tokens_BT), ctx, causal=causal_routing, kv_delta=kv_delta,
                                     return_routing=return_routing)
        return self.logits(x_BTD), aux

    def _apply(self, u: int, fn, x, lctx: LayerContext):
        """fn(block, x, lctx) with unique layer u as the block. Under `model.remat` the call is a jax.checkpoint
        with the skeleton's policy (models/decoder.py), so its activations are recomputed in the backward
        pass; what the layer reports leaves the checkpoint as outputs (a tracer kept in lctx would leak)."""
        block = self.layer(u)
        if self.cfg.remat == "none":
            return fn(block, x, lctx)
        graphdef, state = nnx.split(block)

        def pure(state, x):
            inner = dataclasses.replace(lctx, values={}, reports={})
            out = fn(nnx.merge(graphdef, state), x, inner)
            lctx.reports.update(inner.reports)  # static descriptions, not arrays
            return out, inner.values

        out, values = jax.checkpoint(pure, policy=REMAT_POLICIES[self.cfg.remat])(state, x)
        lctx.values.update(values)
        return out

    def run_layers(self, x_BTD, ctx: LayerContext, *, causal: bool = False, kv_delta=None, return_routing=False):
        cfg = self.cfg
        B, T = x_BTD.shape[:2]
        reports, reported = {}, {}

        def collect(c: LayerContext, index, values=None):
            _merge_reports(reports, c.reports)
            for name, value in (c.values if values is None else values).items():
                reported.setdefault(name, []).append((index, value))

        def run(u, x, l, c=ctx):
            lctx = _layer_ctx(c, l)
            x = self._apply(u, lambda block, x, lc: block(x, lc), x, lctx)
            collect(lctx, l)
            return x

        if cfg.middle:
            x_BTD = run(0, x_BTD, 0)
        seg_BT = jnp.zeros((B, T), jnp.int32) if ctx.segment_ids_BT is None else ctx.segment_ids_BT.astype(jnp.int32)
        prev_BT, memo, shared_kv, routing = jnp.ones((B, T), bool), {}, {}, []
        depth_BT = jnp.zeros((B, T), jnp.int32)
        rows_B1 = jnp.arange(B)[:, None]
        for r in range(cfg.n_recursions):
            x_in_BTD = x_BTD
            rctx = LayerContext(positions_BT=ctx.positions_BT, train=ctx.train, layer=r)
            route = self._route(x_BTD, r, prev_BT, causal, rctx, memo, ctx.step)
            collect(rctx, r)
            active_BT = route.active_BT
            depth_BT += active_BT

            def recursion(x_BTD, C, r=r, route=route):
                """The shared layers on a buffer of C slots -> (x_BTD, {layer: what it reported})."""
                if cfg.router == "none":  # every token: no gather
                    idx_BC = jnp.broadcast_to(jnp.arange(T), (B, T))
                    take = lambda a: a  # noqa: E731
                else:  # the active tokens first, in causal order; C >= their count
                    _, idx_BC = jax.lax.top_k(-jnp.where(route.active_BT, jnp.arange(T), T + jnp.arange(T)), C)
                    take = lambda a: jnp.take_along_axis(a, idx_BC.reshape(B, C, *([1] * (a.ndim - 2))), axis=1)  # noqa: E731
                valid_BC = take(route.active_BT)
                x_BCD, pos_BC = take(x_BTD), take(ctx.positions_BT)
                seg_BC = jnp.where(valid_BC, take(seg_BT), _PAD_SEGMENT)
                gctx = dataclasses.replace(ctx, positions_BT=pos_BC, segment_ids_BT=seg_BC)
                h_BCD, values = x_BCD, {}
                for j in range(cfg.block_layers):
                    l = cfg.middle + r * cfg.block_layers + j
                    u, lctx = cfg.unique_index(r, j), _layer_ctx(gctx, l)
                    if cfg.kv_sharing and r > 0:
                        attend = lambda b, h, lc, kv=shared_kv[j]: self._attend_shared(b, h, pos_BC, seg_BC, idx_BC, kv, lc)  # noqa: E731
                        h_BCD = self._apply(u, attend, h_BCD, lctx)
                    elif cfg.kv_sharing:
                        h_BCD, (k, v) = self._apply(u, self._self_block, h_BCD, lctx)
                        # back to token order (C = T here: capacities[0] = 1)
                        k, v = (jnp.zeros((B, T, *a.shape[2:]), a.dtype).at[rows_B1, idx_BC].set(a) for a in (k, v))
                        if kv_delta is not None:
                            k, v = k + kv_delta[j][0], v + kv_delta[j][1]
                        shared_kv[j] = (k, v, ctx.positions_BT, seg_BT)
                    else:
                        h_BCD = self._apply(u, lambda b, h, lc: b(h, lc), h_BCD, lctx)
                    _merge_reports(reports, lctx.reports)
                    values[l] = lctx.values
                out_BCD = h_BCD if route.gate_BT is None else \
                    x_BCD + (take(route.gate_BT)[..., None] * (h_BCD - x_BCD)).astype(x_BCD.dtype)
                if cfg.router == "none":
                    return out_BCD, values
                return x_BTD.at[rows_B1, idx_BC].set(jnp.where(valid_BC[..., None], out_BCD, x_BCD)), values

            if route.warming is None:
                x_BTD, values = recursion(x_BTD, route.buffer)
            else:  # warm-up: every slot may be needed; after it, the C_r-slot buffer (only one branch runs)
                assert not (cfg.kv_sharing and r == 0), "kv sharing keeps every token at the first recursion"
                x_BTD, values = jax.lax.cond(route.warming, lambda x: recursion(x, T), lambda x: recursion(x, route.buffer),
                                             x_BTD)
            for l, v in values.items():
                collect(LayerContext(positions_BT=ctx.positions_BT), l, v)
            prev_BT = active_BT
            if return_routing:
                routing.append((active_BT, x_in_BTD, x_BTD))
        if cfg.middle:
            x_BTD = run(cfg.unique_layers - 1, x_BTD, cfg.n_layers - 1)
        if cfg.router != "none":
            dctx = LayerContext(positions_BT=ctx.positions_BT)
            dctx.diagnostic("mor/depth_frac", jnp.mean(jax.nn.one_hot(depth_BT, cfg.n_recursions + 1), axis=(0, 1)))
            dctx.diagnostic("mor/mean_depth", jnp.mean(depth_BT.astype(jnp.float32)))
            collect(dctx, 0)
        aux = _combine(reports, reported)
        if "new_bias" in memo:
            aux["state"] = nnx.State({"router_bias": Buffer(memo["new_bias"])})
        if return_routing:
            aux["routing"] = routing
        return x_BTD, aux

    # -- decoding ----------------------------------------------------------------------------------------
    def _cache_layout(self) -> list[tuple[str, int, int]]:
        """(kind, recursion, layer) of each KV cache, in order: first, every (depth, layer) or (with kv
        sharing) the first recursion's layers only, last."""
        cfg = self.cfg
        depths = 1 if cfg.kv_sharing else cfg.n_recursions
        out = [("first", 0, 0)] if cfg.middle else []
        out += [("rec", r, j) for r in range(depths) for j in range(cfg.block_layers)]
        return out + ([("last", 0, 0)] if cfg.middle else [])

    def init_cache(self, batch: int, max_len: int, dtype=None) -> DecodeState:
        from effax.layers.kv_cache import KVState

        dtype = jnp.dtype(self.cfg.dtype if dtype is None else dtype)
        one = KVState.zeros(batch, max_len, self.cfg.kv_heads, self.cfg.dim_per_head, dtype, ring=False)
        stacked = jax.tree.map(lambda a: a[None], one)  # a leading [1]: written at index 0
        return DecodeState(tuple(stacked for _ in self._cache_layout()), jnp.zeros((batch,), jnp.int32))

    def _run_cached(self, x_BTD, ctx: LayerContext, cache: DecodeState, *, prefill: bool):
        """Every token of the batch computed at a depth, masked: a layer writes the keys of the tokens active at
        its depth only (pos -1 elsewhere) and attends the slots of its cache; inactive tokens' outputs are
        dropped. A depth that no token of the batch reaches is skipped (`lax.cond`: only the branch taken
        runs), which is where per-token depth saves decode time. Routing is causal (per token)."""
        cfg = self.cfg
        states = list(cache.layers)
        slot = {key: n for n, key in enumerate(self._cache_layout())}

        def cached(block, h, valid_BT, st, write=True, layer=0):
            """-> (h, st): one layer on every token, its KV state st written for valid tokens if `write`."""
            lctx = dataclasses.replace(_layer_ctx(ctx, layer), valid_BT=valid_BT)
            q, k, v = block.mixer.qkv(block.mixer_norm(h), ctx.positions_BT)
            if write:
                st = st.write_prompt(0, k, v, valid_BT, ctx.lengths_B) if prefill else \
                    st.write_tokens(0, k, v, ctx.positions_BT, valid_BT)
            out = cache_attention(q, st.k[0], st.v[0], q_positions_BT=ctx.positions_BT, mask=Mask(), slot_positions_BS=st.pos[0])
            return block._ffn(h + block.mixer.project_out(out), lctx), st

        valid_BT = ctx.valid_BT
        if cfg.middle:
            n = slot[("first", 0, 0)]
            x_BTD, states[n] = cached(self.layer(0), x_BTD, valid_BT, states[n])
        prev_BT, memo = valid_BT, {}
        for r in range(cfg.n_recursions):
            rctx = LayerContext(positions_BT=ctx.positions_BT, layer=r)
            route = self._route(x_BTD, r, prev_BT, True, rctx, memo)
            active_BT = route.active_BT & valid_BT
            ns = [slot[("rec", 0 if cfg.kv_sharing else r, j)] for j in range(cfg.block_layers)]
            # Each layer's weights are sliced out of the stack here, outside the cond: a branch that slices the
            # stacked weights itself made XLA:CPU copy the whole stack into the cond at every step.
            blocks = [self.layer(cfg.unique_index(r, j)) for j in range(cfg.block_layers)]

            def depth(x_BTD, sts, r=r, route=route, active_BT=active_BT, blocks=blocks):
                h_BTD, out = x_BTD, []
                for j, st in enumerate(sts):
                    h_BTD, st = cached(blocks[j], h_BTD, active_BT, st, write=not (cfg.kv_sharing and r > 0),
                                       layer=cfg.middle + r * cfg.block_layers + j)
                    out.append(st)
                out_BTD = h_BTD if route.gate_BT is None else \
                    x_BTD + (route.gate_BT[..., None] * (h_BTD - x_BTD)).astype(x_BTD.dtype)
                return jnp.where(active_BT[..., None], out_BTD, x_BTD), tuple(out)

            sts = tuple(states[n] for n in ns)
            always = cfg.router == "none" or (r == 0 and (cfg.router == "token_choice" or cfg.capacity_schedule[0] == 1))
            if always:  # every valid token runs this depth
                x_BTD, sts = depth(x_BTD, sts)
            else:
                x_BTD, sts = jax.lax.cond(jnp.any(active_BT), depth, lambda x, s: (x, s), x_BTD, sts)
            for n, st in zip(ns, sts):
                states[n] = st
            prev_BT = active_BT
        if cfg.middle:
            n = slot[("last", 0, 0)]
            x_BTD, states[n] = cached(self.layer(cfg.unique_layers - 1), x_BTD, valid_BT, states[n])
        return x_BTD, dataclasses.replace(cache, layers=tuple(states))


def _attention(q, k, v, mixer, ctx):
    return attention(q, k, v, mask=mixer.call_mask(ctx, ctx.segment_ids_BT), impl=mixer.impl)
