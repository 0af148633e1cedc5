"""What every eval suite receives: the restored model on this machine's mesh and the run's config."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass
class EvalContext:
    cfg: object  # effax.train.config.Config: the run's resolved config (workdir/config.json)
    model: object  # the restored nnx.Module (parameters only, sharded over `mesh`)
    tokenizer: object  # effax.train.tokenizer.Tokenizer of the run
    mesh: jax.sharding.Mesh
    rules: tuple  # logical-axis rules in force for `mesh`
    step: int  # the checkpoint step that was restored
    workdir: str
