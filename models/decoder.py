"""The decoder skeleton every family builds on: embed -> blocks -> final norm -> logits.

    block(x) = x + mixer(RMSNorm(x)), then x + ffn(RMSNorm(x))          (pre-norm; ffn "none" skips the second)

Which mixer and feed-forward each layer has is configuration: `model.pattern` lists layer entries,
`mixer` or `mixer+ffn` (the ffn defaults to `model.ffn`), repeated to `model.n_layers`:

    pattern=("attn",)                       every layer attention + SwiGLU (the dense model)
    pattern=("swa", "swa", "swa", "attn")   three sliding-window layers, then one global, repeated
    pattern=("mamba2+none", "attn")         alternate SSM layers without MLP and attention layers

Layers are registered by name (layers/mixer.py); adding one is one file.

Scan groups. The layer sequence is cut into groups of a repeating super-block (`scan_groups`): the
four-layer pattern above over 12 layers is one group, a 4-layer super-block scanned 3 times. Each
group's parameters are created stacked (`nnx.vmap`, leading axis named "layers") and run under one
`jax.lax.scan`, so compile time grows with the number of distinct super-blocks, not with depth.

Around each layer call the skeleton builds a `LayerContext` (positions, segment ids, train flag, a
per-layer rng, the absolute layer index, the depth-wise `carry` a layer may hand to the next) and gathers
what the layer reported (aux losses and diagnostics) and its updated non-trainable `Buffer`s out of the
scan. The model returns

    logits_BTV, aux = model(tokens_BT, positions_BT=..., segment_ids_BT=..., train=..., rng=...)
    aux = {"losses": {name: scalar}, "metrics": {name: array}, "state": nnx.State}   (keys absent when empty)

where "state" holds the layers' `Buffer`s as this call left them (`nnx.update(model, aux["state"])`
keeps them; the train step carries them to the next step).

Decoding: `init_cache` stacks each layer's own decode state (layers/kv_cache.py for attention), and
`prefill` / `decode_step` thread it through the same scan groups (models/registry.py: the contract).

Init: normal(init_std) for the embedding and every projection, except those that write into the
residual stream (attention output, MLP down), which use `out_init_std` = init_std / sqrt(2 n_layers)
(GPT-2): the residual then grows like the sum of 2L roughly independent terms of that size, so its
variance at the top stays ~init_std^2 whatever the depth. Parameters are fp32 master weights
(`param_dtype`), cast to the compute `dtype` at each matmul; norms, softmax and logits are fp32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers import mixer as mixer_lib
from effax.layers.attention import IMPLS
from effax.layers.mixer import Buffer, LayerContext
from effax.layers.norms import RMSNorm
from effax.layers.sharding import constrain, logical_init
from effax.models.registry import ConfigError, ModelConfig

RESIDUAL = ("batch", "seq", "embed")
REMAT_POLICIES = {
    "none": None,  # keep every activation of the layer
    "full": None,  # save only the super-block input: recompute it whole in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep projection outputs, recompute attention
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    mixer: str
    ffn: str  # a registered feed-forward, or "none"


@dataclasses.dataclass(frozen=True)
class ScanGroup:
    start: int  # absolute index of its first layer
    block: tuple[LayerSpec, ...]  # the super-block: its layers in order
    repeats: int

    @property
    def n_layers(self) -> int:
        return len(self.block) * self.repeats


def scan_groups(specs: tuple[LayerSpec, ...]) -> tuple[ScanGroup, ...]:
    """Cuts a layer sequence into runs of a repeated super-block: from each start, the period repeated at
    least twice that covers the most layers (the shortest on ties), else a single layer. ("a",)*4 -> one
    group a x 4; (a, a, b, c) x 3 -> (a, a, b, c) x 3; (a, b) x 2 + (a,) -> (a, b) x 2, then (a,) x 1."""
    groups, i, n = [], 0, len(specs)
    while i < n:
        best = (1, -1, 1)  # (layers covered, -period, repeats)
        for p in range(1, (n - i) // 2 + 1):
            reps = 1
            while specs[i + reps * p : i + (reps + 1) * p] == specs[i : i + p]:
                reps += 1
            if reps >= 2:
                best = max(best, (reps * p, -p, reps))
        covered, neg_p, reps = best
        groups.append(ScanGroup(i, tuple(specs[i : i - neg_p]), reps))
        i += covered
    return tuple(groups)


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    """Counts (conventions used by the scaling-law code), summed from each layer's own counts:

    param_count(): every parameter, norms included (matches the built model exactly).
    param_count(non_embedding=True): without the input embedding table (V*D). An untied LM head stays
      in (a matmul whose cost scales like the rest); a tied one is that same table, so nothing more is
      removed. Norm scales stay in.
    param_count(active=True): parameters used per token (an MoE counts its active experts only).
    flops_per_token(T): training FLOPs = 3 x forward (backward = 2 x forward), where forward = each
      layer's own count (2 x its matmul parameters, plus for attention 4 x keys x H x P for QK^T and AV
      over every key its mask allows, no causal halving: the PaLM / Chinchilla convention) + the LM head
      2 D V (counted once whether tied or not). Norms, RoPE, softmax and the embedding lookup are not
      counted.
    """

    pattern: tuple[str, ...] = ("attn",)  # layer entries "mixer" or "mixer+ffn", repeated to n_layers
    ffn: str = "swiglu"  # the feed-forward of entries that name none ("none": no feed-forward)
    sliding_window: int = 256  # keys seen by each query of a "swa" layer, itself included
    # Sparse-attention mixers (layers/sparse_attention.py, layers/nsa.py; docs/attention.md).
    attention_sinks: int = 4  # sink_swa: first tokens always seen (StreamingLLM keeps 4); window: sliding_window
    attention_chunk: int = 1024  # chunked: tokens per chunk
    sparse_block_size: int = 64  # block_sparse: tokens per block (BigBird: 64)
    sparse_local_blocks: int = 3  # block_sparse: blocks seen up to the own, itself included
    sparse_global_blocks: int = 1  # block_sparse: blocks at the start every query sees
    sparse_stride_blocks: int = 4  # block_sparse: also every this-many-th earlier block (0: none)
    moa_plan: str = ""  # moa: MoA plan JSON {"alphas", "betas"} [layers][heads]: span alpha + beta * N
    moa_sinks: int = 64  # moa: first tokens every head sees (MoA's global block)
    nsa_compress_block: int = 32  # nsa: l, tokens per compressed key (the paper's defaults follow)
    nsa_compress_stride: int = 16  # nsa: d, stride between compressed blocks
    nsa_select_block: int = 64  # nsa: l', tokens per selected block
    nsa_select_blocks: int = 16  # nsa: n, selected blocks per query (1 initial and 2 local among them)
    nsa_window: int = 512  # nsa: w, sliding-window branch

    @property
    def out_init_std(self) -> float:
        """Init std of projections that write into the residual stream (see the module docstring)."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        entries = [e.strip() for e in self.pattern]
        specs = []
        for e in (entries * -(-self.n_layers // max(len(entries), 1)))[: self.n_layers]:
            mixer, _, ffn = e.partition("+")
            specs.append(LayerSpec(mixer.strip(), ffn.strip() or self.ffn))
        return tuple(specs)

    def layer_classes(self) -> list[tuple[type, type | None]]:
        """(mixer class, feed-forward class or None) per layer."""
        return [(mixer_lib.mixer(s.mixer), None if s.ffn == "none" else mixer_lib.ffn(s.ffn)) for s in self.layer_specs]

    def param_count(self, *, non_embedding: bool = False, active: bool = False) -> int:
        V, D = self.vocab_size, self.d_model
        count = (lambda c: c.active_param_count(self)) if active else (lambda c: c.param_count(self))  # noqa: E731
        total = V * D + D  # embedding + final norm
        for mixer_cls, ffn_cls in self.layer_classes():
            total += D + count(mixer_cls) + (0 if ffn_cls is None else D + count(ffn_cls))  # each with its norm
        if not self.tie_embeddings:
            total += D * V
        return total - V * D if non_embedding else total

    def flops_per_token(self, seq_len: int) -> float:
        forward = 2 * self.d_model * self.vocab_size
        for mixer_cls, ffn_cls in self.layer_classes():
            forward += mixer_cls.flops_per_token(self, seq_len) + (0 if ffn_cls is None else ffn_cls.flops_per_token(self, seq_len))
        return 3.0 * forward

    def validate(self) -> None:
        super().validate()
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r} is not one of {list(REMAT_POLICIES)}")
        if self.attention_impl not in IMPLS:
            raise ConfigError(f"model.attention_impl={self.attention_impl!r} is not one of {list(IMPLS)}")
        if not isinstance(self.pattern, tuple) or not self.pattern or not all(isinstance(e, str) and e.strip() for e in self.pattern):
            raise ConfigError(f"model.pattern must be a non-empty list of layer entries (e.g. attn,swa), got {self.pattern!r}")
        if len(self.pattern) > self.n_layers:
            raise ConfigError(f"model.pattern has {len(self.pattern)} entries but model.n_layers={self.n_layers}; "
                              f"the pattern repeats to n_layers, so it may not be longer")
        mixers, ffns = mixer_lib.available()
        for entry in self.pattern:
            mixer, plus, ffn = (p.strip() for p in entry.partition("+"))
            if mixer not in mixers:
                raise ConfigError(f"model.pattern entry {entry!r}: unknown mixer {mixer!r}; registered mixers: {mixers}")
            if plus and ffn not in ffns + ["none"]:
                raise ConfigError(f"model.pattern entry {entry!r}: unknown feed-forward {ffn!r}; valid: {ffns + ['none']}")
        if self.ffn not in ffns + ["none"]:
            raise ConfigError(f"model.ffn={self.ffn!r} is not a registered feed-forward; valid: {ffns + ['none']}")
        if any(s.mixer == "swa" for s in self.layer_specs) and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be >= 1 for swa layers, got {self.sliding_window}")
        for layer_cls in {c for pair in self.layer_classes() for c in pair if c is not None}:
            try:
                layer_cls.check_config(self)
            except ValueError as e:
                raise ConfigError(str(e)) from None


class Block(nnx.Module):
    """One layer: x + mixer(RMSNorm(x)), then x + ffn(RMSNorm(x)) unless its ffn is "none".

    The feed-forward slot is the attribute `mlp` (whatever it holds: SwiGLU, MoE): its name sorts after
    `mixer` and `mixer_norm`, so parameter trees flatten in the pre-skeleton dense model's order
    (attn, attn_norm, mlp, mlp_norm) and sums over leaves (the optimizer's global norm) stay bit-identical.
    """

    def __init__(self, cfg: DecoderConfig, spec: LayerSpec, *, rngs: nnx.Rngs):
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mixer = mixer_lib.mixer(spec.mixer).from_config(cfg, rngs=rngs)
        if spec.ffn == "none":
            self.mlp_norm = self.mlp = None
        else:
            self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.mlp = mixer_lib.ffn(spec.ffn).from_config(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        x_BTD = constrain(x_BTD + self.mixer(self.mixer_norm(x_BTD), ctx), RESIDUAL)
        return self._ffn(x_BTD, ctx)

    def cached(self, x_BTD, ctx: LayerContext, state, i, *, prefill: bool):
        """The same layer with its mixer (and a feed-forward that has state) reading and writing `state`
        (repeat `i` of its scan group)."""
        mixer_state, ffn_state = (state.mixer, state.ffn) if isinstance(state, WithFFNState) else (state, None)
        step = self.mixer.prefill if prefill else self.mixer.decode
        y_BTD, mixer_state = step(self.mixer_norm(x_BTD), ctx, mixer_state, i)
        x_BTD = constrain(x_BTD + y_BTD, RESIDUAL)
        if ffn_state is None:
            return self._ffn(x_BTD, ctx), mixer_state
        step = self.mlp.prefill if prefill else self.mlp.decode
        y_BTD, ffn_state = step(self.mlp_norm(x_BTD), ctx, ffn_state, i)
        return constrain(x_BTD + y_BTD, RESIDUAL), WithFFNState(mixer_state, ffn_state)

    def _ffn(self, x_BTD, ctx):
        if self.mlp is None:
            return x_BTD
        return constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD), ctx), RESIDUAL)


class SuperBlock(nnx.Module):
    """The layers of one repeat of a scan group, in order."""

    def __init__(self, cfg: DecoderConfig, block: tuple[LayerSpec, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(cfg, spec, rngs=rngs) for spec in block])


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The model's cache: per scan group, per super-block position, that layer's state stacked over the
    group's repeats (None for a stateless layer); the tokens held per row (= next position); and the state
    layers share (`ctx.shared`: YOCO's single KV cache), kept once."""

    layers: tuple
    lengths_B: jax.Array
    shared: dict = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(DecodeState, data_fields=["layers", "lengths_B", "shared"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class WithFFNState:
    """A layer's decode state when its feed-forward has state too (Hydra's chunk-level MoE)."""

    mixer: object
    ffn: object


jax.tree_util.register_dataclass(WithFFNState, data_fields=["mixer", "ffn"], meta_fields=[])


def remat_layer(fn, remat: str):
    """Wraps a scan body (carry, xs) -> ... in jax.checkpoint per `remat`."""
    if remat == "none":
        return fn
    # prevent_cse=False: scan already keeps XLA from merging the recomputation into the forward.
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)


class Decoder(nnx.Module):
    """A family registers a subclass (`@register(name, ConfigClass)`), e.g. models/dense.py."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be set (> 0) before building, got {cfg.vocab_size}")
        self.cfg = cfg
        V, D, param_dtype = cfg.vocab_size, cfg.d_model, jnp.dtype(cfg.param_dtype)
        normal = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Param(logical_init(normal, ("vocab", "embed"))(rngs.params(), (V, D), param_dtype))
        self.blocks = nnx.List([self._make_group(g, rngs) for g in scan_groups(cfg.layer_specs)])  # one per scan group
        self.final_norm = RMSNorm(D, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = nnx.Param(logical_init(normal, ("embed", "vocab"))(rngs.params(), (D, V), param_dtype))

    def _make_group(self, group: ScanGroup, rngs: nnx.Rngs) -> SuperBlock:
        @nnx.split_rngs(splits=group.repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return SuperBlock(self.cfg, group.block, rngs=rngs)

        return make(rngs)  # every parameter gets a leading [repeats] axis named "layers"

    @property
    def scan_groups(self) -> tuple[ScanGroup, ...]:
        return scan_groups(self.cfg.layer_specs)

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, train: bool = False, rng=None, step=None):
        """tokens [B, T] int -> (logits [B, T, V] float32, aux) (the module docstring says what aux holds).

        positions_BT default to 0..T-1; pass positions restarting at 0 per packed document together
        with `segment_ids_BT` so a packed document is computed as if it were alone. `rng` (a key) feeds
        layers that draw random numbers in training; each layer gets its own fold of it. `step` (the training
        step, from the loop) reaches the layers as `ctx.step`.
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        ctx = LayerContext(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, train=train, rng=rng, step=step)
        x_BTD, aux = self.run_layers(self.embed_tokens(tokens_BT), ctx)
        return self.logits(x_BTD), aux

    def embed_tokens(self, tokens_BT) -> jax.Array:
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.cfg.dtype)
        return constrain(x_BTD, RESIDUAL)

    def run_layers(self, x_BTD, ctx: LayerContext) -> tuple[jax.Array, dict]:
        """Every scan group in order. Inside a scan the layer index is traced, so what a layer reports is
        stacked over the group's repeats and combined here, after the scans."""
        reported = {}  # name -> [(layer index, value)]
        reports = {}  # name -> Report (static: what and how to combine)
        new_buffers = {}  # scan group index -> its layers' Buffers after this call
        carry = self.init_carry(*x_BTD.shape[:2])  # depth-wise values (ctx.carry), threaded through the scans
        for g, (group, stacked) in enumerate(zip(self.scan_groups, self.blocks)):
            graphdef, state = nnx.split(stacked)

            def body(x_and_carry, xs, graphdef=graphdef, group=group):
                x_BTD, carry = x_and_carry
                params, r = xs
                superblock = nnx.merge(graphdef, params)
                values = []
                for j, block in enumerate(superblock.layers):
                    layer_ctx = _layer_ctx(ctx, group.start + r * len(group.block) + j, carry)
                    x_BTD = block(x_BTD, layer_ctx)
                    carry = layer_ctx.carry
                    values.append(layer_ctx.values)
                    _merge_reports(reports, layer_ctx.reports)
                return (x_BTD, carry), (values, nnx.state(superblock, Buffer))

            (x_BTD, carry), (values, buffers) = jax.lax.scan(remat_layer(body, self.cfg.remat), (x_BTD, carry),
                                                             (state, jnp.arange(group.repeats)),
                                                             unroll=min(self.cfg.scan_unroll, group.repeats))
            if jax.tree.leaves(buffers):
                new_buffers[g] = buffers
            for j, per_layer in enumerate(values):
                for name, value_R in per_layer.items():
                    for r in range(group.repeats):
                        reported.setdefault(name, []).append((group.start + r * len(group.block) + j, value_R[r]))
        aux = _combine(reports, reported)
        if new_buffers:
            # Returned, not written into self: under jax.grad a lax.scan leaves the trace the model was
            # merged in, and flax then refuses in-place updates (jax 0.10.2, flax 0.12.8).
            aux["state"] = nnx.State({"blocks": new_buffers})
        return x_BTD, aux

    def init_carry(self, batch: int, seq_len: int) -> dict:
        """What enters the first layer as `ctx.carry`: the union of the layers' `init_carry` ({} for most)."""
        carry = {}
        for classes in self.cfg.layer_classes():
            for cls in classes:
                if cls is not None:
                    carry.update(cls.init_carry(self.cfg, batch, seq_len))
        return carry

    # Decoding with a cache. `cache` is opaque to callers: build it with init_cache, thread it through.

    def init_cache(self, batch: int, max_len: int, dtype=None) -> DecodeState:
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated), in the
        compute dtype unless `dtype` says otherwise."""
        dtype = jnp.dtype(self.cfg.dtype if dtype is None else dtype)
        layers, shared = [], {}

        def stacked_state(cls, repeats):
            one = cls.init_state(self.cfg, batch, max_len, dtype)
            shared.update(cls.init_shared(self.cfg, batch, max_len, dtype))
            return None if one is None else cls.constrain_state(
                jax.tree.map(lambda a: jnp.broadcast_to(a, (repeats, *a.shape)), one))

        for group, stacked in zip(self.scan_groups, self.blocks):
            states = []
            for block in stacked.layers:
                state = stacked_state(type(block.mixer), group.repeats)
                ffn_state = None if block.mlp is None else stacked_state(type(block.mlp), group.repeats)
                states.append(state if ffn_state is None else WithFFNState(state, ffn_state))
            layers.append(tuple(states))
        return DecodeState(tuple(layers), jnp.zeros((batch,), jnp.int32), shared)

    def prefill(self, tokens_BT, lengths_B, cache: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Runs right-padded prompts (row b's prompt is tokens_BT[b, :lengths_B[b]], lengths >= 1) through
        an empty cache. Returns fp32 logits [B, V] at each row's last prompt token, and the cache
        holding lengths_B tokens per row. The LM head runs on those B positions only."""
        B, T = tokens_BT.shape
        lengths_B = lengths_B.astype(jnp.int32)
        ctx = LayerContext(positions_BT=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                           valid_BT=jnp.arange(T)[None, :] < lengths_B[:, None], lengths_B=lengths_B)
        x_BTD, cache = self._run_cached(self.embed_tokens(tokens_BT), ctx, cache, prefill=True)
        x_B1D = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
        return self.logits(x_B1D)[:, 0], dataclasses.replace(cache, lengths_B=lengths_B)

    def decode_step(self, tokens_B, cache: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Appends one token per row at position cache.lengths_B and returns the fp32 logits [B, V] for
        the next one. The caller keeps lengths below the cache's max_len (writes past it are dropped)."""
        B = tokens_B.shape[0]
        ctx = LayerContext(positions_BT=cache.lengths_B[:, None], valid_BT=jnp.ones((B, 1), bool))
        x_B1D, cache = self._run_cached(self.embed_tokens(tokens_B[:, None]), ctx, cache, prefill=False)
        return self.logits(x_B1D)[:, 0], dataclasses.replace(cache, lengths_B=cache.lengths_B + 1)

    def _run_cached(self, x_BTD, ctx: LayerContext, cache: DecodeState, *, prefill: bool):
        """`run_layers` with each group's state in the scan carry (written in place by the layers at their
        repeat index) and the repeat index as xs. Reports are dropped: decoding has no losses."""
        new_layers, shared = [], cache.shared
        carry = self.init_carry(*x_BTD.shape[:2])
        for group, stacked, states in zip(self.scan_groups, self.blocks, cache.layers):
            graphdef, params = nnx.split(stacked)

            def body(scan_carry, xs, graphdef=graphdef, group=group):
                x_BTD, states, carry, shared = scan_carry
                params, r = xs
                states = list(states)
                for j, block in enumerate(nnx.merge(graphdef, params).layers):
                    layer_ctx = _layer_ctx(ctx, group.start + r * len(group.block) + j, carry, shared)
                    x_BTD, states[j] = block.cached(x_BTD, layer_ctx, states[j], r, prefill=prefill)
                    carry, shared = layer_ctx.carry, layer_ctx.shared
                return (x_BTD, tuple(states), carry, shared), None

            (x_BTD, states, carry, shared), _ = jax.lax.scan(body, (x_BTD, states, carry, shared),
                                                             (params, jnp.arange(group.repeats)))
            new_layers.append(states)
        return x_BTD, dataclasses.replace(cache, layers=tuple(new_layers), shared=shared)

    def logits(self, x_BTD) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        x_BTD = self.final_norm(x_BTD).astype(dt)
        if self.cfg.tie_embeddings:
            logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, self.embed[...].astype(dt), preferred_element_type=jnp.float32)
        else:
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.head[...].astype(dt), preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("batch", "seq", "vocab"))


def _layer_ctx(ctx: LayerContext, layer, carry: dict | None = None, shared: dict | None = None) -> LayerContext:
    """The call's context for one layer: its index, its own fold of the rng, the depth-wise carry and (decoding)
    the state layers share."""
    rng = None if ctx.rng is None else jax.random.fold_in(ctx.rng, layer)
    return dataclasses.replace(ctx, layer=layer, rng=rng, values={}, reports={}, carry=dict(carry or {}),
                               shared=dict(shared or {}))


def _merge_reports(reports: dict, new: dict) -> None:
    for name, report in new.items():
        if reports.setdefault(name, report) != report:
            raise ValueError(f"figure {name!r} is reported by two layers with different kinds or reductions "
                             f"({reports[name]} vs {report})")


def _combine(reports: dict, reported: dict) -> dict:
    """Per-layer figures -> {"losses": ..., "metrics": ...}, each combined over layers as declared."""
    out = {"losses": {}, "metrics": {}}
    for name, pairs in reported.items():
        report = reports[name]
        pairs = sorted(pairs, key=lambda p: p[0])
        section = out["losses" if report.kind == "loss" else "metrics"]
        if report.reduce == "per_layer":
            section.update({f"{name}_layer{layer}": value for layer, value in pairs})
            continue
        values = jnp.stack([v for _, v in pairs])
        section[name] = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max}[report.reduce](values, axis=0)
    return {k: v for k, v in out.items() if v}
