"""`effax bench peer`: effax's training step against PyTorch's (Hugging Face transformers' Llama), side by side.

    effax bench peer [experiments/quickstart.py] [--set KEY=VALUE ...] [--rounds 3] [--steps 5]

Both train the same dense decoder shape on the same batches in this one process: d_model, layers, heads
and KV heads, SwiGLU width, vocabulary, RoPE theta, RMSNorm eps, tied or untied head, fp32, AdamW with the
config's lr, betas, eps, weight decay and global-norm clipping. The two alternate in rounds (effax block,
torch block, ...) so that load on a shared machine falls on both; each prints the median tokens/s over
rounds and the ratio effax / peer. Differences that remain: the peer attends causally over the whole
window (`attn_implementation="sdpa"`), effax also keeps packed documents apart (segment ids); the peer's
learning rate is constant (the schedule costs nothing measurable). torch and transformers are the optional
`bench` extra (`pip install -e '.[bench]'`), never a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

DEFAULT = "experiments/quickstart.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax bench peer", description=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG[:VARIANT]", nargs="?", default=DEFAULT)
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[])
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds; medians are reported")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (compilation)")
    p.add_argument("--out", help="also write the figures as JSON to this file")
    return p


def llama_config(model, seq_len: int):
    """The Hugging Face LlamaConfig of an effax DenseConfig (the same parameter count: checked by the caller)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=model.vocab_size, hidden_size=model.d_model, intermediate_size=model.ffn_dim,
                       num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads,
                       num_key_value_heads=model.kv_heads, head_dim=model.dim_per_head, max_position_embeddings=seq_len,
                       rope_theta=model.rope_theta, rms_norm_eps=model.norm_eps, tie_word_embeddings=model.tie_embeddings,
                       attention_bias=False, mlp_bias=False, attn_implementation="sdpa")


def torch_trainer(cfg):
    """(step(batch) -> loss, parameter count) for the peer model."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.train.seed)
    model = LlamaForCausalLM(llama_config(cfg.model, cfg.data.seq_len)).train()
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)

    def step(batch):
        tokens = torch.from_numpy(batch["tokens"]).long()
        targets = torch.from_numpy(batch["targets"]).long()
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        return loss.item()  # waits for the step, as block_until_ready does for effax

    return step, sum(p.numel() for p in model.parameters())


def effax_trainer(cfg):
    """(step(batch) -> loss, parameter count) for effax's own train step (loop.build_trainer), one device."""
    import jax
    from flax import nnx

    from effax.train import loop
    from effax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_divisibility(cfg, mesh)
    rules = mesh_lib.rules(cfg.mesh)
    trainer = loop.build_trainer(cfg, mesh, rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = [trainer.init_state()]

    def step(batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            state[0], metrics = trainer.train_step(state[0], trainer.to_global(batch))
            return float(metrics["loss"])

    return step, cfg.model.param_count()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from effax.train import config as config_lib
    from effax.train import data as data_lib
    from effax.train import loop

    try:
        cfg = config_lib.resolve(args.config, args.overrides + ["mesh.data=1"])
    except config_lib.ConfigError as e:
        print(f"effax bench peer: config error: {e}", file=sys.stderr)
        return 2
    if cfg.model.type != "dense" or cfg.model.ffn != "swiglu" or set(cfg.model.pattern) != {"attn"}:
        print(f"effax bench peer: the peer is a Llama: needs model.type=dense with attn+swiglu layers, got "
              f"type={cfg.model.type} pattern={cfg.model.pattern} ffn={cfg.model.ffn}", file=sys.stderr)
        return 2
    # torch's OpenMP threads spin for a while after each parallel region by default, taking the cores from
    # effax's block that follows; passive waiting keeps the alternation fair (set before torch loads OpenMP).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"effax bench peer: needs torch and transformers (pip install -e '.[bench]'): {e}", file=sys.stderr)
        return 2
    cfg = loop.resolve_vocab(cfg, data_lib.tokenizer_for(cfg.data))
    batches = data_lib.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    batches = [next(batches) for _ in range(4)]
    import jax

    runners = {"effax": effax_trainer(cfg), "peer": torch_trainer(cfg)}
    if runners["effax"][1] != runners["peer"][1]:
        print(f"effax bench peer: parameter counts differ (effax {runners['effax'][1]:,}, peer {runners['peer'][1]:,}): "
              "the shapes do not match", file=sys.stderr)
        return 1
    tokens = cfg.train.batch_size * cfg.data.seq_len
    print(f"{args.config} {' '.join(args.overrides)}: {runners['effax'][1] / 1e6:.2f}M parameters, batch "
          f"{cfg.train.batch_size} x {cfg.data.seq_len}; effax on {jax.devices()[0].device_kind} (jax {jax.__version__}), "
          f"peer transformers {transformers.__version__} LlamaForCausalLM sdpa on torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    for name, (step, _) in runners.items():
        for i in range(args.warmup):
            step(batches[i % 4])
    rates = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, (step, _) in runners.items():
            start = time.perf_counter()
            for i in range(args.steps):
                step(batches[i % 4])
            rates[name].append(tokens * args.steps / (time.perf_counter() - start))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:,.0f} tokens/s" for n in runners), flush=True)
    median = {n: statistics.median(v) for n, v in rates.items()}
    ratio = median["effax"] / median["peer"]
    print(f"median tokens/s: effax {median['effax']:,.0f}, peer {median['peer']:,.0f}; effax / peer = {ratio:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "rounds": rates, "median": median,
                       "ratio": ratio, "params": runners["effax"][1]}, f, indent=2)
    return 0
