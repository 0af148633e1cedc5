"""AdamW with a warmup + cosine / warmup-stable-decay schedule and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


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


NO_DECAY = ("scale", "bias")  # parameter names that never decay: norm scales, biases


def _decay_mask(params):
    # By name, not by rank: a scanned stack of norm scales is [layers, d], 2-D yet still a vector per layer.
    def decays(path, _):
        names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
        return not names & set(NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def build(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(opt_cfg, total_steps)
    parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    parts.append(optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), lr
