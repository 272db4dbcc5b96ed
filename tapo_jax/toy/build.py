r"""Rebuilds the shipped toy checkpoint: a tiny Qwen2 trained by our own SFT mode on arithmetic.

python -m tapo_jax.toy.build [--steps=1100] [--out=tapo_jax/toy/arith]

It is undertrained on purpose: it should solve about half of the problems, so that RL has groups
with both correct and incorrect samples.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 1100, "SFT steps.")
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


def build(out_dir: str, steps: int, seed: int = 0) -> None:
  """Random init -> SFT on generated problems -> `out_dir` (HF layout with tokenizer)."""
  from flax import nnx

  from tapo_jax import config as base
  from tapo_jax.models import Qwen, QwenConfig, save_pretrained
  from tapo_jax.toy import arith
  from tapo_jax.train import sft

  tokenizer = arith.make_tokenizer()
  with tempfile.TemporaryDirectory() as tmp:
    init_dir = os.path.join(tmp, "init")
    cfg = QwenConfig.from_hf(dict(MODEL, vocab_size=len(tokenizer)))
    save_pretrained(Qwen(cfg, rngs=nnx.Rngs(seed)), init_dir)
    tokenizer.save_pretrained(init_dir)
    data = os.path.join(tmp, "sft.jsonl")
    with open(data, "w") as f:
      for p in arith.make_problems(20000, seed=seed + 1):
        f.write(json.dumps({"prompt": p.problem, "response": p.solution}) + "\n")
    c = base.base_config()
    c.mode, c.seed = "sft", seed
    c.model.path, c.sft.path = init_dir, data
    c.sft.batch_size, c.sft.max_len = 64, 80
    c.optim.lr, c.optim.warmup_steps, c.optim.micro_batch = 3e-3, 50, 64
    c.optim.weight_decay = 0.0
    c.sft.steps, c.train.checkpoint_every = steps, steps
    c.loss.vocab_chunk = 128
    work = os.path.join(tmp, "work")
    sft.run(c, work)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    shutil.copytree(os.path.join(work, "hf"), out_dir)


def main(argv) -> None:
  del argv
  from tapo_jax.toy import arith

  out = _OUT.value or str(arith.CHECKPOINT_DIR)
  build(out, _STEPS.value)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
