r"""Rebuilds a shipped toy checkpoint: a tiny Qwen2 trained from scratch by our own SFT mode.

python -m tapo_jax.build_toy --domain=arith [--steps=1100] [--out=tapo_jax/toy/arith]
python -m tapo_jax.build_toy --domain=chain [--out=tapo_jax/toy/chain]

arith: chained two-digit additions (tapo_jax.toy.arith), one SFT phase on worked solutions.
chain: + - * chains over 0..99 (tapo_jax.toy.chain), cold-started by the SFT phases of
  CHAIN_PHASES: worked solutions (short rows, so most of the compute goes to arithmetic), then a
  mix of worked solutions and synthesis examples (tapo_jax.toy.teacher: synthesis prompt with a
  wrong and a right solution -> <analysis>...</analysis><reconstruction>...</reconstruction>),
  rendered with the chat template exactly as the RL loop renders its synthesis prompts. ~55 min
  on 2 CPU cores for the first four phases, ~30 min more for the copying curriculum after them;
  --init=DIR --first=N resumes from a saved phase's output; --tried runs TRIED_PHASES after the
  first TRIED_AFTER phases instead (copying curricula tried before, not shipped).
Both are undertrained on purpose: the model should solve some problems and fail others, so that RL
has groups with both correct and incorrect samples.
It sits above train/ (it runs `sft`), the domain it trains on (tapo_jax.toy) below it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import sys
import tempfile

from absl import app, flags

from tapo_jax.toy import chain

_DOMAIN = flags.DEFINE_enum("domain", "arith", ["arith", "chain"], "Toy domain to build.")
_STEPS = flags.DEFINE_integer("steps", None, "arith: SFT steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Init, data and data-order seed.")
_INIT = flags.DEFINE_string("init", None, "chain: start from this HF directory (with --first).")
_FIRST = flags.DEFINE_integer("first", 0, "chain: the first phase to run (0-based).")
_TRIED = flags.DEFINE_bool(
  "tried", False, "chain: CHAIN_PHASES[:TRIED_AFTER] + TRIED_PHASES (e.g. --init=DIR --first=4)."
)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: the shipped checkpoint dir).")

MODEL = dict(
  model_type="qwen2",
  hidden_size=128,
  intermediate_size=256,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=32,
  rope_theta=10000.0,
  tie_word_embeddings=True,
  max_position_embeddings=256,
)


CHAIN_MODEL = dict(MODEL, max_position_embeddings=768)
# The first distribution the shipped checkpoint saw: 2-3 digit numbers, values up to 9999. The
# model stayed at ~1% on it (too many arithmetic facts for its size); kept to reproduce the build.
WIDE = chain.Spec(
  max_start=999, min_operand=10, max_operand=999, max_value=9999, max_product_base=9999
)


@dataclasses.dataclass(frozen=True)
class Phase:
  """One SFT run of the `chain` build: `steps` x `batch` rows, a `synth_share` of them synthesis
  examples (the rest worked solutions) of problems drawn from `spec`."""

  steps: int
  batch: int
  lr: float
  warmup: int
  synth_share: float
  spec: chain.Spec
  data_seed: int  # problems and y⁻ errors
  order_seed: int  # order of the length blocks
  seed: int = 0  # the SFT run's config.seed
  scrambled_share: float = 0.0  # of the synthesis examples: of teacher.scramble'd solutions
  copy_share: float = 0.0  # of all rows: "Copy:" + a scrambled solution -> that solution
  stop_at: int = 0  # stopped after this many of its `steps` (its lr schedule spans all); 0 = none


def _copying(c, synth, scrambled, copy, data: int, run: int, stop_at: int = 0) -> Phase:
  """A 250-step phase of the copying curriculum: data seed data + c, order and run seeds run + c."""
  return Phase(
    250, 32, 2e-3, 10, synth, chain.SPEC, data_seed=data + c, order_seed=run + c, seed=run + c,
    scrambled_share=scrambled, copy_share=copy, stop_at=stop_at,
  )  # fmt: skip


# The shipped checkpoint's schedule, as it was run (docs/toy.md): arithmetic on WIDE, arithmetic
# on chain.SPEC, then the cold start: half, then 80% synthesis examples (the rest worked solutions);
# then the copying curriculum (each phase 250 x 32 rows at lr 2e-3): 2.6 phases of 10% "Copy:"
# rows and 58.5% synthesis examples (60% of them scrambled), which did not teach copying (greedy
# exact copies 0/64 after 500 steps); 1 phase of 60% "Copy:" rows, 10% synthesis examples (half
# scrambled), 30% worked solutions, which did (57/64); then SHIPPED_COPY_PHASES phases of 20%
# "Copy:" rows and 52% synthesis examples (half scrambled), which carried it into the
# constructions (2 more such phases were measured, not shipped: docs/toy.md).
SHIPPED_COPY_PHASES = 2
CHAIN_PHASES = (
  Phase(1000, 64, 3e-3, 50, 0.0, WIDE, data_seed=0, order_seed=0),
  Phase(500, 64, 2e-3, 20, 0.0, chain.SPEC, data_seed=100, order_seed=1),
  Phase(500, 32, 1e-3, 20, 0.5, chain.SPEC, data_seed=100, order_seed=1),
  Phase(500, 32, 2e-3, 20, 0.8, chain.SPEC, data_seed=101, order_seed=2, seed=1),
  *(_copying(c, 0.65, 0.6, 0.1, 200, 10) for c in range(2)),
  _copying(2, 0.65, 0.6, 0.1, 200, 10, stop_at=148),  # interrupted at step 148 of 250
  _copying(0, 0.25, 0.5, 0.6, 300, 30),
  *(_copying(c, 0.65, 0.5, 0.2, 300, 30) for c in range(SHIPPED_COPY_PHASES)),
)

# Tried after the first four phases (then shipped; --tried runs them there; docs/toy.md), not
# shipped: a phase with half the synthesis examples of scramble'd solutions (random results, so only
# copying predicts them) left the constructions where they were and cost accuracy; pure "Copy:"
# rows of scrambled solutions do teach copying (their loss 1.5 -> 0.14 in 200 steps).
TRIED_AFTER = 4  # they were run from the checkpoint of CHAIN_PHASES[:4] (shipped back then)
TRIED_PHASES = (
  Phase(
    500, 32, 2e-3, 20, 0.9, chain.SPEC, data_seed=102, order_seed=3, seed=2, scrambled_share=0.5
  ),
  # pure copy rows, from the shipped checkpoint (run by a script that wrote steps x batch rows in
  # order, without length blocks: all copy rows are ~150 tokens)
  Phase(200, 64, 2e-3, 10, 0.0, chain.SPEC, data_seed=104, order_seed=0, seed=4, copy_share=1.0),
  # then back to synthesis examples and worked solutions, with some copy rows
  Phase(150, 32, 1e-3, 10, 0.7, chain.SPEC, data_seed=105, order_seed=5, seed=5, copy_share=0.2),
)


def _init(out_dir: str, model: dict, tokenizer, seed: int) -> None:
  """A randomly initialized model with `tokenizer`, saved as an HF directory."""
  from flax import nnx

  from tapo_jax.models import Qwen, QwenConfig, save_pretrained

  cfg = QwenConfig.from_hf(dict(model, vocab_size=len(tokenizer)))
  save_pretrained(Qwen(cfg, rngs=nnx.Rngs(seed)), out_dir)
  tokenizer.save_pretrained(out_dir)


def _write_jsonl(path: str, rows) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def _sft(
  model_dir: str, data: str, work: str, *, steps, batch, max_len, lr, warmup, seed, stop_at=0
) -> str:
  """One `sft.run` from `model_dir` on `data` (stopped after `stop_at` of its `steps` when > 0);
  returns the trained HF directory."""
  from tapo_jax import config as base
  from tapo_jax.train import sft

  c = base.base_config()
  c.mode, c.seed = "sft", seed
  c.model.path, c.sft.path = model_dir, data
  c.sft.batch_size, c.sft.max_len = batch, max_len
  c.optim.lr, c.optim.warmup_steps, c.optim.micro_batch = lr, warmup, batch
  c.optim.weight_decay = 0.0
  c.sft.steps, c.train.checkpoint_every = steps, steps
  c.sft.stop_at = stop_at
  c.data.shuffle = False  # rows come in length blocks (see _in_length_blocks)
  c.loss.vocab_chunk = 512
  sft.run(c, work)
  return os.path.join(work, "hf")


def _lengths(rows, tokenizer) -> list[int]:
  """Each row's length in tokens once chat-formatted: <|im_start|>prompt<|im_end|><|im_start|>
  response<|im_end|> (four special tokens; the tokenizer has no merges, so lengths add up)."""
  enc = tokenizer([r["prompt"] + r["response"] for r in rows], add_special_tokens=False)
  return [len(ids) + 4 for ids in enc["input_ids"]]


def _in_length_blocks(rows, lengths, batch: int, seed: int, round_to: int = 128) -> list:
  """`rows` regrouped into blocks of `batch` rows of one padded length (sft pads each batch to its
  longest row rounded up to `round_to`), blocks in random order; leftover rows are dropped.
  Mixing a 100-token solution with a 400-token synthesis row would pad the solution to 512."""
  import random

  by_len = collections.defaultdict(list)
  for r, n in zip(rows, lengths):
    by_len[-(-n // round_to)].append(r)
  blocks = []
  for group in by_len.values():
    blocks += [group[i : i + batch] for i in range(0, len(group) - batch + 1, batch)]
  random.Random(seed).shuffle(blocks)
  return [r for b in blocks for r in b]


def build_arith(out_dir: str, steps: int, seed: int = 0) -> None:
  """Random init -> SFT on generated additions -> `out_dir` (HF layout with tokenizer)."""
  from tapo_jax.toy import arith

  with tempfile.TemporaryDirectory() as tmp:
    init_dir = os.path.join(tmp, "init")
    _init(init_dir, MODEL, arith.make_tokenizer(), seed)
    data = os.path.join(tmp, "sft.jsonl")
    problems = arith.make_problems(20000, seed=seed + 1)
    _write_jsonl(data, ({"prompt": p.problem, "response": p.solution} for p in problems))
    hf = _sft(
      init_dir, data, os.path.join(tmp, "work"),
      steps=steps, batch=64, max_len=80, lr=3e-3, warmup=50, seed=seed,
    )  # fmt: skip
    _publish(hf, out_dir)


def build_chain(
  out_dir: str, phases=CHAIN_PHASES, seed: int = 0, init: str | None = None, first: int = 0
) -> None:
  """Random init (seed `seed`) -> `phases[first:]` -> `out_dir`; with `init`, the phases start
  from that HF directory instead (a saved earlier phase's output). ~55 min on 2 CPU cores."""
  from tapo_jax.toy import teacher
  from tapo_jax.toy import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.make_tokenizer(extra=teacher.TAGS)
  with tempfile.TemporaryDirectory() as tmp:
    hf = init or os.path.join(tmp, "init")
    if init is None:
      _init(hf, CHAIN_MODEL, tokenizer, seed)
    for i, ph in enumerate(phases[first:], start=first):
      # 1.5x the rows a phase needs, so that every length block fills up after regrouping.
      rows = teacher.cold_start_rows(
        int(1.5 * ph.steps * ph.batch), ph.synth_share, ph.data_seed, ph.spec,
        ph.scrambled_share, ph.copy_share,
      )  # fmt: skip
      lengths = _lengths(rows, tokenizer)
      rows = _in_length_blocks(rows, lengths, ph.batch, ph.order_seed)[: ph.steps * ph.batch]
      data = os.path.join(tmp, f"phase{i + 1}.jsonl")
      _write_jsonl(data, rows)
      hf = _sft(
        hf, data, os.path.join(tmp, f"phase{i + 1}"), steps=ph.steps, batch=ph.batch,
        max_len=max(lengths), lr=ph.lr, warmup=ph.warmup, seed=ph.seed, stop_at=ph.stop_at,
      )  # fmt: skip
      ran = f"{ph.stop_at} of {ph.steps}" if ph.stop_at else ph.steps
      print(f"phase {i + 1}/{len(phases)} done ({ran} steps)", file=sys.stderr)
    _publish(hf, out_dir)


def _publish(hf_dir: str, out_dir: str) -> None:
  """Replaces `out_dir` with the trained HF directory (written next to it, then renamed)."""
  staging = out_dir.rstrip("/") + ".new"
  if os.path.exists(staging):
    shutil.rmtree(staging)
  shutil.copytree(hf_dir, staging)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(staging, out_dir)


def main(argv) -> None:
  del argv
  from tapo_jax.toy import arith

  if _DOMAIN.value == "arith":
    out = _OUT.value or str(arith.CHECKPOINT_DIR)
    build_arith(out, _STEPS.value or 1100, _SEED.value)
  else:
    out = _OUT.value or str(chain.CHECKPOINT_DIR)
    phases = CHAIN_PHASES[:TRIED_AFTER] + TRIED_PHASES if _TRIED.value else CHAIN_PHASES
    build_chain(out, phases, _SEED.value, _INIT.value, _FIRST.value)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
