"""The RL loop (mode = rl), top to bottom:

  data -> rollouts (engine) -> rewards (verifier pool) -> TAPO construction -> DAE + masks ->
  (old logprobs) -> minibatch updates -> metrics -> checkpoint.

Each step's randomness is folded from (seed, step) and the data iterator's state is saved with the
checkpoint, so a run killed at any point and resumed from its workdir ends bit-identical (on the
same hardware) to one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from tapo_jax import eval as eval_lib
from tapo_jax import rewards as rewards_lib
from tapo_jax import sampling
from tapo_jax.data import Problem, filter_by_pass_rate, load_problems
from tapo_jax.data.prompts import format_prompts
from tapo_jax.sampling import driver as sampling_driver
from tapo_jax.tapo import batch as batch_lib
from tapo_jax.tapo import construct as construct_lib
from tapo_jax.tapo import loss as loss_lib
from tapo_jax.toy import arith
from tapo_jax.train import checkpoint, metrics, setup
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib
from tapo_jax.train.iterator import BatchIterator

TOY_PROBLEMS = 4096


def training_problems(cfg) -> list[Problem]:
  """The configured training file, or generated toy problems for the toy model."""
  if cfg.data.train_path:
    return load_problems(cfg.data.train_path, cfg.data.layout)
  toy = arith.make_problems(TOY_PROBLEMS, seed=cfg.seed + 12345)
  return [Problem(id=f"arith-{i}", problem=p.problem, answer=p.answer) for i, p in enumerate(toy)]


def filter_by_difficulty(cfg, model, tokenizer, problems, workdir: str) -> list[Problem]:
  """The problems whose pass rate under the initial policy lies in data.pass_rate_window.

  The rates are computed once (rollout.n samples per problem at the rollout settings) and cached
  in WORKDIR/pass_rates.json, so a resumed run trains on exactly the same set."""
  low, high = cfg.data.pass_rate_window
  path = os.path.join(workdir, "pass_rates.json")
  if os.path.exists(path):
    with open(path) as f:
      rates = json.load(f)
  else:
    print(
      f"measuring pass rates of {len(problems)} problems for the difficulty filter", file=sys.stderr
    )
    rates = eval_lib.compute_pass_rates(
      model,
      tokenizer,
      problems,
      k=cfg.rollout.n,
      temperature=cfg.rollout.temperature,
      top_p=cfg.rollout.top_p,
      top_k=cfg.rollout.top_k,
      max_new_tokens=cfg.rollout.max_new_tokens,
      template=cfg.data.prompt_template,
      use_chat_template=cfg.data.use_chat_template,
      seed=cfg.seed,
      timeout_s=cfg.reward.timeout_s,
      workers=cfg.reward.workers,
    )
    with open(path + ".tmp", "w") as f:
      json.dump(rates, f)
    os.replace(path + ".tmp", path)
  kept = filter_by_pass_rate(problems, rates, low, high)
  print(
    f"difficulty filter [{low}, {high}]: kept {len(kept)} of {len(problems)} problems",
    file=sys.stderr,
  )
  if not kept:
    raise ValueError(
      f"data.pass_rate_window=({low}, {high}) keeps none of {len(problems)} problems"
    )
  return kept


def pad_rows(batch: batch_lib.Rollouts, multiple: int) -> batch_lib.Rollouts:
  """Appends invalid all-padding rows until the row count is a multiple of `multiple`."""
  extra = -batch.num_rows % multiple
  if not extra:
    return batch

  def one(x):
    if x is None:
      return None
    return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])

  return jax.tree.map(one, batch)


def take_rows(batch, idx):
  return jax.tree.map(lambda x: x[idx], batch)


def make_logprob_fn(graphdef, chunk: int):
  """Jitted token-aligned logprobs of rows under `params` (π_old for multi-update steps)."""

  @jax.jit
  def logprobs(params, tokens, positions):
    model = nnx.merge(graphdef, params)
    lp, _ = loss_lib.sequence_logprobs(
      model.hidden(tokens, positions), model.lm_head(), tokens, chunk
    )
    return lp

  return logprobs


def run(cfg, workdir: str) -> None:
  """Trains for cfg.train.steps RL steps; resumes from the newest checkpoint in `workdir`."""
  t_setup = time.time()
  mesh, model, tokenizer = setup.load_policy(cfg)
  os.makedirs(workdir, exist_ok=True)
  problems = training_problems(cfg)
  if cfg.data.pass_rate_window:
    problems = filter_by_difficulty(cfg, model, tokenizer, problems, workdir)
  k, q = cfg.rollout.n, cfg.rollout.batch_queries
  eos = eval_lib.default_eos_ids(tokenizer)
  template = cfg.data.prompt_template
  it = BatchIterator(problems, q, seed=cfg.seed, shuffle=cfg.data.shuffle)

  updates_per_step = cfg.optim.ppo_epochs * cfg.optim.minibatches
  optimizer = state_lib.make_optimizer(cfg.optim, cfg.train.steps * updates_per_step)
  graphdef, state, ssh = state_lib.create(model, mesh, optimizer)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
  state, start = ckpt.resume(state, ssh, it)

  buckets = tuple(sorted(cfg.rollout.prefill_buckets))
  engine = sampling_driver.engine_for(
    model,
    slots=cfg.rollout.slots,
    max_len=buckets[-1] + cfg.rollout.max_new_tokens,
    prefill_buckets=buckets,
    mesh=mesh,
  )
  pool = rewards_lib.VerifierPool(
    workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s
  ).start()
  tables = construct_lib.token_tables(tokenizer, model.cfg.vocab_size, eos)
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(
      graphdef, optimizer, lambda m, b: loss_lib.tapo_loss(m, b, cfg), ssh, None
    )
  logprob_fn = make_logprob_fn(graphdef, cfg.loss.vocab_chunk)
  data_par = mesh.shape["data"] * mesh.shape["fsdp"]
  row_multiple = math.lcm(cfg.optim.micro_batch, data_par) * cfg.optim.minibatches
  stop = checkpoint.PreemptionGuard()
  writer = metrics.MetricWriter(workdir, total_steps=cfg.train.steps, start_step=start)
  logging.info("setup took %.1fs", time.time() - t_setup)

  try:
    for step in range(start, cfg.train.steps):
      t0 = time.time()
      key = jax.random.fold_in(jax.random.key(cfg.seed), step)
      batch_problems = it.next()
      golds = [p.answer for p in batch_problems]
      prompts = format_prompts(
        batch_problems, template, tokenizer, cfg.data.use_chat_template, cfg.data.max_prompt_tokens
      )

      # 1. Rollouts: K samples per query from the current policy.
      gen = sampling.generate(
        None,
        prompts,
        n=k,
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        eos_token_ids=eos,
        seed=cfg.seed * 1_000_003 + step,
        engine=engine,
        params=state.params,
      )
      t_rollout = time.time()

      # 2. Rewards from the verifier pool.
      texts = [tokenizer.decode(c, skip_special_tokens=True) for c in gen.completions]
      rewards = pool.grade(texts, [g for g in golds for _ in range(k)])
      originals = batch_lib.pack_rollouts(
        prompts,
        gen.completions,
        gen.logprobs,
        samples_per_prompt=k,
        max_len=cfg.tapo.max_len,
        eos_ids=eos,
        max_new_tokens=cfg.rollout.max_new_tokens,
        rewards=rewards,
      )
      t_reward = time.time()

      # 3. TAPO: candidate selection and micro-reflective constructions (added, never replacing).
      tapo_metrics: dict[str, float] = {}
      batch = originals
      if cfg.algorithm == "tapo":
        cons, tapo_metrics = construct_lib.construct(
          originals,
          golds,
          jax.random.fold_in(key, 1),
          cfg.tapo,
          k=k,
          tokenizer=tokenizer,
          grade_fn=pool.grade,
          tables=tables,
          eos_ids=eos,
          generate_fn=_synthesis_fn(cfg, model, state.params, eos, step),
          queries=[p.problem for p in batch_problems],
          chat=cfg.data.use_chat_template,
        )
        batch = batch_lib.concat_rollouts(originals, cons)
      t_construct = time.time()

      # 4. Decoupled advantages, masks and loss scales over the whole batch.
      batch = pad_rows(batch, row_multiple)
      batch, prep_metrics = loss_lib.prepare_batch(batch, cfg)
      if updates_per_step > 1:  # π_old differs from π_θ after the first update
        batch = batch.replace(old_logprobs=logprob_fn(state.params, batch.tokens, batch.positions))

      # 5. Updates: ppo_epochs passes over `minibatches` shuffled parts of the batch.
      n_rows, mb = batch.num_rows, batch.num_rows // cfg.optim.minibatches
      step_metrics = []
      for epoch in range(cfg.optim.ppo_epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 2 + epoch), n_rows))
        for i in range(cfg.optim.minibatches):
          part = take_rows(batch, order[i * mb : (i + 1) * mb])
          part = part.replace(loss_scale=part.loss_scale * cfg.optim.minibatches)
          micro = step_lib.split_micro_batches(part, cfg.optim.micro_batch)
          with jax.set_mesh(mesh):
            state, m = train_step(state, micro)
          step_metrics.append(m)
      t_update = time.time()

      # 6. Metrics (host side) and checkpoint.
      out = _step_metrics(step_metrics, prep_metrics, tapo_metrics, gen, rewards, cfg)
      out.update(
        {
          "time/rollout": t_rollout - t0,
          "time/reward": t_reward - t_rollout,
          "time/construct": t_construct - t_reward,
          "time/update": t_update - t_construct,
          "time/step": time.time() - t0,
          "perf/rollout_tokens_per_s": sum(map(len, gen.completions)) / max(t_rollout - t0, 1e-9),
          "perf/train_tokens_per_s": float(np.asarray(batch.loss_mask).sum())
          * cfg.optim.ppo_epochs
          / max(t_update - t_construct, 1e-9),
        }
      )
      writer.write(step + 1, out)
      writer.advance({"acc": out["reward/accuracy"], "loss": out["loss"]})
      if out["skipped"]:
        logging.warning("step %d: non-finite loss or gradient, update skipped", step + 1)
      if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
        _periodic_eval(cfg, nnx.merge(graphdef, state.params), tokenizer, workdir, step + 1, writer)
      ckpt.save(step + 1, state, {"data": it.state()}, force=stop.requested)
      if stop.requested:
        print(f"SIGTERM: checkpointed step {step + 1} in {workdir}; exiting", file=sys.stderr)
        break
    else:
      ckpt.save(cfg.train.steps, state, {"data": it.state()}, force=True)
  finally:
    ckpt.close()
    writer.close()
    pool.close()


def _synthesis_fn(cfg, model, params, eos, step):
  """generate_fn for the paper's `policy` construction: the current policy writes them."""
  if cfg.tapo.construction != "policy":
    return None

  def generate_fn(prompts, max_new_tokens):
    longest = max(len(p) for p in prompts)
    bucket = 1 << max(6, (longest - 1).bit_length())
    gen = sampling.generate(
      model,
      prompts,
      n=1,
      max_new_tokens=max_new_tokens,
      temperature=cfg.rollout.temperature,
      top_p=cfg.rollout.top_p,
      top_k=cfg.rollout.top_k,
      eos_token_ids=eos,
      seed=cfg.seed * 1_000_003 + step + 7919,
      params=params,
      slots=cfg.rollout.slots,
      max_len=bucket + max_new_tokens,
      prefill_buckets=(bucket,),
    )
    return gen.completions

  return generate_fn


def _step_metrics(step_metrics, prep_metrics, tapo_metrics, gen, rewards, cfg) -> dict[str, float]:
  """Sums the additive loss metrics over updates (means over updates for the rest)."""
  host = [metrics.to_host(m) for m in step_metrics]
  out = {key: float(np.mean([h[key] for h in host])) for key in host[0]}
  out["skipped"] = float(sum(h["skipped"] for h in host))
  out.update(metrics.to_host(prep_metrics))
  out.update({k_: float(v) for k_, v in tapo_metrics.items()})
  lens = np.array([len(c) for c in gen.completions])
  out["reward/accuracy"] = float(np.mean(np.asarray(rewards) > 0.5))
  out["reward/mean"] = float(np.mean(rewards))
  out["response/len_mean"] = float(lens.mean())
  out["response/len_max"] = float(lens.max())
  out["response/truncated_frac"] = float(np.mean(gen.truncated))
  return out


def _periodic_eval(cfg, model, tokenizer, workdir, step, writer) -> None:
  from tapo_jax.eval.run import eval_sets

  out_dir = os.path.join(workdir, "eval", f"step_{step}")
  summary = eval_lib.evaluate_sets(
    model, tokenizer, eval_sets(cfg), out_dir=out_dir, **eval_lib.eval_kwargs(cfg)
  )
  writer.write(step, summary, prefix="eval/")
