"""The RL loop (mode = rl), top to bottom:

  data -> rollouts (rollout engine) -> rewards (verifier pool) -> DCS -> constructions (the
  divergence rules, or synthesis prompts -> synthesis engine -> anchoring) -> rewards of the
  constructions (same pool, same decoding) -> DAE + masks (prepare_batch) -> π_old ->
  minibatch updates -> metrics -> periodic eval (eval engine) -> checkpoint.

Every sampler is an engine built once, in setup, on the training mesh, and handed the current
params at each call; there is one verifier pool per run. Each step's randomness is folded from
(seed, step) and the data iterator's state is saved with the checkpoint, so a run killed at any
point and resumed from its workdir ends bit-identical (on the same hardware) to one that was
never interrupted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from tapo_jax import config as config_lib
from tapo_jax import distributed, sampling, sharding
from tapo_jax import eval as eval_lib
from tapo_jax import rewards as rewards_lib
from tapo_jax.data.prompts import format_prompts
from tapo_jax.tapo import batch as batch_lib
from tapo_jax.tapo import construct, divergence, synthesis
from tapo_jax.tapo import loss as loss_lib
from tapo_jax.train import checkpoint, metrics
from tapo_jax.train import engines as engines_lib
from tapo_jax.train import problems as problems_lib
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib
from tapo_jax.train.iterator import BatchIterator


def grade(pool, tokenizer, responses, golds, eos) -> np.ndarray:
  """Rewards of responses (token lists): the one decoding and grading path for every row."""
  texts = eval_lib.decode_responses(tokenizer, responses, eos)
  return distributed.divided(pool.grade)(texts, list(golds))


def grade_constructions(pool, tokenizer, cons, golds, eos) -> np.ndarray:
  """[C] rewards of the built constructions against their source query's gold (0 elsewhere)."""
  q = len(golds)
  built = np.flatnonzero(np.asarray(cons.valid))
  rewards = np.zeros(cons.num_rows, np.float32)
  if built.size:
    source = np.asarray(cons.group_ids)[built] - q
    responses = batch_lib.response_ids(batch_lib.take_rows(cons, built), eos)
    rewards[built] = grade(pool, tokenizer, responses, [golds[j] for j in source], eos)
  return rewards


# ------------------------------------------------------------------------------------------- loop


def run(cfg, workdir: str) -> None:
  """Trains for cfg.train.steps RL steps; resumes from the newest checkpoint in `workdir`."""
  t_setup = time.time()
  mesh, model, tokenizer = state_lib.load_policy(cfg)
  os.makedirs(workdir, exist_ok=True)
  k, q = cfg.rollout.n, cfg.rollout.batch_queries
  eos = eval_lib.default_eos_ids(tokenizer)
  tapo = cfg.algorithm == "tapo"
  policy_construction = tapo and cfg.tapo.construction == "policy"
  template = None
  if policy_construction:
    text = cfg.tapo.synthesis_template or synthesis.SYNTHESIS_TEMPLATE
    template = synthesis.encode_template(tokenizer, text, cfg.data.use_chat_template)
  engines = engines_lib.build_engines(cfg, model, mesh, template)
  for name, engine in engines.unique().items():
    print(f"engine {name}: {engine.describe()}", file=sys.stderr)
  vocab_size = model.cfg.vocab_size
  pool = rewards_lib.VerifierPool(
    workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s, extract=cfg.reward.extract
  )
  pool.start()
  problems = problems_lib.training_problems(cfg)
  if cfg.data.pass_rate_window:
    params = nnx.state(model, nnx.Param)
    problems = problems_lib.filter_by_difficulty(
      cfg, engines.rollout, params, tokenizer, pool, problems, workdir
    )
  it = BatchIterator(problems, q, seed=cfg.seed, shuffle=cfg.data.shuffle)

  updates_per_step = cfg.optim.ppo_epochs * cfg.optim.minibatches
  optimizer = state_lib.make_optimizer(cfg.optim, cfg.train.steps * updates_per_step)
  graphdef, state, ssh = state_lib.create(model, mesh, optimizer)
  del model  # its arrays are the state's params now (donated by every update)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
  state, start = ckpt.resume(state, ssh, it)

  loss_cfg = loss_lib.LossConfig.from_config(cfg)
  roll = engines_lib.rollout_sampling(cfg, eos)
  tables = construct.token_tables(tokenizer, vocab_size, eos)
  diag, joiner = divergence.diagnosis_tokens(tokenizer, cfg.tapo.diagnosis_template)
  dcs_args = dict(n_pos=cfg.tapo.n_pos, n_neg=cfg.tapo.n_neg, m_max=cfg.tapo.m_max)
  synthesize = functools.partial(
    _synthesize, cfg, engines.synthesis, tokenizer, template, roll, tables
  )
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(
      graphdef,
      optimizer,
      functools.partial(loss_lib.tapo_loss, cfg=loss_cfg),
      ssh,
      max_update_ratio=cfg.optim.max_update_ratio,
    )
  old_logprobs = step_lib.make_old_logprobs(
    graphdef, cfg.loss.vocab_chunk, cfg.optim.micro_batch, loss_cfg.temperature
  )
  row_multiple = math.lcm(cfg.optim.micro_batch, sharding.data_parallel_size(mesh))
  row_multiple *= cfg.optim.minibatches
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
        batch_problems,
        cfg.data.prompt_template,
        tokenizer,
        cfg.data.use_chat_template,
        cfg.data.max_prompt_tokens,
      )

      # 1. Rollouts: K samples per query from the current policy.
      gen = sampling.generate(
        engines.rollout,
        state.params,
        prompts,
        roll,
        n=k,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=cfg.seed * 1_000_003 + step,
      )
      t_rollout = time.time()

      # 2. Rewards from the verifier pool.
      rewards = grade(pool, tokenizer, gen.completions, [g for g in golds for _ in range(k)], eos)
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

      # 3. TAPO: candidate selection, micro-reflective constructions (added, never replacing),
      #    graded like the originals.
      batch, tapo_metrics = originals, {}
      if tapo:
        cands = construct.select(originals, jax.random.fold_in(key, 1), k=k, **dcs_args)
        if policy_construction:
          queries = [p.problem for p in batch_problems]
          cons, prefix, synth_metrics = synthesize(state.params, originals, cands, queries, step)
        else:
          cons, prefix = divergence.divergence_rows(originals, cands, diag, joiner, tables, k=k)
          synth_metrics = {}
        cons = cons.replace(rewards=grade_constructions(pool, tokenizer, cons, golds, eos))
        tapo_metrics = {**construct.construction_metrics(cands, cons, prefix), **synth_metrics}
        batch = batch_lib.concat_rollouts(originals, cons)
      t_construct = time.time()
      if cfg.train.dump_rollouts_every and (step + 1) % cfg.train.dump_rollouts_every == 0:
        _dump_rollouts(workdir, step + 1, batch_problems, tokenizer, batch, eos)  # process 0

      # 4. Decoupled advantages, masks and loss scales over the whole step; π_old. The batch
      #    is the same on every process; on the mesh its rows are split over the data axes.
      train, prep_metrics = loss_lib.prepare_batch(
        batch_lib.pad_rows(batch, row_multiple), loss_cfg
      )
      train = sharding.to_host(train)
      rows = sharding.put_global(train, sharding.batch_shardings(train, mesh))
      old = old_logprobs(state.params, rows.tokens, rows.positions)
      train = train.replace(old_logprobs=sharding.to_host(old))

      # 5. Updates: ppo_epochs passes over `minibatches` shuffled parts of the batch.
      step_metrics = []
      for epoch in range(cfg.optim.ppo_epochs):
        parts = step_lib.minibatches(
          train,
          jax.random.fold_in(key, 2 + epoch),
          cfg.optim.minibatches,
          cfg.optim.micro_batch,
          mesh,
        )
        for part in parts:
          with jax.set_mesh(mesh):
            state, m = train_step(state, part)
          step_metrics.append(m)
      t_update = time.time()

      # 6. Metrics (host side), periodic eval and checkpoint.
      out = _step_metrics(step_metrics, prep_metrics, tapo_metrics, gen, rewards)
      out.update(
        {
          "time/rollout": t_rollout - t0,
          "time/reward": t_reward - t_rollout,
          "time/construct": t_construct - t_reward,
          "time/update": t_update - t_construct,
          "time/step": time.time() - t0,
          "perf/rollout_tokens_per_s": sum(map(len, gen.completions)) / max(t_rollout - t0, 1e-9),
          "perf/train_tokens_per_s": float(np.asarray(train.loss_mask).sum())
          * cfg.optim.ppo_epochs
          / max(t_update - t_construct, 1e-9),
        }
      )
      writer.write(step + 1, out)
      writer.advance({"acc": out["reward/accuracy"], "loss": out["loss"]})
      if out["skipped"]:
        logging.warning("step %d: non-finite or exploding update, skipped", step + 1)
      if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
        eval_dir = os.path.join(workdir, "eval", f"step_{step + 1}")
        summary = eval_lib.evaluate_sets(
          engines.eval,
          state.params,
          tokenizer,
          problems_lib.eval_sets(cfg),
          out_dir=eval_dir if distributed.is_main() else None,
          grade_fn=distributed.divided(pool.grade),
          **eval_lib.eval_kwargs(cfg),
        )
        writer.write(step + 1, summary, prefix="eval/")
      ckpt.save(step + 1, state, {"data": it.state()}, force=stop.requested)
      if stop.requested:
        print(f"SIGTERM: checkpointed step {step + 1} in {workdir}; exiting", file=sys.stderr)
        break
    else:
      if start < cfg.train.steps:
        ckpt.save(cfg.train.steps, state, {"data": it.state()}, force=True)
  finally:
    ckpt.close()
    writer.close()
    pool.close()


def _synthesize(
  cfg, engine, tokenizer, template, roll, tables, params, originals, cands, queries, step
):
  """The paper's construction: synthesis prompts -> the policy samples -> parse and anchor."""
  k, eos = cfg.rollout.n, roll.eos_ids
  query_tokens, query_lens = synthesis.encode_queries(tokenizer, queries)
  sp = synthesis.synthesis_prompts(
    originals, cands, query_tokens, query_lens, tables.is_eos, k=k, template=template
  )
  neg, _, _, valid = construct.pair_rows(originals, cands, k)
  todo, prompts = synthesis.prompt_lists(sp, valid)
  outputs = []
  if prompts:  # a step with no eligible query samples nothing
    gen = sampling.generate(
      engine,
      params,
      prompts,
      roll,
      n=1,
      max_new_tokens=config_lib.synthesis_max_new_tokens(cfg),
      seed=cfg.seed * 1_000_003 + step + 7919,
    )
    outputs = gen.completions
  negatives = batch_lib.response_ids(batch_lib.take_rows(originals, neg), eos)
  anchored = synthesis.anchor(
    tokenizer,
    todo,
    outputs,
    negatives,
    slots=len(negatives),
    width=originals.tokens.shape[1],
    eos_ids=eos,
    min_anchor=cfg.tapo.min_anchor,
    anchor_prefix=cfg.tapo.anchor,
  )
  rows = synthesis.anchored_rows(
    originals, cands, anchored.prefix_lens, anchored.rest, anchored.rest_lens, anchored.ok, k=k
  )
  return rows, anchored.prefix_lens, anchored.metrics(len(todo))


def _step_metrics(step_metrics, prep_metrics, tapo_metrics, gen, rewards) -> dict[str, float]:
  """Metrics of the step: means over its updates ("*_max": the max), skipped updates summed."""
  host = [metrics.to_host(m) for m in step_metrics]
  pick = lambda key: np.max if key.endswith("_max") else np.mean  # noqa: E731
  out = {key: float(pick(key)([h[key] for h in host])) for key in host[0]}
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


def _dump_rollouts(workdir, step, problems, tokenizer, batch, eos) -> None:
  """WORKDIR/rollouts/step_N.jsonl: every valid row of the step (originals then constructions)
  as the verifier read it, with its reward (written by process 0)."""
  if not distributed.is_main():
    return
  valid = np.flatnonzero(np.asarray(batch.valid))
  rows = batch_lib.take_rows(batch, valid)
  texts = eval_lib.decode_responses(tokenizer, batch_lib.response_ids(rows, eos), eos)
  group, constructed, reward, truncated = jax.device_get(
    (rows.group_ids, rows.is_constructed, rows.rewards, rows.truncated)
  )
  os.makedirs(os.path.join(workdir, "rollouts"), exist_ok=True)
  path = os.path.join(workdir, "rollouts", f"step_{step}.jsonl")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for i, text in enumerate(texts):
      query = int(group[i]) - (len(problems) if constructed[i] else 0)
      row = dict(
        query=problems[query].id, constructed=bool(constructed[i]), reward=float(reward[i]),
        truncated=bool(truncated[i]), response=text,
      )  # fmt: skip
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)
