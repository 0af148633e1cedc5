"""Expert parallelism: every router and expert set of the MoE layer gives, under 8-device meshes with an
`expert` axis (all-to-all inside shard_map), the one-device loss, gradients, reported figures and aux-free
bias update; with gmm_impl=megablox (auto's pick on TPU) the layer exports for TPU under such a mesh, and
(slow) gives the one-device result interpreted. The training-loop curves are in tests/models/test_moe_training.py."""

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effax.layers.mixer import Buffer, LayerContext
from effax.layers.moe import CARRY, MoE, n_routed
from effax.models.moe import MoEConfig
from effax.train import config as config_lib
from effax.train import mesh as mesh_lib

B, T, D = 8, 8, 16  # B: one row per device at 8-way batch splits
BASE = MoEConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, d_ff=32, n_experts=4, top_k=2, expert_d_ff=8,
                 init_std=0.3)
ROUTERS = {  # every router and expert set, in one jitted program per mesh
    "top-k dropless + shared": {"n_shared_experts": 1},
    "top-k capacity": {"dispatch": "capacity", "capacity_factor": 0.5},  # drops: the same tokens on any mesh
    "aux-free": {"balance": "aux_free", "router_score": "sigmoid"},
    "expert choice": {"router": "expert_choice", "dispatch": "capacity", "balance": "none"},
    "MoGE": {"router": "moge", "n_groups": 2},
    "MoE++": {"n_zero_experts": 1, "n_copy_experts": 1, "n_constant_experts": 2, "gating_residual": True},
    "BigMac": {"bigmac_dim": 8},
}
MESHES = {"expert=4 (data=2)": {"expert": 4}, "expert=2 fsdp=4": {"data": 1, "fsdp": 4, "expert": 2}}


@functools.cache
def _layers():
    return [MoE(dataclasses.replace(BASE, **kw), rngs=nnx.Rngs(i)) for i, kw in enumerate(ROUTERS.values())]


def _inputs():
    rng = np.random.default_rng(0)
    x, d = (jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32) for _ in range(2))
    carries = [jnp.asarray(rng.standard_normal((B, T, n_routed(layer.cfg))), jnp.float32) for layer in _layers()]
    return x, d, carries


def _loss(states, x, d, carries, graphdefs):
    """Σ over the layers of sum(y · d) + their aux losses; -> (loss, (new buffers, figures))."""
    total, buffers, figures = 0.0, [], []
    for graphdef, state, carry in zip(graphdefs, states, carries):
        layer = nnx.merge(graphdef, state)
        ctx = LayerContext(positions_BT=jnp.zeros((B, T), jnp.int32), train=True,
                           carry={CARRY: carry} if layer.cfg.gating_residual else {})
        y = layer(x, ctx)
        total = total + jnp.sum(y * d) + sum(v for k, v in ctx.values.items() if ctx.reports[k].kind == "loss")
        buffers.append(nnx.state(layer, Buffer))
        figures.append(ctx.values)
    return total, (buffers, figures)


def _run(mesh_sizes, only=None, lower_only=False):
    """Loss, gradients, buffers and figures of the layers (those named in `only`, else all) on one device
    (mesh_sizes None) or on an 8-device mesh; with lower_only, the lowered program's text instead."""
    picked = [i for i, name in enumerate(ROUTERS) if only is None or name in only]
    graphdefs, states = zip(*(nnx.split(_layers()[i]) for i in picked))
    fn = jax.value_and_grad(functools.partial(_loss, graphdefs=graphdefs), argnums=(0, 1), has_aux=True)
    x, d, carries = _inputs()
    args = [list(states), x, d, [carries[i] for i in picked]]
    if mesh_sizes is None:
        return jax.jit(fn)(*args)
    mesh_cfg = dataclasses.replace(config_lib.MeshConfig(), **mesh_sizes)
    mesh, rules = mesh_lib.make_mesh(mesh_cfg), mesh_lib.rules(mesh_cfg)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        args[0] = [jax.device_put(s, nnx.get_named_sharding(s, mesh)) for s in args[0]]
        rows = jax.sharding.NamedSharding(mesh, mesh_lib.logical_spec(("batch", "seq", None), rules))
        args[1:] = jax.device_put(args[1:], rows)
        lowered = jax.jit(fn).lower(*args)
        return lowered.as_text() if lower_only else lowered.compile()(*args)


@functools.cache
def _one_device():
    return _run(None)


# expert=4 (data=2) is slow (~40 s; make test-slow): the default suite runs expert=2 x fsdp=4.
@pytest.mark.parametrize("mesh", [pytest.param(m, marks=pytest.mark.slow) if m.startswith("expert=4") else m for m in MESHES])
def test_every_router_gives_the_one_device_result_under_expert_parallelism(mesh):
    (loss, (buffers, figures)), grads = _run(MESHES[mesh])
    (ref_loss, (ref_buffers, ref_figures)), ref_grads = _one_device()
    # fp32: sharding only splits sums (the batch over devices, FSDP gathers; all-to-all moves rows
    # unchanged): ~1e-7 relative per op; 1e-5 is the bound and far below a wrong token's effect.
    tol = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(loss, ref_loss, **tol)
    for name, g, r in zip(ROUTERS, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, err_msg=name, **tol)
    for name, f, r in zip(ROUTERS, figures, ref_figures):
        assert f.keys() == r.keys()
        for key in f:
            np.testing.assert_allclose(f[key], r[key], err_msg=f"{name}: {key}", **tol)
    np.testing.assert_array_equal(jax.tree.leaves(buffers)[0], jax.tree.leaves(ref_buffers)[0])  # the aux-free bias


@pytest.mark.parametrize("name, width", [("top-k dropless + shared", D), ("BigMac", 8)])
def test_tokens_travel_by_all_to_all_at_the_experts_width(name, width):
    """Each layer's tokens go to their experts' devices and back by all-to-all inside shard_map; BigMac's
    carry its low width (8), not d_model (16)."""
    hlo = _run(MESHES["expert=4 (data=2)"], only=(name,), lower_only=True)
    moves = [line for line in hlo.splitlines() if "all_to_all" in line and "f32" in line]
    assert len(moves) >= 4, moves  # there and back, forward and backward
    assert all(f"x{width}xf32>" in line for line in moves), moves


def _tpu_export_text(impl, mesh_sizes):
    """The TPU export (StableHLO text) of the dropless layer's loss and gradients with gmm_impl=impl under an
    expert-parallel mesh; shapes only."""
    cfg = dataclasses.replace(BASE, gmm_impl=impl, n_shared_experts=1)
    mesh_cfg = dataclasses.replace(config_lib.MeshConfig(), **mesh_sizes)
    mesh, rules = mesh_lib.make_mesh(mesh_cfg), mesh_lib.rules(mesh_cfg)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                             nnx.get_named_sharding(state, mesh))
        rows = jax.sharding.NamedSharding(mesh, mesh_lib.logical_spec(("batch", "seq", None), rules))
        x = jax.ShapeDtypeStruct((B, T, D), jnp.float32, sharding=rows)
        fn = jax.value_and_grad(functools.partial(_loss, graphdefs=[graphdef]), argnums=(0, 1), has_aux=True)
        return jax.export.export(jax.jit(fn), platforms=["tpu"])([state], x, x, [x]).mlir_module()


def test_dropless_layer_with_megablox_exports_for_tpu_under_expert_parallelism():
    """gmm_impl=auto is megablox on TPU. Its kernels inside the dispatch's shard_map failed to trace with jax
    0.10 (outputs declaring no varying axes); exported for TPU here: forward gmm, backward gmm and tgmm, and
    the same collectives as the xla impl (the unchecked inner shard_map of kernels/gmm/ops.py moves no data)."""
    texts = {impl: _tpu_export_text(impl, MESHES["expert=2 fsdp=4"]) for impl in ("megablox", "xla")}
    assert "tpu_custom_call" in texts["megablox"] and "@tgmm" in texts["megablox"]
    pattern = r"stablehlo\.(all_reduce|all_gather|all_to_all|reduce_scatter|collective_permute)"
    collectives = {impl: collections.Counter(re.findall(pattern, text)) for impl, text in texts.items()}
    assert collectives["megablox"] == collectives["xla"] and collectives["xla"]["all_to_all"] >= 4, collectives


@pytest.mark.slow  # megablox interpreted: ~15 s
def test_dropless_layer_with_megablox_interpreted_gives_the_one_device_result(monkeypatch):
    """The megablox path's numbers inside the dispatch's shard_map (Pallas interpret mode on CPU, which runs
    there since its calls run with the check off): loss and gradients as on one device with the xla impl."""
    from effax.kernels.gmm import ops as gmm_ops

    name = "top-k dropless + shared"
    (ref_loss, _), ref_grads = _run(None, only=(name,))
    gmm, calls = gmm_ops.gmm, []

    def megablox(x, w, sizes, impl):
        calls.append(impl)
        return gmm(x, w, sizes, impl="megablox", interpret=True)

    monkeypatch.setattr(gmm_ops, "gmm", megablox)
    (loss, _), grads = _run(MESHES["expert=2 fsdp=4"], only=(name,))
    assert len(calls) == 3  # gate, up, down
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
