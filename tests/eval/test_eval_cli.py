"""`effax eval`: the files, TensorBoard scalars, table and --out of a run; clear errors; watch mode
evaluating checkpoints as they appear, each once."""

import json
import os
import pathlib
import shutil
import threading
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from effax import cli as effax_cli
from effax.eval import cli as eval_cli
from effax.train import config as config_lib
from effax.train import loop

SMOKE = str(pathlib.Path(__file__).resolve().parents[2] / "experiments/quickstart.py") + ":smoke"
# eval.batch_size=16 ≠ train.batch_size=8 of the smoke config: `effax eval` must score the loop's batches.
SHORT = ["train.steps=6", "checkpoint.every=3", "eval.every=3", "eval.batches=1", "eval.batch_size=16",
         "logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli_run")
    assert loop.train(config_lib.resolve(SMOKE, SHORT), str(workdir), quiet=True) == 0
    return str(workdir)


def tb_scalars(workdir):
    acc = EventAccumulator(os.path.join(workdir, "tb"))
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def test_outputs(run, tmp_path, capsys):
    out = tmp_path / "all.json"
    assert effax_cli.main(["eval", "--workdir", run, "--suite", "loss,bpb", "--batches", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    loss = json.loads(pathlib.Path(run, "eval", "step_6.loss.json").read_text())
    bpb = json.loads(pathlib.Path(run, "eval", "step_6.bpb.json").read_text())
    assert loss["step"] == 6 and loss["suite"] == "loss" and loss["mesh"]["data"] == 8
    val = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if '"val"' in line][-1]
    assert loss["figures"]["loss"] == pytest.approx(val["loss"], rel=1e-6)  # eval.batches=1 in this run
    assert "1 batch of 16 ×" in loss["figures"]["corpus"], loss["figures"]["corpus"]
    assert bpb["figures"]["bpb"] == pytest.approx(val["bpb"], rel=1e-6)
    collected = json.loads(out.read_text())["results"]
    assert [(r["suite"], r["step"]) for r in collected] == [("loss", 6), ("bpb", 6)]
    assert collected[0]["figures"] == loss["figures"]
    for needle in ("step", "loss", "perplexity", "bpb", f"{loss['figures']['loss']:.6g}", f"{bpb['figures']['bpb']:.6g}"):
        assert needle in table
    scalars = tb_scalars(run)
    assert scalars["eval/loss/loss"] == [(6, pytest.approx(loss["figures"]["loss"], rel=1e-6))]
    assert scalars["eval/bpb/bpb"] == [(6, pytest.approx(bpb["figures"]["bpb"], rel=1e-6))]
    assert "eval/loss/corpus" not in scalars  # strings stay out of TensorBoard

    # another corpus and step are filed apart from the run's own figures
    assert eval_cli.main(["--workdir", run, "--step", "3", "--suite", "bpb", "--data", "kjv", "--batches", "1"]) == 0
    kjv = json.loads(pathlib.Path(run, "eval", "step_3.bpb@kjv.json").read_text())
    assert kjv["data"] == "kjv" and kjv["step"] == 3 and kjv["figures"]["bpb"] != bpb["figures"]["bpb"]


@pytest.mark.parametrize("argv, needle", [
    (["--suite", "loss,perplexity"], "unknown suite 'perplexity'; choose from loss, bpb"),
    (["--step", "4"], r"no checkpoint at step 4; available steps: [3, 6]"),
    (["--step", "soon"], "step must be latest, best or a number, got 'soon'"),
    (["--mesh", "data=2,pipeline=4"], "'pipeline=4' is not AXIS=N with AXIS one of data, fsdp, tensor, expert"),
    (["--mesh", "data=3"], "mesh data=3 × fsdp=1 × tensor=1 × expert=1 uses 3 devices but 8 are available"),
    (["--data", "/no/such/corpus"], "--data '/no/such/corpus' is neither kjv, sotu nor an existing file or folder"),
    (["--batch-size", "4", "--mesh", "data=8"], "--batch-size 4 is not divisible by the mesh's data axes"),
    (["--watch", "--step", "3"], "--step picks one checkpoint"),
])
def test_errors_name_the_bad_thing(run, capsys, argv, needle):
    assert eval_cli.main(["--workdir", run, "--batches", "1", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_missing_workdir(tmp_path, capsys):
    assert eval_cli.main(["--workdir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def add_checkpoint(src_run, dst_run, step):
    """Copies a finished step into place with one rename, as orbax finalises a save."""
    staging = pathlib.Path(dst_run).parent / f"staging_{step}"
    shutil.copytree(os.path.join(src_run, "checkpoints", str(step)), staging)
    os.rename(staging, os.path.join(dst_run, "checkpoints", str(step)))


def test_watch_evaluates_new_checkpoints_once(run, tmp_path):
    watched = tmp_path / "sweep" / "run_a"
    (watched / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(run, "config.json"), watched)
    argv = ["--root", str(tmp_path / "sweep"), "--watch", "--poll", "0.1", "--watch-timeout", "60", "--until-step", "6",
            "--suite", "loss", "--batches", "1"]
    status = {}
    watcher = threading.Thread(target=lambda: status.update(rc=eval_cli.main(argv)))
    watcher.start()
    result = {s: watched / "eval" / f"step_{s}.loss.json" for s in (3, 6)}
    try:
        time.sleep(0.5)  # a few empty polls first
        add_checkpoint(run, watched, 3)
        deadline = time.time() + 60
        while not result[3].exists() and time.time() < deadline:
            time.sleep(0.05)
        assert result[3].exists(), "the watcher did not evaluate the new step 3"
        first = result[3].stat().st_mtime_ns
        time.sleep(0.5)  # several polls with nothing new: step 3 is not evaluated again
        assert result[3].stat().st_mtime_ns == first and not result[6].exists()
        add_checkpoint(run, watched, 6)
    finally:
        watcher.join(timeout=90)
    assert not watcher.is_alive() and status["rc"] == 0  # stopped by --until-step 6
    assert result[6].exists() and result[3].stat().st_mtime_ns == first
    figures = {s: json.loads(p.read_text())["figures"]["loss"] for s, p in result.items()}
    assert figures[6] < figures[3]

    # A new watcher finds everything done: it evaluates nothing and stops on --watch-timeout.
    start = time.time()
    assert eval_cli.main(["--workdir", str(watched), "--watch", "--poll", "0.1", "--watch-timeout", "0.5",
                          "--suite", "loss", "--batches", "1"]) == 0
    assert time.time() - start < 10
    assert [p.stat().st_mtime_ns for p in result.values()][0] == first
    assert sorted(os.listdir(watched / "eval")) == ["step_3.loss.json", "step_6.loss.json"]
    np.testing.assert_equal(len(tb_scalars(str(watched))["eval/loss/loss"]), 2)
