"""Run logging: `metrics.jsonl` (authoritative), TensorBoard event files (a view), a progress bar.

Each metrics line is one JSON object: {"step": int, "split": "train" | "val", <figure>: float, ...}.
"""

from __future__ import annotations

import json
import math
import os

import jax

# Dense bf16 peak FLOP/s per chip, by a substring of `device.device_kind` (vendor data sheets).
# MFU is reported only for devices listed here: an invented peak would make the figure meaningless.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


class MetricsLog:
    """Appends metric lines (flushed per line, so a crash loses nothing written) and mirrors them to TB."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled  # only process 0 writes in multi-host runs
        self._tb = None
        if enabled and tensorboard:
            from tensorboard.summary import Writer  # the event-file writer without TensorFlow

            self._tb = Writer(os.path.join(workdir, "tb"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines past the restored step (those steps are about to be re-run)."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip()]
        kept = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= step:
                    kept.append(ln)
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut short by a kill: drop it
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, split: str, figures: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in figures.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in figures.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read(workdir: str, split: str | None = None) -> list[dict]:
    """The metric lines of a run (optionally one split), in file order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    return [r for r in rows if split is None or r["split"] == split]
