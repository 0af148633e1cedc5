"""The dense baseline: counts against outside numbers and XLA, scan vs loop, causality, packing, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effax.layers.mixer import LayerContext
from effax.models import registry
from effax.models.dense import Dense, DenseConfig

TINY = DenseConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _n_params(model_or_state) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model_or_state, nnx.Param)))


@functools.cache
def _tiny():
    return Dense(TINY, rngs=nnx.Rngs(0))


def _forward(model, tokens, **kw):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t, kw: nnx.merge(graphdef, s)(t, **kw)[0])(state, tokens, kw)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads", [0, 1, 2])  # MHA, MQA, GQA
def test_param_count_matches_built_model(tie, kv_heads):
    cfg = dataclasses.replace(TINY, tie_embeddings=tie, n_kv_heads=kv_heads)
    model = nnx.eval_shape(lambda: Dense(cfg, rngs=nnx.Rngs(0)))
    assert _n_params(model) == cfg.param_count()
    embedding = cfg.vocab_size * cfg.d_model
    assert cfg.param_count(non_embedding=True) == cfg.param_count() - embedding


def test_param_count_llama2_7b():
    # Llama-2-7B (Touvron et al. 2023; HF config): 6,738,415,616 parameters, untied, norms included.
    cfg = DenseConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, tie_embeddings=False)
    assert cfg.param_count() == 6_738_415_616
    assert cfg.param_count(non_embedding=True) == 6_738_415_616 - 32000 * 4096


def test_flops_per_token_formula():
    # Written out independently: V=1000, D=128, L=3, H=8, K=2, Dh=16, F=384, untied, T=512.
    cfg = DenseConfig(vocab_size=1000, d_model=128, n_layers=3, n_heads=8, n_kv_heads=2, d_ff=384, tie_embeddings=False)
    per_layer = 128 * 8 * 16 * 2 + 128 * 2 * 16 * 2 + 3 * 128 * 384  # q+o, k+v, gate+up+down
    matmul_params = 3 * per_layer + 128 * 1000  # + LM head (the embedding lookup is no matmul)
    attention = 2 * 2 * 3 * 512 * 8 * 16  # QK^T and AV, full T x T
    assert cfg.flops_per_token(512) == 3 * (2 * matmul_params + attention)
    # Tied: the head is the embedding, still one matmul per token.
    assert dataclasses.replace(cfg, tie_embeddings=True).flops_per_token(512) == cfg.flops_per_token(512)


@pytest.mark.parametrize("tie,kv_heads", [(True, 2), (False, 4)])
def test_forward_flops_match_xla_cost_analysis(tie, kv_heads):
    # One layer: XLA's cost analysis counts a while loop's body once, whatever the trip count. The xla
    # attention impl at T 64, one query block: the convention counts the full T x T score matmuls, which it
    # then computes (past one block it skips the key blocks above the diagonal on CPU, and the blockwise impl
    # does too: tests/layers/test_attention_masks.py, tests/layers/test_attention_blockwise.py).
    cfg = DenseConfig(vocab_size=256, d_model=128, n_layers=1, n_heads=4, n_kv_heads=kv_heads, d_ff=384, tie_embeddings=tie,
                      attention_impl="xla")
    B, T = 2, 64
    model = Dense(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, jnp.zeros((B, T), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    want = cfg.flops_per_token(T) / 3 * B * T
    # XLA also counts elementwise work the convention leaves out: ~10 ops per attention score (scale,
    # mask, max, sub, exp, sum, div, ...), and per token a few ops per element of norms (D), RoPE
    # ((H+K) Dh), SwiGLU (F) and residuals. 20 ops per element bounds all of it.
    elementwise = 20 * (cfg.n_heads * T + 3 * cfg.d_model + cfg.ffn_dim + (cfg.n_heads + cfg.kv_heads) * cfg.dim_per_head)
    assert want <= cost["flops"] <= want + elementwise * B * T, (cost["flops"], want)


def test_compile_size_does_not_grow_with_depth():
    def hlo_len(n_layers):
        model = nnx.eval_shape(lambda: Dense(dataclasses.replace(TINY, n_layers=n_layers), rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        return len(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, jnp.zeros((2, 8), jnp.int32)).as_text())

    short, deep = hlo_len(2), hlo_len(8)
    assert abs(deep - short) / short < 0.01  # only shape digits differ


def test_scan_equals_python_loop():
    model = _tiny()
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, TINY.vocab_size)

    @jax.jit
    def unrolled(model, tokens):
        positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
        graphdef, stacked = nnx.split(model.blocks[0].layers[0])  # one scan group of one-layer super-blocks
        x = model.embed_tokens(tokens)
        for i in range(TINY.n_layers):
            x = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))(x, LayerContext(positions_BT=positions))
        return model.logits(x)

    np.testing.assert_allclose(_forward(model, tokens), unrolled(model, tokens), atol=1e-5, rtol=1e-5)  # fp32, same ops
    stacked = nnx.state(model.blocks[0].layers[0])
    # The layers really differ (each slice is its own layer).
    assert not np.allclose(stacked["mixer"]["q"][...][0], stacked["mixer"]["q"][...][1])


def test_logits_do_not_see_the_future():
    model = _tiny()
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, TINY.vocab_size)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % TINY.vocab_size)
    a, b = _forward(model, tokens), _forward(model, changed)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)  # only summation order could differ
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_packed_documents_equal_separate_documents():
    model = _tiny()
    lengths = [7, 12, 5]
    docs = [jax.random.randint(jax.random.key(i), (1, n), 0, TINY.vocab_size) for i, n in enumerate(lengths)]
    tokens = jnp.concatenate(docs, axis=1)
    segment_ids = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32) for i, n in enumerate(lengths)], axis=1)
    positions = jnp.concatenate([jnp.arange(n)[None] for n in lengths], axis=1)
    packed = _forward(model, tokens, positions_BT=positions, segment_ids_BT=segment_ids)
    start = 0
    for doc, n in zip(docs, lengths):
        alone = _forward(model, doc)
        # fp32; masked keys contribute exact zeros, only reduction order over T may differ.
        np.testing.assert_allclose(packed[:, start : start + n], alone, atol=2e-5, rtol=2e-5)
        start += n
    # Without segment ids the later documents do see the earlier ones.
    unmasked = _forward(model, tokens, positions_BT=positions)
    assert not np.allclose(unmasked[:, 7:19], packed[:, 7:19], atol=1e-3)


def test_remat_policies_give_the_same_gradients():
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, TINY.vocab_size)

    state = nnx.state(_tiny())

    def grads(remat):  # same parameters, the graph of a model built with this remat policy
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Dense(dataclasses.replace(TINY, remat=remat), rngs=nnx.Rngs(0))))
        loss = lambda s: jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, s)(tokens)[0], axis=-1))
        return jax.jit(jax.grad(loss))(state)

    base = grads("none")
    for remat in ("full", "dots"):
        # Recomputation runs the same fp32 ops; XLA may fuse them differently (last-bit differences).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), base, grads(remat))
    with pytest.raises(registry.ConfigError, match="remat"):
        nnx.eval_shape(lambda: Dense(dataclasses.replace(TINY, remat="some"), rngs=nnx.Rngs(0)))


def test_bf16_compute_with_fp32_master_weights():
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, TINY.vocab_size)
    bf16 = Dense(dataclasses.replace(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    a, b = _forward(_tiny(), tokens), _forward(bf16, tokens)
    assert b.dtype == jnp.float32
    # bf16 rounds to 8 significant bits (unit roundoff 2^-9 = 0.2%); ~20 roundings from embedding to
    # logits, independent, add in quadrature: ~1% relative error at this (gain ~1) init; bound 2%.
    assert np.linalg.norm(a - b) < 0.02 * np.linalg.norm(a)


def test_init_scales_residual_projections():
    cfg = dataclasses.replace(TINY, d_model=64, n_layers=2, d_ff=128)
    model = Dense(cfg, rngs=nnx.Rngs(0))
    out_std = cfg.init_std / np.sqrt(2 * cfg.n_layers)
    # >= 8k samples each: the sample std is within ~1/sqrt(2n) < 1% of the true one; 5% is a safe bound.
    layer = model.blocks[0].layers[0]  # all layers, stacked
    np.testing.assert_allclose(np.std(layer.mixer.o[...]), out_std, rtol=0.05)
    np.testing.assert_allclose(np.std(layer.mlp.down[...]), out_std, rtol=0.05)
    np.testing.assert_allclose(np.std(layer.mixer.q[...]), cfg.init_std, rtol=0.05)
    np.testing.assert_allclose(np.std(model.embed[...]), cfg.init_std, rtol=0.05)


def test_registry_builds_dense():
    assert "dense" in registry.available()
    assert registry.config_class("dense") is DenseConfig
    model = registry.build(TINY, rngs=nnx.Rngs(0))
    logits, aux = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, TINY.vocab_size) and logits.dtype == jnp.float32 and aux == {}
    with pytest.raises(registry.ConfigError, match="vocab_size"):
        Dense(dataclasses.replace(TINY, vocab_size=0), rngs=nnx.Rngs(0))


RULES = [
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("seq", None),
]


def test_sharded_shape_first_init_and_forward():
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)"
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = TINY  # tied: the LM head is the sharded embedding
    tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, cfg.vocab_size)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        abstract = nnx.eval_shape(lambda: registry.build(cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        specs = nnx.get_partition_spec(abstract_state)
        assert specs["embed"].get_value() == P("tensor", "fsdp")
        layer = specs["blocks"][0]["layers"][0]
        assert layer["mixer"]["q"].get_value() == P(None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
        assert layer["mixer"]["o"].get_value() == P(None, "tensor", None, "fsdp")
        assert layer["mlp"]["down"].get_value() == P(None, "tensor", "fsdp")
        untied = nnx.eval_shape(lambda: registry.build(dataclasses.replace(cfg, tie_embeddings=False), rngs=nnx.Rngs(0)))
        assert nnx.get_partition_spec(nnx.state(untied))["head"].get_value() == P("fsdp", "tensor")
        shardings = jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs)

        @functools.partial(jax.jit, out_shardings=shardings)
        def init():
            return nnx.state(registry.build(cfg, rngs=nnx.Rngs(0)))

        state = init()
        q = state["blocks"][0]["layers"][0]["mixer"]["q"].get_value()
        assert q.sharding.spec == P(None, "fsdp", "tensor", None)
        assert q.addressable_shards[0].data.shape == (cfg.n_layers, cfg.d_model // 2, cfg.n_heads // 2, cfg.dim_per_head)

        batch = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, batch)
        assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
    # Same numbers as an unsharded model with the same seed.
    want = _forward(Dense(cfg, rngs=nnx.Rngs(0)), tokens)
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=1e-5)  # fp32; sharded reductions reorder sums
