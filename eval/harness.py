"""lm-evaluation-harness adapter: score a restored checkpoint on lm-eval tasks (`pip install effax[harness]`).

    python -m effax.eval.harness --model_args workdir=runs/quickstart,step=latest --tasks lambada_openai

The core, `EffaxScorer`, needs no lm_eval: it answers lm-eval's three request types on plain tuples.

    scorer = EffaxScorer(restore("runs/quickstart"), batch_size=16)
    scorer.loglikelihood([("The state of the", " Union")])     # [(log p, is_greedy)]
    scorer.loglikelihood_rolling(["A whole document."])       # [log p of the whole text]
    scorer.generate_until([("Q: 2+2?\nA:", {"until": ["\n"], "max_gen_toks": 32})])

Semantics follow lm-eval's Hugging Face adapter (HFLM), so scores compare with published ones:

* loglikelihood: trailing spaces of the context move to the continuation; the context and the whole
  text are encoded and the continuation is the whole's tokens after the context's token count (exact
  with byte-level tokens; with BPE the boundary token is the whole's, as HFLM does). context +
  continuation are cut from the left to max_length + 1 tokens (max_length inputs); is_greedy: the
  continuation is the argmax at every scored position. An empty context conditions on EOS.
* loglikelihood_rolling: non-overlapping predicted spans of max_length tokens; the first token is
  predicted from EOS, every later window gets a full max_length of preceding context (lm-eval's
  `get_rolling_token_windows` with context_len=1).
* generate_until: the context is cut from the left to max_length - max_gen_toks tokens, generation
  stops at EOS, and the text is cut before the first of `until`. Greedy unless do_sample=True.

How EOS conditions a document start. Training packs each document as tokens + EOS with segment ids, so a
document never attends to the EOS before it and its tokens sit at positions 0, 1, …; the EOS's own
prediction (the next document's first token) is masked out of the loss. Here the EOS keeps its own
segment: every later token is computed exactly as in training, and the first token's log-prob comes
from the EOS's logits — an untrained prediction in this recipe, one token per document.

All log-probs are fp32 log-softmax over the model's (padded) vocabulary, as the training loss. Batches
have fixed shapes: batch_size rows (a multiple of the mesh's batch axes, data × fsdp × expert), lengths
padded to a power-of-two bucket (>= 16, capped at max_length), so a run compiles at most ~log2(max_length) times.
"""

from __future__ import annotations

import collections
import functools
import logging
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from effax.eval.restore import restore
from effax.models.generate import Sampling, generate_ids
from effax.train import mesh as mesh_lib

log = logging.getLogger("effax")

MIN_BUCKET = 16
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default


@functools.partial(jax.jit, static_argnums=0)
def _score_batch(graphdef, state, tokens_BT, targets_BT, positions_BT, segments_BT, mask_BT):
    """-> (Σ log p(target) over mask [B], every masked target is the argmax [B])."""
    model = nnx.merge(graphdef, state)
    logits_BTV, _ = model(tokens_BT, positions_BT=positions_BT, segment_ids_BT=segments_BT)
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return jnp.sum(logp_BT * mask_BT, axis=-1), jnp.all(greedy_BT | (mask_BT == 0), axis=-1)


class _Row(NamedTuple):
    """One scoring row: inputs seq[:-1] predict seq[1:]; the last n_scored targets count.
    doc_start: seq[0] is the EOS before a document (its own segment); offset: the document position of
    seq[0] otherwise (rolling windows continue mid-document, as training's positions do)."""

    seq: list[int]
    n_scored: int
    doc_start: bool
    offset: int = 0


class EffaxScorer:
    """lm-eval's request types over a restored checkpoint (an `EvalContext` from `eval.restore.restore`)."""

    def __init__(self, ctx, batch_size: int = 16, max_length: int | None = None, seed: int = 0,
                 progress: bool | None = None):
        self.ctx, self.tok = ctx, ctx.tokenizer
        self.max_length = int(max_length or ctx.cfg.data.seq_len)
        ways = mesh_lib.batch_ways(ctx.mesh)
        self.batch_size = -(-max(1, int(batch_size)) // ways) * ways  # the batch axis splits over data × fsdp × expert
        if self.batch_size != batch_size:
            log.info("harness: batch_size %s rounded up to %d (a multiple of the mesh's batch axes, "
                     "data × fsdp × expert)", batch_size, self.batch_size)
        self.seed = seed
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._graphdef, self._state = nnx.split(ctx.model)
        self._sharding = mesh_lib.batch_sharding(ctx.mesh, ctx.rules)

    # -- tokenization ------------------------------------------------------------------------------

    def _eos(self) -> int:
        if self.tok.eos_id < 0:
            raise ValueError(f"tokenizer {self.tok!r} has no EOS to condition a document start on")
        return self.tok.eos_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int], bool]:
        """(context ids, continuation ids, context is the EOS document start), as HFLM encodes them."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # HFLM: "a" + " b" tokenizes better as ("a", " b") than ("a ", "b")
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if context == "":
            return [self._eos()], self.tok.encode(continuation).tolist(), True
        whole, ctx_ids = self.tok.encode_batch([context + continuation, context])
        return ctx_ids.tolist(), whole[len(ctx_ids):].tolist(), False

    # -- the three request types -------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """[(Σ log p(continuation | context), continuation is greedy)] for (context, continuation) pairs."""
        rows = []
        for context, continuation in requests:
            ctx_ids, cont_ids, doc_start = self.encode_pair(context, continuation)
            seq = ctx_ids + cont_ids
            cut = max(0, len(seq) - (self.max_length + 1))  # keep the last max_length inputs + 1 target
            seq = seq[cut:]
            # positions stay those of the uncut text (the context starts at 0; after an EOS start, so does the text)
            offset = cut - 1 if doc_start else cut
            rows.append(_Row(seq, min(len(cont_ids), len(seq) - 1), doc_start and cut == 0, max(offset, 0)))
        return self._score(rows)

    def loglikelihood_rolling(self, texts) -> list[float]:
        """[Σ log p(text)] of whole texts, each token predicted once, the first from EOS."""
        T, rows, owner = self.max_length, [], []
        for i, text in enumerate(texts):
            ids = self.tok.encode(text).tolist()
            if not ids:
                continue
            rows.append(_Row([self._eos()] + ids[:T], min(T, len(ids)), doc_start=True))
            owner.append(i)
            end = min(T, len(ids))
            while end < len(ids):  # later windows: predict up to T new tokens after a full T of context
                n = min(T, len(ids) - end)
                end += n
                rows.append(_Row(ids[end - T - 1:end], n, doc_start=False, offset=end - T - 1))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logp, _) in zip(owner, self._score(rows)):
            totals[i] += logp
        return totals

    def generate_until(self, requests) -> list[str]:
        """Completions of (context, gen_kwargs) requests; gen_kwargs as lm-eval gives them: until (a string
        or list), max_gen_toks, do_sample, temperature, top_k, top_p."""
        groups = collections.defaultdict(list)  # requests sharing settings share compiles
        stops = []
        for i, (context, gen_kwargs) in enumerate(requests):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            stops.append([until] if isinstance(until, str) else list(until))
            max_gen = int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            do_sample = bool(kw.pop("do_sample", False))
            temperature, top_k, top_p = float(kw.pop("temperature", 1.0)), int(kw.pop("top_k", 0) or 0), \
                float(kw.pop("top_p", 1.0) or 1.0)
            if kw:
                log.warning("harness: generate_until ignores gen_kwargs %s", sorted(kw))
            # HFLM: greedy unless do_sample, whatever the temperature says
            sampling = Sampling(temperature, top_k, top_p) if do_sample and temperature > 0 else Sampling()
            # Cut the prompt from the left so that prompt + new tokens fit max_length (HFLM).
            ids = self.tok.encode(context).tolist()[-max(1, self.max_length - max_gen):]
            groups[(max_gen, sampling)].append((i, ids))
        out = [""] * len(requests)
        B, n_batches = self.batch_size, 0
        with jax.set_mesh(self.ctx.mesh), nnx.logical_axis_rules(self.ctx.rules):
            for (max_gen, sampling), items in groups.items():
                items.sort(key=lambda item: -len(item[1]))
                for start in tqdm(range(0, len(items), B), desc="generate_until", disable=not self.progress,
                                  leave=False):
                    chunk = items[start:start + B]
                    rows, _ = generate_ids(self.ctx.model, [ids for _, ids in chunk], max_new_tokens=max_gen,
                                           eos_id=self.tok.eos_id, sampling=sampling, seed=self.seed + n_batches,
                                           stop_at_eos=True, pad_batch_to=B)
                    n_batches += 1
                    for (i, _), row in zip(chunk, rows):
                        out[i] = cut_at_stop(self.tok.decode(np.asarray(row, np.int32)), stops[i])
        return out

    # -- batched scoring ---------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), self.max_length)

    def _score(self, rows: list[_Row]) -> list[tuple[float, bool]]:
        results = [(0.0, True)] * len(rows)  # an empty continuation: log 1, trivially greedy
        order = sorted((i for i, r in enumerate(rows) if r.n_scored > 0), key=lambda i: -len(rows[i].seq))
        B, pending = self.batch_size, []
        with jax.set_mesh(self.ctx.mesh), nnx.logical_axis_rules(self.ctx.rules):
            for start in tqdm(range(0, len(order), B), desc="loglikelihood", disable=not self.progress, leave=False):
                idx = order[start:start + B]
                batch = self._batch([rows[i] for i in idx], self._bucket(len(rows[idx[0]].seq) - 1))
                pending.append((idx, _score_batch(self._graphdef, self._state, *batch)))
            for idx, (logp_B, greedy_B) in pending:  # fetched after dispatching all: the device never waits
                logp_B, greedy_B = jax.device_get((logp_B, greedy_B))
                for b, i in enumerate(idx):
                    results[i] = (float(logp_B[b]), bool(greedy_B[b]))
        return results

    def _batch(self, rows: list[_Row], T: int):
        """[B, T] tokens, targets, positions, segment ids, score mask; unused rows and tails are unscored."""
        B = self.batch_size
        tokens, targets = np.full((B, T), max(self.tok.eos_id, 0), np.int32), np.zeros((B, T), np.int32)
        positions, segments = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        mask = np.zeros((B, T), np.float32)
        for b, r in enumerate(rows):
            n = len(r.seq) - 1
            tokens[b, :n], targets[b, :n] = r.seq[:-1], r.seq[1:]
            mask[b, n - r.n_scored:n] = 1
            segments[b, :n] = 2
            if r.doc_start:  # the EOS alone in segment 1 at position 0; the text from position 0 on
                segments[b, 0] = 1
                positions[b, 1:n] = np.arange(n - 1)
            else:
                positions[b, :n] = r.offset + np.arange(n)
        return tuple(jax.device_put(a, self._sharding) for a in (tokens, targets, positions, segments, mask))


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` before the earliest occurrence of any (non-empty) stop string."""
    ends = [text.find(s) for s in until if s]
    return text[:min([e for e in ends if e >= 0], default=len(text))]


# ---------------------------------------------------------------------------------------------------
# lm_eval registration (only when lm_eval is installed: effax never requires it)

try:
    import lm_eval.models  # noqa: F401  (registers lm_eval's own models: get_model skips that once any is registered)
    from lm_eval.api.model import LM as _LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string
except ImportError:
    _LM = None

if _LM is not None:

    class EffaxLM(_LM):
        """`--model effax --model_args workdir=DIR,step=latest,batch_size=16[,max_length=N,seed=S]`."""

        def __init__(self, workdir: str, step="latest", batch_size=16, max_length=None, seed: int = 0,
                     max_batch_size=None, device=None):
            # max_batch_size / device come from lm_eval's own flags: jax picks the devices; batches are fixed.
            super().__init__()
            if batch_size is None or str(batch_size).startswith("auto"):
                batch_size = 16  # no auto-tuning: one fixed batch shape keeps compiles few
            max_length = int(max_length) if max_length else None
            self.scorer = EffaxScorer(restore(workdir, step), int(batch_size), max_length, int(seed))
            self.max_length = self.scorer.max_length

        @classmethod
        def create_from_arg_obj(cls, arg_dict, additional_config=None):
            # lm_eval passes its --batch_size etc. again in additional_config: model_args win
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
            return cls(**arg_dict, **extra)

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        def get_model_info(self) -> dict:
            ctx = self.scorer.ctx
            return {"effax_workdir": ctx.workdir, "effax_step": ctx.step, "max_length": self.max_length}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = self.scorer.loglikelihood([req.args for req in requests])
            for req, res in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", req.args, res)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = self.scorer.loglikelihood_rolling([req.args[0] for req in requests])
            for req, res in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = self.scorer.generate_until([req.args for req in requests])
            for req, res in zip(requests, out):
                self.cache_hook.add_partial("generate_until", req.args, res)
            return out

    if __name__ != "__main__":  # under `python -m` main() imports the real module, which registers
        register_model("effax")(EffaxLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the effax model registered (`--model effax` is the default):

        python -m effax.eval.harness --model_args workdir=runs/quickstart --tasks hellaswag --limit 100
    """
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("effax.eval.harness needs lm-evaluation-harness: pip install 'effax[harness]'")
    import effax.eval.harness  # noqa: F401  (registers "effax" when run as `python -m`)

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("ls", "validate"):
        if argv and argv[0] == "run":
            argv = argv[1:]
        if "--model" not in argv:
            argv = ["--model", "effax", *argv]
        argv = ["run", *argv]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
