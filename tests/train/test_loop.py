"""The training loop end to end on the smoke config: mesh equivalence, kill-and-resume exactness,
the NaN guard, gradient accumulation. Runs that need their own process (a 1-device reference, SIGKILL)
go through the real `effax train` command."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from effax.train import config as config_lib
from effax.train import loop
from effax.train import metrics as metrics_lib
from xla_testing import xla_flags

SMOKE = "experiments/quickstart.py:smoke"
QUIET = ["logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(autouse=True)
def _cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)


def train_losses(workdir) -> list[float]:
    rows = metrics_lib.read(str(workdir), "train")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in metrics.jsonl: {steps}"
    return [r["loss"] for r in rows]


def run_cli(workdir, overrides, devices=8, wait=True, config=SMOKE):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "effax.cli", "train", config, "--workdir", str(workdir), "--quiet", "--set", *overrides]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# The default suite runs the two meshes that between them use the data, fsdp and tensor axes; the rest are
# slow (make test-slow): pure data parallelism is the data axis of data 2 x fsdp 4, fsdp 8 shards no deeper
# than fsdp 4, and the expert axis's batch split is test_expert_axis_splits_the_batch (the MoE layer's
# expert parallelism is tests/layers/test_moe_parallel.py).
@pytest.mark.parametrize("mesh", [
    pytest.param({"data": 8}, marks=pytest.mark.slow), pytest.param({"data": 1, "fsdp": 8}, marks=pytest.mark.slow),
    {"data": 2, "fsdp": 4}, {"data": 1, "fsdp": 4, "tensor": 2},
    pytest.param({"data": 1, "fsdp": 4, "expert": 2}, marks=pytest.mark.slow),  # expert devices split the batch too
])
def test_meshes_give_the_same_loss_curve(tmp_path_factory, mesh, one_device_reference):
    overrides = QUIET + [f"mesh.{k}={v}" for k, v in mesh.items()]
    workdir = tmp_path_factory.mktemp("mesh")
    cfg = config_lib.resolve(SMOKE, overrides)
    assert loop.train(cfg, str(workdir), quiet=True) == 0
    losses = np.array(train_losses(workdir))
    assert len(losses) == cfg.train.steps
    # fp32; sharding only reorders the reductions (all-reduces, split matmuls): ~1e-7 relative per op,
    # observed ≤ 4e-7 after 20 steps, so 1e-5 (the bound) leaves room without hiding a wrong shard.
    np.testing.assert_allclose(losses, one_device_reference, rtol=1e-5, atol=0)
    assert losses[-1] < losses[0] - 0.5  # and it learns


@pytest.fixture(scope="module")
def one_device_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    out = run_cli(workdir, QUIET + ["mesh.data=1"], devices=1)
    assert out.returncode == 0, out.stderr[-3000:]
    return np.array(train_losses(workdir))


@pytest.mark.slow  # ~90 s; the default suite kills and resumes bit for bit in test_non_trainable_state_survives_...
def test_kill_and_resume_is_bit_exact(tmp_path):
    overrides = QUIET + ["checkpoint.every=4", "train.steps=24", "checkpoint.async_save=true"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    out = run_cli(full, overrides)
    assert out.returncode == 0, out.stderr[-3000:]

    _kill_after(run_cli(killed, overrides, wait=False), killed, 14)
    killed_at = metrics_lib.read(str(killed), "train")[-1]["step"]
    assert 14 <= killed_at < 24

    out = run_cli(killed, overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    assert train_losses(killed) == train_losses(full)  # bit for bit, every step
    assert len(train_losses(full)) == 24


def _kill_after(proc, workdir, step, checkpoint=False):
    """SIGKILL once the run has logged `step` (and, with `checkpoint`, finished saving one checkpoint)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = metrics_lib.read(str(workdir), "train") if (workdir / "metrics.jsonl").exists() else []
        saved = not checkpoint or (workdir / "checkpoints").is_dir() and any(p.isdigit() for p in os.listdir(workdir / "checkpoints"))
        if rows and rows[-1]["step"] >= step and saved:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


TOY = "tests/models/toy_experiment.py"


def test_non_trainable_state_survives_kill_and_resume_bit_for_bit(tmp_path):
    """A layer's Buffers (a step count and a running sum of its input) change every step, are carried by
    the train step, checkpointed and restored; they get no gradient and no weight decay. One device:
    the 8-device resume is the test above; this one is about what the state holds."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    overrides = QUIET + ["train.steps=16"]
    out = run_cli(full, overrides, devices=1, config=TOY)
    assert out.returncode == 0, out.stderr[-3000:]
    _kill_after(run_cli(killed, overrides, devices=1, wait=False, config=TOY), killed, 6, checkpoint=True)
    assert 6 <= metrics_lib.read(str(killed), "train")[-1]["step"] < 16
    out = run_cli(killed, overrides, devices=1, config=TOY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert train_losses(killed) == train_losses(full)

    config_lib.load_experiment(TOY)  # registers the toy mixers here too, for the restore
    from effax.eval.restore import restore

    buffers = {}
    for name, workdir in (("full", full), ("killed", killed)):
        counter = restore(str(workdir)).model.blocks[0].layers[0].mixer  # layer 0 of the (counter, attn) block
        buffers[name] = (float(counter.steps[...][0]), float(counter.input_sum[...][0]))
    assert buffers["killed"] == buffers["full"]  # bit for bit
    assert buffers["full"][0] == 16.0  # one per training step: no decay, no update from the optimizer
    assert buffers["full"][1] != 0.0


def test_sigterm_saves_and_resumes(tmp_path):
    overrides = QUIET + ["checkpoint.every=1000", "eval.every=1000", "train.steps=400"]
    proc = run_cli(tmp_path, overrides, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stdout.read()[-2000:]
    steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert steps and steps[-1] < 400  # saved where it stopped, not at an interval


def test_nan_guard_stops_without_a_poisoned_checkpoint(tmp_path):
    # An absurd learning rate overflows the parameters within a few steps.
    cfg = config_lib.resolve(SMOKE, QUIET + ["optimizer.lr=1e37", "optimizer.warmup_steps=1", "checkpoint.every=1",
                                             "checkpoint.async_save=false", "optimizer.clip_norm=0"])
    with pytest.raises(loop.TrainingDiverged, match="not finite"):
        loop.train(cfg, str(tmp_path), quiet=True)
    import jax

    from effax.train.checkpoint import Checkpoints

    ckpts = Checkpoints(str(tmp_path / "checkpoints"), read_only=True)
    bad_step = metrics_lib.read(str(tmp_path), "train")[-1]["step"] + 1  # the first step not logged
    assert all(step < bad_step for step in ckpts.steps())
    for step in ckpts.steps():  # whatever was saved before the guard fired holds only finite numbers
        state = ckpts.manager.restore(step)["state"]
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating)), step


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = config_lib.resolve(SMOKE, QUIET + ["train.steps=5", "train.batch_size=32"])
    four = config_lib.resolve(SMOKE, QUIET + ["train.steps=5", "train.batch_size=32", "train.microbatches=4"])
    assert loop.train(one, str(tmp_path / "one"), quiet=True) == 0
    assert loop.train(four, str(tmp_path / "four"), quiet=True) == 0
    # Same tokens, same normalisation (sum over all micro-batches / all tokens); only the summation order
    # of the gradients differs: fp32 rounding, ~1e-6.
    np.testing.assert_allclose(train_losses(tmp_path / "four"), train_losses(tmp_path / "one"), rtol=1e-5)


def test_expert_axis_splits_the_batch():
    """mesh.expert=2 × fsdp=4: every device holds 1/8 of the batch, none repeats another's rows."""
    import jax

    from effax.train import mesh as mesh_lib

    cfg = config_lib.resolve(SMOKE, ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=2"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    assert mesh_lib.batch_ways(mesh) == 8 == mesh_lib.batch_ways(cfg.mesh)
    batch = jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, mesh_lib.rules(cfg.mesh)),
                                                   np.arange(16 * 4).reshape(16, 4))
    shards = [s.data for s in batch.addressable_shards]
    assert len(shards) == 8 and all(s.shape == (2, 4) for s in shards)
    assert sorted(int(s[0, 0]) for s in shards) == list(range(0, 64, 8))  # eight different row pairs


def test_workdir_outputs(tmp_path):
    cfg = config_lib.resolve(SMOKE, ["train.steps=10", "logging.progress=false"])
    assert loop.train(cfg, str(tmp_path), quiet=True) == 0
    assert config_lib.from_json(str(tmp_path / "config.json")).train.steps == 10
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert {"step", "split", "loss", "grad_norm", "lr", "tokens_per_s"} <= set(train_rows[-1])
    assert "mfu" not in train_rows[-1]  # no invented peak FLOP/s on CPU
    assert val_rows and {"loss", "bpb"} <= set(val_rows[-1])
    assert any(p.startswith("events.out.tfevents") for p in os.listdir(tmp_path / "tb"))
    # Re-running a finished run is a no-op that succeeds.
    before = (tmp_path / "metrics.jsonl").read_text()
    assert loop.train(cfg, str(tmp_path), quiet=True) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before
    # Resuming a finished run with a different model is refused, naming the difference.
    with pytest.raises(config_lib.ConfigError, match="model.d_model"):
        loop.train(config_lib.resolve(SMOKE, ["train.steps=10", "model.d_model=32"]), str(tmp_path), quiet=True)


def test_a_run_killed_before_its_first_checkpoint_restarts_with_clean_metrics(tmp_path):
    # Lines of a run that died before saving anything are re-run from step 0: they must not stay behind.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "loss": 9.0}) + "\n"
                                                    for s in (1, 2, 3, 4)))
    cfg = config_lib.resolve(SMOKE, QUIET + ["train.steps=2", "eval.every=0", "checkpoint.every=0"])
    assert loop.train(cfg, str(tmp_path), quiet=True) == 0
    assert [r["step"] for r in metrics_lib.read(str(tmp_path), "train")] == [1, 2]
    assert all(r["loss"] != 9.0 for r in metrics_lib.read(str(tmp_path)))


@pytest.mark.slow  # ~16 s; test_sigterm_saves_and_resumes covers the signal path by default
def test_signal_during_eval_still_saves(tmp_path, monkeypatch):
    # A SIGTERM landing while validation runs (after the step decided whether to save) must still leave a
    # checkpoint at the step where the run stops.
    write = metrics_lib.MetricsLog.write

    def write_then_signal(self, step, split, figures):
        write(self, step, split, figures)
        if split == "val" and step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics_lib.MetricsLog, "write", write_then_signal)
    cfg = config_lib.resolve(SMOKE, QUIET + ["train.steps=1000", "checkpoint.every=1000", "eval.every=10"])
    assert loop.train(cfg, str(tmp_path), quiet=True) == 143
    last = metrics_lib.read(str(tmp_path), "train")[-1]["step"]
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [last]


@pytest.mark.slow  # ~10 s; as above
def test_signal_during_start_up_still_saves(tmp_path, monkeypatch):
    # A Slurm time limit or scancel can land before the first step (data, compilation, restore): the run
    # must still stop with a checkpoint and 143, so the launcher records a timeout and a retry resumes.
    build = loop.build_trainer

    def signal_then_build(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)

    monkeypatch.setattr(loop, "build_trainer", signal_then_build)
    cfg = config_lib.resolve(SMOKE, QUIET + ["train.steps=1000", "checkpoint.every=1000"])
    assert loop.train(cfg, str(tmp_path), quiet=True) == 143
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone again


def test_cpu_dots_choose_the_matmul_kernels():
    """train.cpu_dots="xla" (the default) compiles the loop's steps with `loop.CPU_DOTS_OPTIONS["xla"]`: XLA
    accepts the option (a name or value it does not know raises here), and a matmul that goes to a YNNPACK
    fusion under "ynnpack" (XLA's default) goes to XLA's own dot (docs/benchmarks.md, "Matmuls on XLA:CPU")."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((256, 128)), jnp.ones((128, 64))

    def compiled(options):
        return jax.jit(lambda a, b: a @ b, compiler_options=options).lower(a, b).compile().as_text()

    assert config_lib.TrainConfig().cpu_dots == "xla" and loop.compiler_options("ynnpack", "xla") is None
    assert "__ynn_fusion" in compiled(loop.compiler_options("ynnpack"))
    assert "__ynn_fusion" not in compiled(loop.compiler_options("xla"))


def _ynnpack_dots(hlo: str) -> int:
    """How many YNNPACK fusions of a compiled program contain a dot."""
    called = re.findall(r'calls=%([\w.\-]+)[^\n]*"__ynn_fusion"', hlo)
    bodies = (re.search(r"\n%" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.S) for name in called)
    return sum(" dot(" in body.group(1) for body in bodies if body)


def test_the_loop_compiles_its_train_step_with_train_cpu_dots():
    """The config key reaches the loop's jitted train step: the smoke model's matmuls are YNNPACK fusions under
    "ynnpack" and none is under "xla" (the default)."""
    import jax
    from flax import nnx

    from effax.train import data as data_lib
    from effax.train import mesh as mesh_lib

    dots = {}
    for cpu_dots in ("ynnpack", "xla"):
        cfg = config_lib.resolve(SMOKE, ["mesh.data=1", f"train.cpu_dots={cpu_dots}"])
        cfg = loop.resolve_vocab(cfg, data_lib.tokenizer_for(cfg.data))
        mesh, rules = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:1]), mesh_lib.rules(cfg.mesh)
        trainer = loop.build_trainer(cfg, mesh, rules)
        batch = next(data_lib.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=0))
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            hlo = trainer.train_step.lower(trainer.abstract_state, trainer.to_global(batch)).compile().as_text()
        dots[cpu_dots] = _ynnpack_dots(hlo)
    assert dots["ynnpack"] > 0 and dots["xla"] == 0, dots


@pytest.fixture
def split_scratch():
    """The suite runs with JAX's persistent compilation cache on (tests/conftest.py), which turns the split off
    (`loop.split_scratch`); these tests turn the cache off for their own compiles."""
    import jax

    cache_dir = jax.config.jax_compilation_cache_dir
    assert loop.split_scratch("reuse") == (not cache_dir)
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert loop.split_scratch("reuse") and not loop.split_scratch("xla")
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)


# Run in a fresh process: in one that has already freed much memory, malloc may serve even the one big block from
# the heap it kept, and the comparison would not show the split. Four [4096, 1024] matmul outputs (16 MiB each)
# are live at once, so XLA plans 64 MiB of scratch.
_SCRATCH_FAULTS = """
import json, resource, jax, jax.numpy as jnp
from effax.train import loop

def chain(x, w):
    ys = [x]
    for _ in range(4):
        ys.append(ys[-1] @ w)
    return (sum(ys[1:]) @ w)[:2]

x, w = jnp.full((4096, 1024), 0.01), jnp.full((1024, 1024), 0.01)
out = {"glibc": loop.keep_freed_host_memory(), "pages": 64 * 2**20 // resource.getpagesize()}
for cpu_buffers in ("xla", "reuse"):  # "xla" first: its block comes from mmap while no freed heap can hold it
    options = loop.compiler_options("xla", cpu_buffers)
    out[cpu_buffers + " split"] = "xla_multiheap_size_constraint_per_heap" in options
    step = jax.jit(chain, compiler_options=options).lower(x, w).compile()
    out[cpu_buffers + " scratch"] = step.memory_analysis().temp_size_in_bytes
    for _ in range(8):  # warm-up: each of XLA's threads fills its malloc arena once
        jax.block_until_ready(step(x, w))
    per_call = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(step(x, w))
        per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out[cpu_buffers] = min(per_call)
print(json.dumps(out))
"""


def test_cpu_buffers_reuse_keeps_the_scratch_mapped():
    """train.cpu_buffers="reuse" (the default): XLA splits the step's scratch into heaps of at most 16 MiB and
    glibc's malloc, tuned by `keep_freed_host_memory`, serves and keeps them, so a warm call page-faults almost
    nothing. The scratch as XLA's one 64 MiB block ("xla") is mapped afresh and faulted in on every call
    (16,384 pages; docs/benchmarks.md, "Step scratch memory and RoPE's sin / cos on XLA:CPU")."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the cache turns the split off
    proc = subprocess.run([sys.executable, "-c", _SCRATCH_FAULTS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    if not out["glibc"]:
        pytest.skip("not glibc: the allocator tuning does not apply")
    assert out["reuse split"] and not out["xla split"]
    assert out["reuse scratch"] >= 64 * 2**20 and out["xla scratch"] >= 64 * 2**20
    assert out["reuse"] < out["pages"] // 8 and out["xla"] > out["pages"] // 2, out


def test_heap_limit_warnings_are_dropped_and_other_stderr_kept(capfd, split_scratch):
    """A step with a 16+ MiB buffer compiles without XLA's per-heap-limit warnings on stderr (one per buffer and
    packing pass), and then runs unsplit; everything else written to stderr meanwhile comes through."""
    import jax
    import jax.numpy as jnp

    with loop.without_heap_limit_warnings() as dropped:
        os.write(2, b"W0000 heap_simulator.cc] Alloc buffer size 33554432 larger than the per-heap size limit 16777216\n")
        os.write(2, b"something else\n")
    assert capfd.readouterr().err == "something else\n" and len(dropped) == 1

    def f(x):
        e = jnp.exp(x)  # a 32 MiB buffer
        return (e @ e.T)[:2]

    x = jnp.full((2048, 4096), 0.01)
    jax.jit(f, compiler_options=loop.compiler_options()).lower(x).compile()
    assert "per-heap size limit" in capfd.readouterr().err  # what XLA prints unfiltered
    step = loop.step_jit(f)
    assert isinstance(step, loop.SplitScratchStep)
    jax.block_until_ready(step(x))
    assert "per-heap size limit" not in capfd.readouterr().err
    # ... and such a step runs with XLA's one scratch block: the split does not pay where a buffer needs a heap of its own
    assert step.compiled(x).as_text() == step.unsplit.lower(x).compile().as_text()
    small = jnp.full((256, 512), 0.01)
    assert step.compiled(small).as_text() == step.split.lower(small).compile().as_text()
