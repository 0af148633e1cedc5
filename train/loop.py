"""The training loop: one batch from disk to the loss and back, in this file.

    train(cfg, workdir)  →  config.json, metrics.jsonl, tb/, checkpoints/ under workdir

Flow: mesh and rules → shape-first init → optimizer → restore the latest good checkpoint if any →
`jit(train_step, in_shardings, out_shardings, donate_argnums)` → per step: next host batch → global
array → step (dispatched asynchronously) → the *previous* step's metrics fetched while this one runs →
validation and checkpoints at their intervals (after the step's figures are checked finite).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import platform
import signal
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effax.models import registry
from effax.models.generate import generate
from effax.train import checkpoint as ckpt_lib
from effax.train import config as config_lib
from effax.train import data as data_lib
from effax.train import mesh as mesh_lib
from effax.train import metrics as metrics_lib
from effax.train import optimizer as optimizer_lib

INTERRUPTED_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal number, the shell's convention


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the run stops without checkpointing the poisoned state."""


# XLA:CPU (jax 0.10) hands dots to YNNPACK by default; XLA's own (Eigen) dots ran this machine's fp32 matmuls
# faster, and whole train steps in 0.85-0.96x the time (quickstart, MoE, MoR, hybrid; docs/benchmarks.md, "Matmuls
# on XLA:CPU"). So with train.cpu_dots="xla" (the default) the steps keep YNNPACK for reductions only; "ynnpack"
# compiles with XLA's defaults. The other backends get no options.
CPU_DOTS_OPTIONS = {"xla": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}, "ynnpack": None}

# XLA:CPU allocates a step's scratch as one block (650 MB for the quickstart at batch 16). glibc serves a block
# that large with a fresh mmap and unmaps it on free, so every step page-faulted and zero-filled it anew: 17% of
# the step's time in the kernel (perf; docs/benchmarks.md, "Step scratch memory and RoPE's sin / cos on XLA:CPU").
# train.cpu_buffers="reuse" has XLA split the scratch into heaps of at most 16 MiB, under the 32 MiB (glibc's
# largest) mmap threshold that `keep_freed_host_memory` sets, so the allocator serves them from its arenas and
# keeps them.
CPU_BUFFERS_OPTIONS = {"reuse": {"xla_multiheap_size_constraint_per_heap": 16 << 20}, "xla": None}
_MALLOPT = {-3: 32 << 20, -1: 1 << 30, -2: 64 << 20}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD (malloc.h)


@functools.cache
def keep_freed_host_memory() -> bool:
    """Tunes glibc's malloc, once per process, to keep what it frees: blocks under 32 MiB come from its arenas
    (not mmap), up to 1 GiB free at a heap's top is not returned, and 64 MiB of padding keeps a thread arena's
    emptied heaps from being unmapped. The process's resident memory then stays near its peak, as a caching
    allocator's does. False (nothing done) off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in _MALLOPT.items())


def split_scratch(cpu_buffers: str) -> bool:
    """Whether steps compile with the split scratch: cpu_buffers="reuse" on CPU, unless JAX's persistent
    compilation cache is on (XLA:CPU cannot serialize an executable with more than one scratch allocation, so
    the cache would never hold the step; the test suite's shared cache is one such case)."""
    return CPU_BUFFERS_OPTIONS[cpu_buffers] is not None and jax.default_backend() == "cpu" \
        and not jax.config.jax_compilation_cache_dir


def compiler_options(cpu_dots: str = "xla", cpu_buffers: str = "reuse") -> dict | None:
    """The XLA options the loop's train and eval steps compile with (train.cpu_dots and train.cpu_buffers;
    CPU only). With the split scratch it also calls `keep_freed_host_memory`, which the split needs."""
    if jax.default_backend() != "cpu":
        return None
    options = dict(CPU_DOTS_OPTIONS[cpu_dots] or {})
    if split_scratch(cpu_buffers):
        options.update(CPU_BUFFERS_OPTIONS[cpu_buffers])
        keep_freed_host_memory()
    return options or None


_HEAP_LIMIT_WARNING = "larger than the per-heap size limit"


@contextlib.contextmanager
def without_heap_limit_warnings():
    """Holds back this process's stderr (file descriptor 2) and replays it without XLA's per-heap-limit warnings;
    yields a list that holds the dropped lines afterwards.

    A buffer larger than the 16 MiB heap limit gets a heap of its own, and XLA logs a warning for it on every
    packing pass: 18,133 lines for one compile of the d512 / 8-layer / T512 step. Everything else written
    meanwhile is replayed when the block ends (a raised error included)."""
    dropped = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield dropped
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = []
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                (dropped if _HEAP_LIMIT_WARNING in line else kept).append(line)
            sys.stderr.write("".join(kept))


class SplitScratchStep:
    """A step compiled ahead of its first call for each argument signature, with the split scratch where that pays.

    The compile runs inside `without_heap_limit_warnings`. If XLA had to give some buffer a heap of its own (larger
    than the 16 MiB limit), the step is compiled a second time, without the split: there the split did not pay (the
    d512 / 8-layer / T512 step took 1.2x the time and 1.7x the resident memory of XLA's one block, as each of
    XLA's threads' malloc arenas kept its own copy). `lower` is the split jit's; `compiled` the executable used."""

    def __init__(self, split, unsplit, static_argnums=()):
        self.split, self.unsplit, self._compiled = split, unsplit, {}
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)

    def compiled(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((x.shape, x.dtype) if hasattr(x, "shape") else x for x in leaves))
        if key not in self._compiled:
            with without_heap_limit_warnings() as dropped:
                executable = self.split.lower(*args).compile()
            if dropped:
                executable = self.unsplit.lower(*args).compile()
            self._compiled[key] = executable
        return self._compiled[key]

    def __call__(self, *args):
        return self.compiled(*args)(*(a for i, a in enumerate(args) if i not in self.static_argnums))

    def lower(self, *args, **kwargs):
        return self.split.lower(*args, **kwargs)


def compiled_step(step, *args):
    """The executable that `step` (a `step_jit` result) runs for these arguments: a `SplitScratchStep`'s choice,
    or the jit's own compile."""
    return step.compiled(*args) if isinstance(step, SplitScratchStep) else step.lower(*args).compile()


def step_jit(fn, cpu_dots: str = "xla", cpu_buffers: str = "reuse", **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with `compiler_options(cpu_dots, cpu_buffers)`; where the scratch is
    split (CPU, "reuse"), a `SplitScratchStep` that falls back to XLA's one block when the split does not fit."""
    jitted = jax.jit(fn, compiler_options=compiler_options(cpu_dots, cpu_buffers), **jit_kwargs)
    if not split_scratch(cpu_buffers):
        return jitted
    unsplit = jax.jit(fn, compiler_options=compiler_options(cpu_dots, "xla"), **jit_kwargs)
    return SplitScratchStep(jitted, unsplit, jit_kwargs.get("static_argnums", ()))


# ---------------------------------------------------------------------------------------------------
# The loss and the step (pure functions of the state)


def cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float):
    """Summed token cross-entropy and z-loss in fp32 (the caller divides by the token count)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    ce = jnp.sum((lse_BT - target_logit_BT) * mask_BT)
    zl = z_loss * jnp.sum(jnp.square(lse_BT) * mask_BT)
    return ce, zl


# Figures the loop itself logs; a model's reported figures carry a family prefix ("moe/…") and may not
# take one of these names.
LOOP_KEYS = frozenset({"loss", "z_loss", "grad_norm", "lr", "params_finite", "tokens_per_s", "mfu", "perplexity", "bpb"})


def model_figures(aux: dict) -> tuple[dict, dict]:
    """(aux losses, diagnostics) of a model call's `aux` (models/decoder.py), checked against LOOP_KEYS."""
    losses, metrics = aux.get("losses", {}), aux.get("metrics", {})
    clash = sorted((set(losses) | set(metrics)) & LOOP_KEYS)
    if clash:
        raise ValueError(f"model figures {clash} collide with the training loop's own keys {sorted(LOOP_KEYS)}; "
                         f"name them with a family prefix (e.g. 'moe/{clash[0]}')")
    return losses, metrics


def step_rng(state) -> jax.Array:
    """The key of this step for layers that draw random numbers (routing noise, dropout): the run's
    seed folded with the step, so a resumed run draws the same numbers."""
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def make_train_step(graphdef, tx, lr_schedule, cfg: config_lib.Config):
    n_micro, z_loss = cfg.train.microbatches, cfg.train.z_loss

    def loss_fn(params, other, batch, n_tokens, rng, step):
        model = nnx.merge(graphdef, params, other)
        logits, aux = model(batch["tokens"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
                            train=True, rng=rng, step=step)
        losses, metrics = model_figures(aux)
        ce, zl = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        aux_total = sum(losses.values()) if losses else 0.0
        loss = (ce + zl) / n_tokens + aux_total / n_micro
        # Aux losses and diagnostics are averaged over micro-batches (each micro-batch reports its own).
        stats = {"ce_sum": ce, "z_loss_sum": zl, **{k: v / n_micro for k, v in {**losses, **metrics}.items()}}
        other = nnx.state(model, nnx.Not(nnx.Param))
        if "state" in aux:  # the layers' Buffers as this step left them (models/decoder.py)
            other = nnx.merge_state(other, aux["state"])
        return loss, (stats, other)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        rng = step_rng(state)
        if n_micro == 1:
            grads, (stats, other) = grad_fn(state["params"], state["other"], batch, n_tokens, rng, state["step"])
        else:
            # Micro-batch m takes rows m, m+M, m+2M, …: every device keeps its share of each micro-batch.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, xs):
                grads, stats, other = carry
                mb, m = xs
                g, (s, other) = grad_fn(state["params"], other, mb, n_tokens, jax.random.fold_in(rng, m), state["step"])
                return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, stats, s), other), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            stats0 = jax.eval_shape(lambda: grad_fn(state["params"], state["other"], jax.tree.map(lambda x: x[0], micro),
                                                    n_tokens, rng, state["step"])[1][0])
            stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats0)
            (grads, stats, other), _ = jax.lax.scan(accumulate, (zeros, stats0, state["other"]), (micro, jnp.arange(n_micro)))
        updates, opt_state = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # One pass over the new parameters: a finite loss can still come with an overflowing update, and
        # the NaN guard must never let such a state reach a checkpoint.
        params_finite = jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda p: jnp.all(jnp.isfinite(p)), params))
        metrics = {
            "loss": stats.pop("ce_sum") / n_tokens,
            "params_finite": params_finite.astype(jnp.float32),
            "z_loss": stats.pop("z_loss_sum") / n_tokens,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state["step"]),
            **stats,
        }
        new_state = {"params": params, "other": other, "opt": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    def eval_step(state, batch):
        model = nnx.merge(graphdef, state["params"], state["other"])
        logits, _ = model(batch["tokens"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
        ce, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)
        return {"ce_sum": ce, "tokens": jnp.sum(batch["loss_mask"]), "bytes": jnp.sum(batch["target_bytes"])}

    return eval_step


# ---------------------------------------------------------------------------------------------------
# Setting up a run


def resolve_vocab(cfg: config_lib.Config, tokenizer) -> config_lib.Config:
    """Fills model.vocab_size from the tokenizer, or checks that it is large enough."""
    if cfg.model.vocab_size == 0:
        # Padded to a multiple of 128: the vocab axis then shards over any tensor axis up to 128 and the
        # LM-head matmul keeps an accelerator-friendly width. The extra ids are never targets.
        padded = -(-tokenizer.vocab_size // 128) * 128
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                     f"{tokenizer.vocab_size}; set it to >= {tokenizer.vocab_size} or 0")
    return cfg


def check_resumable(workdir: str, cfg: config_lib.Config) -> None:
    """A workdir is resumed only by the same run: model, data, batch and seed must match. The mesh may
    change (the checkpoint restores into any sharding), and so may steps, intervals and logging."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    old = config_lib.to_dict(config_lib.from_json(path))
    new = config_lib.to_dict(cfg)
    fixed = ["model", "data"]
    diffs = [f"{s}.{k}: {old[s].get(k)!r} → {new[s][k]!r}" for s in fixed for k in new[s] if old[s].get(k) != new[s][k]]
    diffs += [f"train.{k}: {old['train'][k]!r} → {new['train'][k]!r}" for k in ("batch_size", "seed", "microbatches")
              if old["train"][k] != new["train"][k]]
    if diffs:
        raise config_lib.ConfigError(f"{workdir} holds a different run; use another --workdir. Differences: "
                                     + "; ".join(diffs))


def abstract_train_state(graphdef_state_shardings, tx, mesh):
    """The train state as ShapeDtypeStructs with shardings (for jit in/out shardings and restore)."""
    _, abstract, shardings = graphdef_state_shardings
    params, other = nnx.split_state(abstract, nnx.Param, ...)
    p_shard, o_shard = nnx.split_state(shardings, nnx.Param, ...)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, params)
    # The optimizer's moments take their parameter's sharding (ZeRO-3); its counters are replicated.
    opt_shardings = optax.tree_utils.tree_map_params(tx, lambda _, s: s, opt_abstract, p_shard,
                                                     transform_non_params=lambda _: replicated)
    state = {"params": params, "other": other, "opt": opt_abstract,
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    state_shardings = {"params": p_shard, "other": o_shard, "opt": opt_shardings, "step": replicated, "rng": replicated}
    return state, state_shardings


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The jitted pieces of a run, shared by `train` and `effax bench model`."""

    graphdef: object
    abstract_state: object  # ShapeDtypeStructs carrying their shardings: the restore target
    init_state: object  # () -> a freshly initialised, sharded train state
    train_step: object  # (state, batch) -> (state, metrics); donates the state
    eval_step: object  # (state, batch) -> sums of loss, tokens and bytes
    batch_sharding: jax.sharding.NamedSharding

    def to_global(self, local_batch: dict) -> dict:
        """This process's rows → global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}


def build_trainer(cfg: config_lib.Config, mesh, rules) -> Trainer:
    """Shape first: the abstract model gives the shardings, and only then does a jitted init create the
    parameters and optimizer state directly in their shards."""
    tx, lr_schedule = optimizer_lib.build(cfg.optimizer, cfg.train.steps)
    shaped = mesh_lib.abstract_model(cfg.model, mesh, rules, cfg.train.seed)
    abstract_state, state_shardings = abstract_train_state(shaped, tx, mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)

    def init_state():
        model = registry.build(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        params, other = nnx.state(model, nnx.Param, ...)
        rng = jax.random.key_data(jax.random.key(cfg.train.seed)).astype(jnp.uint32)
        return {"params": params, "other": other, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": rng}

    return Trainer(
        graphdef=shaped[0],
        abstract_state=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_shardings),
        init_state=jax.jit(init_state, out_shardings=state_shardings),
        train_step=step_jit(make_train_step(shaped[0], tx, lr_schedule, cfg), cfg.train.cpu_dots, cfg.train.cpu_buffers,
                            in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                            donate_argnums=(0,)),
        eval_step=step_jit(make_eval_step(shaped[0]), cfg.train.cpu_dots, cfg.train.cpu_buffers,
                           in_shardings=(state_shardings, batch_sharding)),
        batch_sharding=batch_sharding,
    )


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: config_lib.Config, workdir: str, *, quiet: bool = False) -> int:
    """Trains (or resumes) the run in `workdir`. Returns the process exit status: 0, or 143 / 130 after
    SIGTERM / SIGINT (a checkpoint saved after the next step).

    The handlers go in before anything else: a time limit or a scancel that lands during start-up
    (data, compilation, restore) must still end in a saved, resumable stop, not a kill."""
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, request_stop) for s in INTERRUPTED_EXIT}
    try:
        return _train(cfg, workdir, quiet, stop)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _train(cfg: config_lib.Config, workdir: str, quiet: bool, stop: dict) -> int:
    config_lib.validate(cfg)
    tokenizer = data_lib.tokenizer_for(cfg.data)
    cfg = resolve_vocab(cfg, tokenizer)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_divisibility(cfg, mesh)
    rules = mesh_lib.rules(cfg.mesh)
    lead = jax.process_index() == 0
    say = (lambda *a: None) if quiet or not lead else print

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    check_resumable(workdir, cfg)
    if lead:
        config_lib.to_json(cfg, os.path.join(workdir, "config.json"))

    # Data: each process reads only its rows of every global batch.
    pidx, pcount = jax.process_index(), jax.process_count()
    train_iter = data_lib.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                         process_index=pidx, process_count=pcount)
    val_batches = data_lib.val_batches(cfg.data, batch_size=config_lib.eval_batch_size(cfg), num_batches=cfg.eval.batches,
                                       process_index=pidx, process_count=pcount)

    trainer = build_trainer(cfg, mesh, rules)
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    log = metrics_lib.MetricsLog(workdir, tensorboard=cfg.logging.tensorboard, enabled=lead)
    to_global, graphdef = trainer.to_global, trainer.graphdef

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        restored = ckpts.restore_latest(trainer.abstract_state)
        if restored is None:
            state = trainer.init_state()
            start = 0
        else:
            start, state, data_state, _ = restored
            train_iter.set_state(data_state)
            say(f"resumed from step {start} of {workdir}")
        # Lines past the starting step belong to steps about to be re-run (a run killed before its first
        # checkpoint restarts from 0 and must not leave its old lines behind).
        log.truncate_after(start)
        n_params = cfg.model.param_count()
        flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
        say(f"{cfg.name}: {cfg.model.type} model, {n_params / 1e6:.2f}M parameters, mesh "
            + " × ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" on {jax.device_count()} {jax.devices()[0].platform} devices")

        train_step, eval_step = trainer.train_step, trainer.eval_step
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        peak = metrics_lib.peak_flops()
        progress = None
        if cfg.logging.progress and lead and not quiet:
            from tqdm import tqdm

            progress = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)

        def evaluate(step):
            sums = {"ce_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
            for b in val_batches:
                out = jax.device_get(eval_step(state, to_global(b)))
                sums = {k: sums[k] + float(out[k]) for k in sums}
            loss = sums["ce_sum"] / sums["tokens"]
            figures = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                       "bpb": sums["ce_sum"] / math.log(2) / sums["bytes"]}
            log.write(step, "val", figures)
            return figures

        last_time, last_step = None, start
        last_loss = None

        def record(step, metrics):
            """Fetches one step's figures (the device has the next step queued by now)."""
            nonlocal last_time, last_step, last_loss
            m = {k: (float(v) if v.ndim == 0 else v) for k, v in jax.device_get(metrics).items()}  # vectors: per-expert figures
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m.pop("params_finite") == 1.0):
                raise TrainingDiverged(f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} or the updated "
                                       f"parameters are not finite; "
                                       f"stopping without saving (last good checkpoint: {max(ckpts.steps(), default=None)}). "
                                       f"Lower optimizer.lr, raise optimizer.warmup_steps or set train.z_loss.")
            now = time.perf_counter()
            if last_time is not None and step > last_step:
                tok_s = tokens_per_step * (step - last_step) / (now - last_time)
                m["tokens_per_s"] = tok_s
                if peak:
                    m["mfu"] = tok_s * flops_per_token / (peak * jax.device_count())
            last_time, last_step, last_loss = now, step, m["loss"]
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                log.write(step, "train", m)
            if progress is not None:
                progress.update(step - progress.n)
                progress.set_postfix(loss=f"{m['loss']:.3f}")

        pending = None
        step = start
        exit_status = 0
        try:
            while step < cfg.train.steps:
                batch = to_global(next(train_iter))
                state, metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                at_end = step == cfg.train.steps
                # Read the flag once: a signal that lands later in this iteration (during eval or the save)
                # is acted on after the next step, never between deciding not to save and stopping.
                stopping = stop["signal"]
                save_now = at_end or stopping is not None or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                eval_now = at_end or (cfg.eval.every and step % cfg.eval.every == 0)
                if save_now or eval_now:
                    record(*pending)  # checked finite before anything is saved
                    pending = None
                    if eval_now:
                        val = evaluate(step)
                        if progress is not None:
                            progress.write(f"step {step}: val loss {val['loss']:.4f}, bpb {val['bpb']:.4f}")
                    if save_now:
                        ckpts.save(step, state, train_iter.get_state(), {"step": step, "config": config_lib.to_dict(cfg)})
                    last_time, last_step = time.perf_counter(), step  # tokens/s leaves out eval and save time
                if stopping is not None:
                    exit_status = INTERRUPTED_EXIT[stopping]
                    say(f"\nstopped by signal {stopping} at step {step}; checkpoint saved. "
                        f"Re-run the same command to resume.")
                    break
            if pending is not None:
                record(*pending)
        finally:
            ckpts.close()
            log.close()
            if progress is not None:
                progress.close()

        if exit_status == 0:
            say(f"done: {step} steps" + (f", final train loss {last_loss:.4f}" if last_loss is not None
                                         else " (the run had already finished; nothing to do)"))
            say(f"  metrics     {os.path.join(workdir, 'metrics.jsonl')}")
            say(f"  tensorboard tensorboard --logdir {os.path.join(workdir, 'tb')}")
            say(f"  checkpoints {ckpts.directory} (steps {ckpts.steps()})")
            if cfg.train.sample_prompt and jax.process_count() > 1:
                # The sampler runs a one-process program on the sharded model; across processes it
                # would wait for peers that have finished. `effax eval --suite generate` samples instead.
                say("sample: skipped in a multi-process run (use effax eval --suite generate)")
            elif cfg.train.sample_prompt:
                model = nnx.merge(graphdef, state["params"], state["other"])
                t = cfg.train
                completion = generate(model, tokenizer, [t.sample_prompt], max_new_tokens=t.sample_tokens,
                                      temperature=t.sample_temperature, top_p=t.sample_top_p, seed=t.seed)[0]
                how = (f"temperature {t.sample_temperature}, top-p {t.sample_top_p}, seed {t.seed}"
                       if t.sample_temperature > 0 else "greedy")
                say(f"sample ({how}): " + repr(t.sample_prompt + completion))
    return exit_status
