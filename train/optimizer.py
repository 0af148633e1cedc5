"""AdamW with a warmup + cosine / warmup-stable-decay schedule and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    peak, end = opt_cfg.lr, opt_cfg.lr * opt_cfg.min_lr_ratio
    warmup = min(opt_cfg.warmup_steps, total_steps)
    if opt_cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    if opt_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
    # Warmup-stable-decay (MiniCPM, "WSD"): hold the peak, then decay linearly over the last steps.
    decay = max(1, int(round(opt_cfg.decay_fraction * total_steps)))
    stable = max(0, total_steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)],
        [warmup, warmup + stable],
    )


def _decay_mask(params):
    """True where weight decay applies: every parameter except those created with `no_decay=True`
    metadata (`nnx.Param(value, no_decay=True)`: norm scales, biases, SSM A_log / dt_bias / D). Decided
    where the parameter is made, not by its name or rank (a scanned stack of norm scales is 2-D)."""
    return jax.tree.map(lambda v: not v.get_metadata().get("no_decay", False), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def build(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(opt_cfg, total_steps)
    parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    parts.append(optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), lr
