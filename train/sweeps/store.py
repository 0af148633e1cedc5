"""The run index of a sweep root: `ROOT/sweep.sqlite` (stdlib sqlite3).

It is a cache. The files under `ROOT/<run_id>/` are the truth: `metrics.jsonl` (progress, losses),
`sweep.json` (what the sweep asked for) and `train.log`, where the launcher writes one line when each
attempt starts and one when it ends (`ATTEMPT_START` / `ATTEMPT_END`). `rebuild()` recreates every row
from those files, and `refresh()` re-reads progress and losses from metrics.jsonl.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sqlite3
import time

from effax.train import metrics as metrics_lib

DB_NAME = "sweep.sqlite"
END_STATES = ("finished", "failed", "interrupted", "timeout")
ATTEMPT_START = "[effax sweep] attempt {attempt} started"
ATTEMPT_END = "[effax sweep] attempt {attempt} ended: {status}"
_START_RE = re.compile(r"^\[effax sweep\] attempt \d+ started", re.M)
_END_RE = re.compile(r"^\[effax sweep\] attempt \d+ ended: (\w+)", re.M)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    position INTEGER,            -- order in the sweep
    arch TEXT,
    overrides TEXT,              -- JSON list
    workdir TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    returncode INTEGER,
    created REAL, started REAL, ended REAL,
    step INTEGER, total_steps INTEGER,
    train_loss REAL, val_loss REAL, val_bpb REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def total_steps(workdir: str) -> int | None:
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return int(json.load(f)["train"]["steps"])
    except (OSError, ValueError, KeyError):
        return None


def progress(workdir: str) -> dict:
    """{step, total_steps, train_loss, val_loss, val_bpb} from the run's files (None where unknown)."""
    rows = metrics_lib.read(workdir)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    num = lambda r, k: float(r[k]) if r and isinstance(r.get(k), (int, float)) else None  # noqa: E731
    return {"step": max((r.get("step", 0) for r in rows), default=None), "total_steps": total_steps(workdir),
            "train_loss": num(train[-1] if train else None, "loss"), "val_loss": num(val[-1] if val else None, "loss"),
            "val_bpb": num(val[-1] if val else None, "bpb")}


def finished_on_disk(workdir: str) -> bool:
    """Training reached train.steps (metrics) and the final checkpoint was written (orbax renames a step's
    folder into place only when it is complete) — a run killed while saving it is resumed, not skipped."""
    p = progress(workdir)
    total = p["total_steps"]
    return (total is not None and p["step"] is not None and p["step"] >= total
            and os.path.isdir(os.path.join(workdir, "checkpoints", str(total))))


def log_attempts(workdir: str) -> tuple[int, str | None]:
    """(attempts started, the status the last ended attempt reported) from train.log."""
    try:
        with open(os.path.join(workdir, "train.log"), errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return 0, None
    ends = _END_RE.findall(text)
    return len(_START_RE.findall(text)), (ends[-1] if ends else None)


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, DB_NAME)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit; one writer
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # meta: the config and overrides a sweep was launched with, the backend
    def set_meta(self, **items) -> None:
        for k, v in items.items():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v)))

    def meta(self) -> dict:
        return {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT key, value FROM meta")}

    def add(self, run_id: str, *, position: int, arch: str, overrides: list[str], workdir: str) -> None:
        """Registers a run (pending) or updates its description, keeping its status and attempts."""
        self.db.execute(
            "INSERT INTO runs (run_id, position, arch, overrides, workdir, created) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET position=excluded.position, arch=excluded.arch, "
            "overrides=excluded.overrides, workdir=excluded.workdir",
            (run_id, position, arch, json.dumps(list(overrides)), workdir, time.time()))

    def update(self, run_id: str, **fields) -> None:
        if fields:
            cols = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(f"UPDATE runs SET {cols} WHERE run_id = ?", (*fields.values(), run_id))

    def get(self, run_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return dict(row) if row else None

    def runs(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY position, created")]

    def refresh(self, run_id: str) -> dict:
        """Re-reads the run's progress and losses from its metrics.jsonl into the index."""
        row = self.get(run_id)
        self.update(run_id, **progress(row["workdir"]))
        return self.get(run_id)

    def rebuild(self) -> int:
        """Recreates the index from `ROOT/*/sweep.json` and each run's files; returns the run count."""
        self.db.execute("DELETE FROM runs")
        paths = glob.glob(os.path.join(self.root, "*", "sweep.json"))
        for path in paths:
            workdir = os.path.dirname(path)
            with open(path) as f:
                meta = json.load(f)
            position = meta.get("position", len(paths))
            if "config" not in self.meta() and meta.get("config"):
                self.set_meta(config=meta["config"])
            run_id = meta.get("run_id", os.path.basename(workdir))
            self.add(run_id, position=position, arch=meta.get("arch", ""), overrides=meta.get("overrides", []),
                     workdir=workdir)
            attempts, last = log_attempts(workdir)
            if finished_on_disk(workdir):
                status = "finished"
            elif last in END_STATES:
                status = last
            elif attempts:  # started, never ended: its launcher died
                status = "interrupted"
            else:
                status = "pending"
            self.update(run_id, status=status, attempts=attempts, **progress(workdir))
        return len(paths)
