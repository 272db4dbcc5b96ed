r"""Rebuilds a shipped toy checkpoint: a tiny Qwen2 trained from scratch by our own SFT mode.

python -m tapo_jax.toy.build --domain=arith [--steps=1100] [--out=tapo_jax/toy/arith]
python -m tapo_jax.toy.build --domain=chain [--out=tapo_jax/toy/chain]

arith: chained two-digit additions (tapo_jax.toy.arith), one SFT phase on worked solutions.
chain: mixed + - * chains (tapo_jax.toy.chain), cold-started in two SFT phases:
  1. worked solutions only (short rows, so most of the compute goes to arithmetic);
  2. a mix of worked solutions and synthesis examples (tapo_jax.toy.teacher: synthesis prompt with
     a wrong and a right solution -> <analysis>...</analysis><reconstruction>...</reconstruction>),
     rendered with the chat template exactly as the RL loop renders its synthesis prompts.
Both are undertrained on purpose: the model should solve some problems and fail others, so that RL
has groups with both correct and incorrect samples.
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
_STEPS = flags.DEFINE_integer("steps", None, "arith: SFT steps; chain: phase-1 steps.")
_STEPS2 = flags.DEFINE_integer("steps2", None, "chain: phase-2 (mixed) steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Init, data and data-order seed.")
_INIT = flags.DEFINE_string(
  "init", None, "chain: start phase 2 from this phase-1 output instead of running phase 1."
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


@dataclasses.dataclass(frozen=True)
class ChainRecipe:
  """Model and SFT schedule of the shipped `chain` checkpoint (see docs/toy.md for the sweep)."""

  model: tuple = tuple(dict(MODEL, max_position_embeddings=768).items())
  steps1: int = 1000  # phase 1: worked solutions only
  steps2: int = 600  # phase 2: solutions + synthesis examples
  batch: int = 64  # phase 1
  batch2: int = 32  # phase 2 (rows are ~4x longer)
  lr1: float = 3e-3
  lr2: float = 1e-3
  synth_share: float = 0.5  # of phase-2 rows
  spec: chain.Spec = chain.SPEC


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


def _sft(model_dir: str, data: str, work: str, *, steps, batch, max_len, lr, warmup, seed) -> str:
  """One `sft.run` from `model_dir` on `data`; returns the trained HF directory."""
  from tapo_jax import config as base
  from tapo_jax.train import sft

  c = base.base_config()
  c.mode, c.seed = "sft", seed
  c.model.path, c.sft.path = model_dir, data
  c.sft.batch_size, c.sft.max_len = batch, max_len
  c.optim.lr, c.optim.warmup_steps, c.optim.micro_batch = lr, warmup, batch
  c.optim.weight_decay = 0.0
  c.sft.steps, c.train.checkpoint_every = steps, steps
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
  out_dir: str, recipe: ChainRecipe = ChainRecipe(), seed: int = 0, init: str | None = None
) -> None:
  """Random init -> phase 1 (solutions) -> phase 2 (solutions + synthesis) -> `out_dir`; with
  `init` (a phase-1 output), phase 2 only."""
  from tapo_jax.toy import teacher
  from tapo_jax.toy import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.make_tokenizer(extra=teacher.TAGS)
  with tempfile.TemporaryDirectory() as tmp:
    hf = init or os.path.join(tmp, "init")
    if init is None:
      _init(hf, dict(recipe.model), tokenizer, seed)
    phases = [
      (recipe.steps1 if init is None else 0, recipe.batch, recipe.lr1, 50, 0.0),
      (recipe.steps2, recipe.batch2, recipe.lr2, 20, recipe.synth_share),
    ]
    for i, (steps, batch, lr, warmup, share) in enumerate(phases):
      if not steps:
        continue
      # 1.5x the rows a phase needs, so that every length block fills up after regrouping.
      rows = teacher.cold_start_rows(
        int(1.5 * steps * batch), share, seed=seed + 100 * i, spec=recipe.spec
      )
      lengths = _lengths(rows, tokenizer)
      rows = _in_length_blocks(rows, lengths, batch, seed + i)[: steps * batch]
      data = os.path.join(tmp, f"phase{i + 1}.jsonl")
      _write_jsonl(data, rows)
      hf = _sft(
        hf, data, os.path.join(tmp, f"phase{i + 1}"),
        steps=steps, batch=batch, max_len=max(lengths), lr=lr, warmup=warmup, seed=seed,
      )  # fmt: skip
      print(f"phase {i + 1} done ({steps} steps)", file=sys.stderr)
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
    recipe = ChainRecipe()
    if _STEPS.value is not None:
      recipe = dataclasses.replace(recipe, steps1=_STEPS.value)
    if _STEPS2.value is not None:
      recipe = dataclasses.replace(recipe, steps2=_STEPS2.value)
    build_chain(out, recipe, _SEED.value, _INIT.value)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
