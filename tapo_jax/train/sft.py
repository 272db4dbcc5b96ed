"""Supervised cold start (mode = sft): next-token loss on the response tokens only.

Legend: M micro-batches, m rows per micro-batch, W row width.

Examples are (context, response) rendered through the chat template and packed like the RL batch
(`tapo_jax.tapo.batch.pack_rows`): several per row of W tokens, each with its own positions and
segment id, W = the step's longest example rounded up to a multiple of 128 (at most sft.max_len;
a bounded set of shapes). A micro-batch is m rows (optim.micro_batch, or
optim.micro_batch_tokens / W); a step is [M, m, W] with M = ⌈batch_size / m⌉, its micro-batches
beyond the packed ones skipped by the update. The loss is the mean negative log-likelihood over
all response tokens of the step (additive over micro-batches).
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tapo_jax import config as config_lib
from tapo_jax import distributed, metrics, minibatches, sharding
from tapo_jax import policy as policy_lib
from tapo_jax.data import load_sft
from tapo_jax.data.prompts import tokenize_sft
from tapo_jax.models.logprobs import sequence_logprobs
from tapo_jax.tapo.batch import pack_rows
from tapo_jax.train import checkpoint
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib
from tapo_jax.train.iterator import BatchIterator


def sft_width(rows: list[tuple[list[int], list[bool]]], max_len: int, round_to: int = 128) -> int:
  """W: the longest example (at most max_len) rounded up to a multiple of `round_to`."""
  longest = max(min(len(ids), max_len) for ids, _ in rows)
  return min(max_len, round_to * math.ceil(longest / round_to))


def pack_sft(rows: list[tuple[list[int], list[bool]]], width: int, m: int, pad_id: int = 0):
  """(ids, mask) examples (truncated to `width`) packed into rows of `width` tokens: a dict of
  [M, m, width] arrays, M = ⌈len(rows) / m⌉ (enough for one example per row), packed rows first.
  The first token of each example is out of the loss (it has no prediction)."""
  ids = [list(i)[:width] for i, _ in rows]
  masks = [list(mk)[: len(i)] for i, (_, mk) in zip(ids, rows)]
  row, start, _ = pack_rows([len(i) for i in ids], width)
  n = -(-len(rows) // m)
  tokens = np.full((n * m, width), pad_id, np.int32)
  positions = np.zeros((n * m, width), np.int32)
  segment_ids = np.zeros((n * m, width), np.int32)
  mask = np.zeros((n * m, width), bool)
  for i in np.lexsort((start, row)):  # segments numbered in column order within a row
    r, c, k = row[i], start[i], len(ids[i])
    tokens[r, c : c + k], positions[r, c : c + k] = ids[i], np.arange(k)
    segment_ids[r, c : c + k] = segment_ids[r].max() + 1
    mask[r, c + 1 : c + k] = np.asarray(masks[i][1:], bool)
  shape = (n, m, width)
  return {
    "tokens": tokens.reshape(shape),
    "positions": positions.reshape(shape),
    "segment_ids": segment_ids.reshape(shape),
    "loss_mask": mask.reshape(shape),
    "denom": np.full((n, m), max(mask.sum(), 1), np.int32),
  }


def sft_loss(model, batch, chunk: int = 4096):
  """Summed response NLL / the whole batch's response-token count, and that count (a micro-batch:
  packed rows with positions and segment ids, or plain right-padded rows without)."""
  positions, segment_ids = batch.get("positions"), batch.get("segment_ids")
  hidden = model.hidden(batch["tokens"], positions, segment_ids)
  lp, _ = sequence_logprobs(hidden, model.lm_head(), batch["tokens"], chunk, segment_ids)
  mask = batch["loss_mask"].astype(jnp.float32)
  denom = batch["denom"][0].astype(jnp.float32)
  nll = -(lp * mask).sum() / denom
  return nll, {"nll": nll, "tokens": mask.sum()}


def run(cfg, workdir: str) -> None:
  """The SFT loop: resumes from the newest checkpoint in `workdir` when there is one."""
  mesh, model, tokenizer = policy_lib.load_policy(cfg)
  examples = load_sft(cfg.sft.path)
  rows = [tokenize_sft(e, tokenizer, cfg.data.use_chat_template) for e in examples]
  bs = cfg.sft.batch_size
  steps = cfg.sft.steps or cfg.sft.epochs * math.ceil(len(rows) / bs)
  it = BatchIterator(rows, bs, seed=cfg.seed, shuffle=cfg.data.shuffle)
  os.makedirs(workdir, exist_ok=True)

  optimizer = state_lib.make_optimizer(cfg.optim, steps)
  graphdef, state, ssh = state_lib.create(model, mesh, optimizer)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
  state, start, _ = ckpt.resume(state, ssh, it)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  chunk = cfg.loss.vocab_chunk
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(
      graphdef,
      optimizer,
      lambda m, b: sft_loss(m, b, chunk),
      ssh,
      max_update_ratio=cfg.optim.max_update_ratio,
    )
  dp = sharding.data_parallel_size(mesh)
  stop = checkpoint.PreemptionGuard()
  try:
    writer = metrics.MetricWriter(workdir, total_steps=steps, start_step=start)
    last = min(steps, cfg.sft.stop_at or steps)  # the schedule still spans `steps`
    for step in range(start, last):
      t0 = time.time()
      examples = it.next()
      width = sft_width(examples, cfg.sft.max_len)
      rows = minibatches.rows_per_micro_batch(config_lib.micro_batch_tokens(cfg, width), width, dp)
      batch = pack_sft(examples, width, rows, pad)  # the same on every process
      micro_batches = sharding.put_global(batch, sharding.batch_shardings(batch, mesh, row_axis=1))
      ckpt.wait()  # a failed asynchronous save stops the run before another update
      with jax.set_mesh(mesh):
        state, m = train_step(state, micro_batches)
      m = metrics.to_host(m)
      real = int((batch["segment_ids"] > 0).sum())
      used = int(batch["segment_ids"].any(axis=(1, 2)).sum())  # micro-batches the update ran
      m["tokens_per_s"] = float(batch["loss_mask"].sum()) / max(time.time() - t0, 1e-9)
      m["perf/pad_fraction"] = 1.0 - real / max(used * rows * width, 1)
      writer.write(step + 1, m)
      writer.advance({"nll": m["nll"]})
      ckpt.save(step + 1, state, {"data": it.state()}, force=stop.requested or step + 1 == last)
      if stop.requested:
        print(f"{stop.reason}: checkpointed step {step + 1} in {workdir}; exiting", file=sys.stderr)
        break
  finally:
    stop.restore()  # the caller's SIGINT/SIGTERM handlers again (a notebook's Ctrl-C)
  ckpt.close()
  writer.close()
  jax.block_until_ready(state.params)
  from tapo_jax import plot
  from tapo_jax.models import export

  export.export_model(
    nnx.merge(graphdef, state.params),
    tokenizer,
    os.path.join(workdir, "hf"),
    source_dir=policy_lib.model_dir(cfg),
  )
  if distributed.is_main() and cfg.train.curves:
    plot.plot_if_logged(workdir)  # WORKDIR/curves.png
