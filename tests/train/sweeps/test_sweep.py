"""Sweeps: spec expansion (lists, products, Scaling blocks with the Step Law), run ids, the dry run, the
local backend's statuses (fake children: fast and exact), and one end-to-end sweep of the smoke config
whose launcher is SIGKILLed mid-sweep, relaunched, then stopped with SIGINT (about a minute: five
`effax train` start-ups of ~13 s each, mostly compilation)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from effax.train import metrics as metrics_lib
from effax.train.config import ConfigError, resolve
from effax.train.sweeps import cli as sweep_cli
from effax.train.sweeps import spec as sweep
from effax.train.sweeps import store as store_lib
from effax.train.sweeps.launch import RunSpec
from effax.train.sweeps.local import LocalBackend
from xla_testing import xla_flags

SMOKE = "experiments/quickstart.py:smoke"


@pytest.fixture(autouse=True)
def _cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)


def experiment(tmp_path, sweep_src: str, name="exp.py") -> str:
    """An experiment file: quickstart's smoke config and the given get_sweep body."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""\
        from effax.train.config import load_experiment
        from effax.train.sweeps.spec import Scaling

        def get_config(variant=None):
            module, _ = load_experiment({os.path.abspath("experiments/quickstart.py")!r})
            return module.get_config("smoke")

        def get_sweep():
            return {sweep_src}
        """))
    return str(path)


# ---------------------------------------------------------------------------------------------------
# Expansion


def test_list_and_product(tmp_path):
    runs, notes = sweep.expand(experiment(tmp_path, '[["model.d_model=32"], ["model.d_model=64", "train.seed=1"]]'))
    assert [r.overrides for r in runs] == [("model.d_model=32",), ("model.d_model=64", "train.seed=1")]
    assert [r.cfg.model.d_model for r in runs] == [32, 64] and runs[1].cfg.train.seed == 1 and not notes

    runs, _ = sweep.expand(experiment(tmp_path, '{"model.d_model": [32, 64], "train.seed": [0, 1, 2]}'),
                           ["train.steps=7"])
    assert len(runs) == 6
    assert runs[0].overrides == ("model.d_model=32", "train.seed=0") and runs[5].overrides == ("model.d_model=64", "train.seed=2")
    assert all(r.cfg.train.steps == 7 for r in runs)  # the CLI's --set reaches every run
    r = runs[0]
    assert r.D == 7 * r.cfg.train.batch_size * r.cfg.data.seq_len and r.C == r.cfg.model.flops_per_token(64) * r.D


def test_scaling_block_tokens_and_step_law(tmp_path):
    src = 'Scaling(budgets=[3e10, 1e11], sizes=[{"model.d_model": 32}, {"model.d_model": 64}], lr_factors=[0.5, 1, 2], min_steps=1)'
    runs, notes = sweep.expand(experiment(tmp_path, src))
    assert len(runs) == 2 * 2 * 3 and not notes
    for r in runs:
        seq = r.cfg.data.seq_len
        fpt = r.cfg.model.flops_per_token(seq)
        D = r.budget / fpt  # the budget's tokens for this size
        # Step Law, written out here independently of train/sweeps/spec.py
        batch = max(1, round(0.58 * D ** 0.571 / seq))
        assert r.cfg.train.batch_size == batch
        assert r.steps == round(D / (batch * seq))
        n = r.cfg.model.param_count(non_embedding=True)
        eta = 1.79 * n ** -0.713 * D ** 0.307
        assert any(abs(r.cfg.optimizer.lr / (eta * f) - 1) < 1e-3 for f in (0.5, 1, 2)), (r.cfg.optimizer.lr, eta)
        assert r.D == r.steps * batch * seq and r.C == pytest.approx(fpt * r.D)
        assert r.C == pytest.approx(r.budget, rel=0.25)  # rounding steps keeps C near the budget
        assert r.arch == "dense" and r.N == n
    lrs = sorted(r.cfg.optimizer.lr for r in runs if r.budget == 3e10 and r.cfg.model.d_model == 32)
    assert lrs[2] / lrs[0] == pytest.approx(4, rel=1e-3)  # the grid is centred on η*
    # non-embedding N of the smoke model by hand: d=64, 2 layers, 4 heads (dh 16), 2 kv heads, SwiGLU 192
    assert next(r.N for r in runs if r.cfg.model.d_model == 64) == 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 192 + 2 * 64) + 64


def test_scaling_learning_rate_from_the_config_or_per_size(tmp_path):
    sizes = '[{"model.d_model": 32, "optimizer.lr": 0.02}, {"model.d_model": 64}]'
    src = f'Scaling(budgets=[3e10], sizes={sizes}, lr="config", lr_factors=[1, 0.5], batch=[8], min_steps=1)'
    runs, _ = sweep.expand(experiment(tmp_path, src))
    base_lr = resolve(SMOKE).optimizer.lr
    assert [(r.cfg.model.d_model, r.cfg.optimizer.lr) for r in runs] == [
        (32, 0.02), (32, 0.01), (64, base_lr), (64, base_lr / 2)]
    assert all(sum(o.startswith("optimizer.lr=") for o in r.overrides) == 1 for r in runs)
    with pytest.raises(ConfigError, match=r'sizes\[0\] sets optimizer.lr, which scaling\[0\].lr=\'steplaw\' would override'):
        sweep.expand(experiment(tmp_path, f'Scaling(budgets=[3e10], sizes={sizes})'))


def test_scaling_skips_small_points_and_fails_when_a_budget_fits_nothing(tmp_path):
    sizes = '[{"model.d_model": 32}, {"model.d_model": 128, "model.n_layers": 4}]'
    runs, notes = sweep.expand(experiment(tmp_path, f'Scaling(budgets=[1e9], sizes={sizes}, min_steps=10)'))
    assert {r.cfg.model.d_model for r in runs} == {32}
    assert len(notes) == 1 and "skipped" in notes[0] and "min_steps=10" in notes[0]
    with pytest.raises(ConfigError, match=r"budget C=1e\+08 .*every size"):
        sweep.expand(experiment(tmp_path, f'Scaling(budgets=[1e9, 1e8], sizes={sizes}, min_steps=10)'))


@pytest.mark.parametrize("src, needle", [
    ('[["model.d_modle=64"]]', "model.d_modle"),
    ('{"train.seed": [0, 1], "optimizer.lrr": [0.1]}', "optimizer.lrr"),
    ('Scaling(budgets=[1e10], sizes=[{"model.nlayers": 2}])', "model.nlayers"),
    ('{"train.seed": []}', "'train.seed' is an empty list"),
    ('Scaling(budgets=[], sizes=[{"model.d_model": 32}])', "budgets is an empty list"),
    ('[]', "empty list"),
    ('[["train.seed=0"], ["train.seed=0", "logging.progress=false"]]', "resolve to the same config"),
    ('{"model.n_heads": [5]}', "model.n_heads=5 does not divide"),
])
def test_bad_specs_fail_naming_the_problem(tmp_path, src, needle):
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+").replace("(", r"\(")):
        sweep.expand(experiment(tmp_path, src))


def test_run_ids_are_stable_distinct_and_ignore_cosmetics():
    base = sweep.run_id(resolve(SMOKE))
    assert len(base) == 12 and int(base, 16) >= 0
    assert sweep.run_id(resolve(SMOKE)) == base
    cosmetic = ["name=other", "logging.progress=false", "logging.tensorboard=false", "mesh.data=2",
                "checkpoint.every=3", "train.log_every=5"]
    assert sweep.run_id(resolve(SMOKE, cosmetic)) == base
    ids = {sweep.run_id(resolve(SMOKE, [o])) for o in ["optimizer.lr=0.01", "train.seed=1", "train.steps=21",
                                                       "model.d_model=32", "data.seq_len=32"]}
    assert len(ids) == 5 and base not in ids


def test_dry_run_prints_the_table_and_creates_nothing(tmp_path, capsys):
    root = tmp_path / "root"
    exp = experiment(tmp_path, '{"train.seed": [0, 1, 2]}')
    assert sweep_cli.main([exp, "--root", str(root), "--dry-run", "--concurrency", "2"]) == 0
    out = capsys.readouterr().out
    runs, _ = sweep.expand(exp)
    for r in runs:
        assert r.run_id in out
    for column in ("run_id", "arch", "N", "D", "C", "lr", "batch", "steps", "est."):
        assert column in out.splitlines()[0]
    assert "3 runs" in out and "estimate" in out
    assert not root.exists()
    # a bad spec fails with status 2, naming the key, and creates nothing either
    assert sweep_cli.main([experiment(tmp_path, '{"train.sed": [0]}', "bad.py"), "--root", str(root)]) == 2
    assert "train.sed" in capsys.readouterr().err and not root.exists()


def test_the_cpu_mini_sweep_plan():
    runs, notes = sweep.expand("experiments/scaling/dense.py")
    assert len(runs) == 24 and not notes
    assert {r.arch for r in runs} == {"dense-w", "dense-d"}
    for arch in ("dense-w", "dense-d"):
        budgets = {}
        for r in runs:
            if r.arch == arch:
                budgets.setdefault(r.budget, set()).add(r.N)
        assert len(budgets) == 3 and all(len(ns) == 4 for ns in budgets.values())  # an IsoFLOP parabola each
    for r in runs:  # one batch and one validation set for all; η = 0.2 / d_model
        assert r.cfg.train.batch_size == 8 and (r.cfg.eval.batch_size, r.cfg.eval.batches) == (32, 16)
        assert r.cfg.optimizer.lr == pytest.approx(0.2 / r.cfg.model.d_model, rel=5e-4)  # 4 significant digits
    assert runs[0].budget == max(r.budget for r in runs)  # the longest runs start first
    total = sum(sweep.estimate_seconds(r) for r in runs) / 2
    assert total < 30 * 60, f"the mini-sweep is estimated at {total / 60:.1f} min at concurrency 2"
    smoke, _ = sweep.expand("experiments/scaling/dense.py:smoke")
    assert len(smoke) == 3 and sum(sweep.estimate_seconds(r) for r in smoke) / 2 < 90


# ---------------------------------------------------------------------------------------------------
# LocalBackend with fake children (exit codes, timeouts, retries, Ctrl-C)

FAKE = """\
import os, signal, sys, time
wd, mode = sys.argv[sys.argv.index("--workdir") + 1], sys.argv[-1]
with open(os.path.join(wd, "attempts"), "a") as f:
    f.write("x")
attempt = len(open(os.path.join(wd, "attempts")).read())
def save(signum, frame):
    open(os.path.join(wd, "saved"), "w").close()
    sys.exit(143)
if mode == "ok": sys.exit(0)
if mode == "fail": sys.exit(1)
if mode == "config": sys.exit(2)
if mode == "hang": signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "slow-then-ok" and attempt > 1: sys.exit(0)
if mode == "save-on-term": signal.signal(signal.SIGTERM, save)
time.sleep(60)
"""


def fake_runs(tmp_path, modes, **kw):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    specs = []
    for i, mode in enumerate(modes):
        wd = tmp_path / f"run{i}"
        wd.mkdir()
        specs.append(RunSpec(f"run{i}", str(wd), ("--workdir", str(wd), mode), **kw.get(mode, {})))
    return [sys.executable, str(script)], specs


def test_statuses_timeouts_and_retries(tmp_path):
    command, specs = fake_runs(tmp_path, ["ok", "fail", "config", "slow-then-ok", "hang"], **{
        "fail": {"retries": 2}, "config": {"retries": 2}, "slow-then-ok": {"timeout_s": 1.0, "retries": 1},
        "hang": {"timeout_s": 1.0}})
    events = []
    backend = LocalBackend(concurrency=5, command=command, grace_s=1.0, poll_s=0.05)
    results = backend.launch(specs, on_update=lambda *e: events.append(e))
    got = {r.run_id: (r.status, r.attempts, r.returncode) for r in results}
    assert got == {"run0": ("finished", 1, 0),
                   "run1": ("failed", 3, 1),  # retried twice
                   "run2": ("failed", 1, 2),  # a config error is not retried
                   "run3": ("finished", 2, 0),  # timed out, then the retry finished
                   "run4": ("timeout", 1, -signal.SIGKILL)}  # ignored SIGTERM: killed after the grace period
    assert [e for e in events if e[0] == "run3"] == [("run3", "running", 1), ("run3", "timeout", 1),
                                                     ("run3", "running", 2), ("run3", "finished", 2)]
    log = (tmp_path / "run3" / "train.log").read_text()
    assert store_lib.log_attempts(str(tmp_path / "run3")) == (2, "finished") and "ended: timeout" in log


def test_concurrency_is_respected(tmp_path):
    command, specs = fake_runs(tmp_path, ["ok"] * 5)
    running, peak = set(), []

    def on_update(run_id, status, attempt):
        (running.add if status == "running" else running.discard)(run_id)
        peak.append(len(running))

    results = LocalBackend(concurrency=2, command=command, poll_s=0.05).launch(specs, on_update=on_update)
    assert [r.status for r in results] == ["finished"] * 5 and max(peak) == 2


def test_ctrl_c_stops_children_and_marks_them_interrupted(tmp_path):
    command, specs = fake_runs(tmp_path, ["save-on-term", "save-on-term", "ok"])
    events = []
    backend = LocalBackend(concurrency=2, command=command, grace_s=10, poll_s=0.05)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite started in the background
    try:  # (`cmd &`) inherits SIGINT ignored: Python then never raises KeyboardInterrupt
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            backend.launch(specs, on_update=lambda *e: events.append(e))
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(e for e in events if e[1] != "running") == [("run0", "interrupted", 1), ("run1", "interrupted", 1)]
    assert (tmp_path / "run0" / "saved").exists() and (tmp_path / "run1" / "saved").exists()
    assert not (tmp_path / "run2" / "attempts").exists()  # never started


# ---------------------------------------------------------------------------------------------------
# End to end: SIGKILL the launcher, relaunch, SIGINT it


def _wait_for(predicate, what: str, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _checkpoints(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _sigint_default():
    """Popen preexec_fn: a launcher started from a background suite would inherit SIGINT ignored (then
    Python installs no KeyboardInterrupt handler and the Ctrl-C below would do nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # ~100 s: three sweep launches of real training children; make test-slow runs it
def test_kill_relaunch_and_interrupt_lose_and_repeat_nothing(tmp_path):
    root = tmp_path / "root"
    exp = experiment(tmp_path, '[["train.seed=0", "train.steps=8"], ["train.seed=1", "train.steps=300"], '
                               '["train.seed=2", "train.steps=1000"]]')
    common = ["checkpoint.every=10", "eval.every=0", "logging.tensorboard=false", "train.log_every=10"]
    runs, _ = sweep.expand(exp, common)
    wd = [str(root / r.run_id) for r in runs]
    cmd = [sys.executable, "-m", "effax.cli", "sweep", exp, "--root", str(root), "--set", *common]
    out = open(tmp_path / "launcher.log", "a")
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))  # one device, not conftest's 8: faster
    first = subprocess.Popen([*cmd, "--concurrency", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    _wait_for(lambda: store_lib.finished_on_disk(wd[0]) and _checkpoints(wd[1]), "run 1 has a checkpoint", first)
    first.kill()  # SIGKILL: no clean-up; run 1's child is left running (it gets SIGTERM from the kernel)
    first.wait()
    metrics0 = (root / runs[0].run_id / "metrics.jsonl").read_bytes()

    # The relaunch may use other launch options: concurrency 2 runs the resume of 1 beside the start of 2.
    second = subprocess.Popen([*cmd, "--concurrency", "2"], stdout=out, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=_sigint_default)
    # Wait for run 1's process to have exited, not just for its files: a Ctrl-C during its shutdown would
    # (rightly) record that attempt as interrupted.
    _wait_for(lambda: "attempt 2 ended" in (root / runs[1].run_id / "train.log").read_text() and _checkpoints(wd[2]),
              "run 1 ended and run 2 has a checkpoint", second)
    second.send_signal(signal.SIGINT)
    assert second.wait(timeout=60) == 130, (tmp_path / "launcher.log").read_text()

    index = {r["run_id"]: r for r in store_lib.Store(str(root)).runs()}
    ids = [r.run_id for r in runs]
    # run 0 finished in the first launch and was never run again
    assert index[ids[0]]["status"] == "finished" and index[ids[0]]["attempts"] == 1
    assert store_lib.log_attempts(wd[0]) == (1, "finished")
    assert (root / ids[0] / "metrics.jsonl").read_bytes() == metrics0
    # run 1 was resumed from its checkpoint, not restarted, and has one clean sequence of steps
    log1 = (root / ids[1] / "train.log").read_text()
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in log1.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and resumed[0] > 0, log1
    assert "attempt 2 started" in log1 and "attempt 2 ended: finished" in log1
    # the orphan of the killed launcher stopped (parent-death SIGTERM) and saved, rather than training on
    assert log1.index("stopped by signal 15") < log1.index("attempt 2 started")
    steps = [r["step"] for r in metrics_lib.read(wd[1]) if r["split"] == "train"]
    assert steps == list(range(10, 301, 10)), steps
    assert index[ids[1]]["status"] == "finished" and index[ids[1]]["attempts"] == 2 and index[ids[1]]["step"] == 300
    # run 2 was stopped by Ctrl-C: interrupted, with a checkpoint to resume from
    assert index[ids[2]]["status"] == "interrupted" and _checkpoints(wd[2])
    assert "stopped by signal" in (root / ids[2] / "train.log").read_text()
    for w, r in zip(wd, runs):
        assert json.load(open(os.path.join(w, "sweep.json")))["C"] == pytest.approx(r.C)

    # the index is a cache: rebuilt from the run folders, it says the same
    os.remove(root / store_lib.DB_NAME)
    assert sweep_cli.main(["status", "--root", str(root)]) == 0
    rebuilt = {r["run_id"]: r for r in store_lib.Store(str(root)).runs()}
    for i in ids:
        assert (rebuilt[i]["status"], rebuilt[i]["attempts"], rebuilt[i]["step"]) == \
               (index[i]["status"], index[i]["attempts"], index[i]["step"])
