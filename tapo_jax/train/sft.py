"""Supervised cold start (mode = sft): next-token loss on the response tokens only.

Rows are (context, response) rendered through the chat template, right-padded to the batch's
longest row rounded up to a multiple of 128 (bounded compilations); the loss is the mean negative
log-likelihood over all response tokens of the batch (additive over micro-batches).
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

from tapo_jax import distributed, sharding
from tapo_jax.data import load_sft
from tapo_jax.data.prompts import tokenize_sft
from tapo_jax.tapo.loss import sequence_logprobs
from tapo_jax.train import checkpoint, metrics
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib
from tapo_jax.train.iterator import BatchIterator


def pack_sft(rows: list[tuple[list[int], list[bool]]], max_len: int, pad_id: int, round_to=128):
  """(ids, mask) pairs -> dict of padded arrays; rows longer than max_len are truncated."""
  longest = max(min(len(ids), max_len) for ids, _ in rows)
  t = min(max_len, round_to * math.ceil(longest / round_to))
  tokens = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), bool)
  for i, (ids, m) in enumerate(rows):
    n = min(len(ids), t)
    tokens[i, :n], mask[i, :n] = ids[:n], m[:n]
  mask[:, 0] = False  # the first token has no prediction
  return {"tokens": tokens, "loss_mask": mask, "denom": np.full(len(rows), max(mask.sum(), 1))}


def sft_loss(model, batch, chunk: int = 4096):
  """Summed response NLL / the whole batch's response-token count, and that count."""
  hidden = model.hidden(batch["tokens"])
  lp, _ = sequence_logprobs(hidden, model.lm_head(), batch["tokens"], chunk)
  mask = batch["loss_mask"].astype(jnp.float32)
  denom = batch["denom"][0].astype(jnp.float32)
  nll = -(lp * mask).sum() / denom
  return nll, {"nll": nll, "tokens": mask.sum()}


def run(cfg, workdir: str) -> None:
  """The SFT loop: resumes from the newest checkpoint in `workdir` when there is one."""
  mesh, model, tokenizer = state_lib.load_policy(cfg)
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
  micro = min(cfg.optim.micro_batch, bs) if bs % cfg.optim.micro_batch == 0 else bs
  stop = checkpoint.PreemptionGuard()
  writer = metrics.MetricWriter(workdir, total_steps=steps, start_step=start)
  for step in range(start, steps):
    t0 = time.time()
    batch = pack_sft(it.next(), cfg.sft.max_len, pad)  # the same on every process
    micro_batches = step_lib.split_micro_batches(batch, micro)
    micro_batches = sharding.put_global(
      micro_batches, sharding.batch_shardings(micro_batches, mesh, row_axis=1)
    )
    ckpt.wait()  # a failed asynchronous save stops the run before another update
    with jax.set_mesh(mesh):
      state, m = train_step(state, micro_batches)
    m = metrics.to_host(m)
    m["tokens_per_s"] = float(batch["loss_mask"].sum()) / max(time.time() - t0, 1e-9)
    writer.write(step + 1, m)
    writer.advance({"nll": m["nll"]})
    ckpt.save(step + 1, state, {"data": it.state()}, force=stop.requested or step + 1 == steps)
    if stop.requested:
      print(f"SIGTERM: checkpointed step {step + 1} in {workdir}; exiting", file=sys.stderr)
      break
  ckpt.close()
  writer.close()
  jax.block_until_ready(state.params)
  from tapo_jax import export, plot

  export.export_model(
    nnx.merge(graphdef, state.params),
    tokenizer,
    os.path.join(workdir, "hf"),
    source_dir=state_lib.model_dir(cfg),
  )
  if distributed.is_main():
    plot.plot_if_logged(workdir)  # WORKDIR/curves.png
