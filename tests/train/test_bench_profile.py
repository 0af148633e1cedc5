"""`effax bench profile`: the compiled HLO's metadata attributes each executed op to the effax file and function
it was traced from, the pass (forward, or backward under `transpose(jvp(...))`) and the kind; the profiler's
trace supplies the times. The default test profiles a small jitted gradient whose source sits in a temporary
`layers/` folder (a second or two); the whole train step of the smoke config is slow (make test-slow)."""

import importlib.util
import re
import textwrap

import jax
import jax.numpy as jnp
import pytest

from effax.train import bench_profile

FAKE_LAYER = '''
import jax.numpy as jnp
from effax.layers.linear import project


def block(x, w):
    return jnp.tanh(project(x, w))  # project is a shared helper: its ops belong to block
'''


def test_ops_are_attributed_to_their_effax_function_and_pass(tmp_path):
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "fake.py").write_text(textwrap.dedent(FAKE_LAYER))
    spec = importlib.util.spec_from_file_location("fake_layer", tmp_path / "layers" / "fake.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)

    loss = lambda w, x: jnp.sum(fake.block(x, w) ** 2)
    x, w = jnp.ones((4, 64, 32)), jnp.full((32, 48), 0.01)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).compile()  # two gradients: a tuple root
    text = compiled.as_text()
    ops = bench_profile.parse_hlo(text)
    # every instruction is parsed, tuple-shaped ones included (the gradient's root; multi-output fusions)
    assert set(re.findall(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = ", text, re.M)) <= set(ops)
    assert any(opcode == "tuple" for opcode, _, _ in ops.values())
    parts = {(bench_profile.classify(name, *op)[:2]) for name, op in ops.items() if op[0] not in ("parameter", "constant")}
    assert ("layers/fake.py:block", "forward") in parts and ("layers/fake.py:block", "backward") in parts
    assert not any(part.startswith("layers/linear.py") for part, _ in parts)

    jax.block_until_ready(compiled(w, x))
    with jax.profiler.trace(str(tmp_path / "trace"), create_perfetto_trace=True):
        jax.block_until_ready(compiled(w, x))
    times = bench_profile.op_times(str(tmp_path / "trace"), ops)
    assert times and all(t > 0 for t in times.values())
    kinds = {bench_profile.classify(name, *ops[name])[2] for name in times}
    assert "matmul" in kinds  # the forward matmul and the two of the backward ran and were timed


@pytest.mark.slow  # compiles the smoke train step (~10 s)
def test_profile_of_the_smoke_train_step(repo, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(repo)
    out = tmp_path / "profile.json"
    assert bench_profile.main(["experiments/quickstart.py:smoke", "--steps", "1",
                               "--warmup", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers/mlp.py:SwiGLU.__call__" in text and "backward" in text and "optimizer" in text
    import json

    result = json.loads(out.read_text())
    assert result["op_ms"] > 0 and sum(r["ms"] for r in result["by_part"]) == pytest.approx(result["op_ms"])


def test_a_profile_that_misses_most_of_the_wall_time_says_so(repo, monkeypatch, capsys):
    """XLA:CPU's own dots (train.cpu_dots=xla) run outside the traced op times: when the ops cover under 80% of
    the wall time, the command says how to profile a build whose dots are traced."""
    result = {"wall_ms": 100.0, "op_ms": 45.0, "by_part": [{"part": "other", "pass": "forward", "ms": 45.0}],
              "by_kind": [{"kind": "other", "pass": "forward", "ms": 45.0}]}
    monkeypatch.setattr(bench_profile, "profile", lambda cfg, steps, warmup: dict(result))
    monkeypatch.chdir(repo)
    assert bench_profile.main(["experiments/quickstart.py:smoke"]) == 0
    assert "cover only 45% of the wall time" in capsys.readouterr().out
    result["op_ms"] = 95.0
    assert bench_profile.main(["experiments/quickstart.py:smoke"]) == 0
    assert "cover only" not in capsys.readouterr().out
