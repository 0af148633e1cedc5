"""Run logging: `metrics.jsonl` (authoritative), TensorBoard event files (a view), a progress bar.

Each metrics line is one JSON object: {"step": int, "split": "train" | "val", <figure>: float, ...}.
A vector figure (a model's per-expert load, say) is a list of floats in the line and a histogram in
TensorBoard; a non-finite value is written as the string "nan" / "inf".
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

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
    import jax  # here, not at the top: sweeps and fits read metrics.jsonl without importing jax

    kind = (device or jax.devices()[0]).device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


class MetricsLog:
    """Appends metric lines (flushed per line, so a crash loses nothing written) and mirrors them to TB."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled  # only process 0 writes in multi-host runs
        self._tb = None
        if enabled and tensorboard:
            # TensorBoard's own event-file writer (no TensorFlow); its summary protos for scalars and histograms.
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(os.path.join(workdir, "tb"))

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
        record.update({k: _json_value(v) for k, v in figures.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.plugins.histogram.summary_v2 import histogram_pb
            from tensorboard.plugins.scalar.summary_v2 import scalar_pb

            for k, v in figures.items():
                v = np.asarray(v, np.float64)
                summary = scalar_pb(f"{split}/{k}", v) if v.ndim == 0 else histogram_pb(f"{split}/{k}", v)
                self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _json_value(v):
    """A float, or a list of floats for a vector; non-finite values as strings (JSON has no NaN)."""
    if np.ndim(v) == 0:
        v = float(v)
        return v if math.isfinite(v) else str(v)
    return [_json_value(x) for x in np.asarray(v, np.float64).ravel()]


def read(workdir: str, split: str | None = None) -> list[dict]:
    """The metric lines of a run (optionally one split), in file order: the one reader of metrics.jsonl
    (training, eval, sweeps and fits all use it). A last line cut short by a kill is skipped; an unreadable
    line anywhere else raises ValueError naming the file and line (that is corruption, not a kill)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i + 1, ln) for i, ln in enumerate(f) if ln.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {number}: not a JSON object ({line[:60]!r})") from None
    return [r for r in rows if split is None or r.get("split") == split]
