"""The RL loop (mode = rl), top to bottom:

  data -> rollouts (rollout engine) -> rewards (verifier pool) -> DCS -> constructions (the
  divergence rules, or synthesis prompts -> synthesis engine -> anchoring) -> rewards of the
  constructions (same pool, same decoding) -> DAE + masks (prepare_batch) -> packed minibatches,
  put on the mesh once -> π_old -> minibatch updates -> metrics -> periodic eval (eval engine)
  -> checkpoint.

algorithm=opsd replaces construct/advantages/loss with on-policy self-distillation: each rollout
gets a teacher row (the policy shown a privileged solution) and the update minimizes a per-token
divergence to it (`tapo_jax.opsd.Distiller`, called in stages 4-5).

The file reads in the order a run runs: `setup(cfg, workdir) -> (run, state, start)` builds
everything once (meshes, engines, verifier pool, data, compiled step functions) and resumes;
`rl_step(run, state, step) -> (state, metrics)` is one step, stages 1-6 in order, the `policy`
construction as select -> synthesis requests -> sample -> rows -> grade; `run` is the loop around
it: the step's metrics written, periodic eval, checkpoint, and at the end the exported policy.

Rollouts come from `train.rollouts`: sampled at the start of the step, with dynamic sampling
when configured, or one step ahead in a background thread (rollout.async_steps = 1).

Every sampler is an engine built once, in setup, over the samplers' devices in the decode layout
(tapo_jax/sampling/engine.py), and handed the step's decode copy of the params (one on-device
reshard per step, `Engines.sync`); there is one verifier pool per run. Each step's randomness
is folded from (seed, step) and the data iterator's state is saved with the checkpoint, so a run
killed at any point and resumed from its workdir ends bit-identical (on the same hardware) to one
that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from tapo_jax import config as config_lib
from tapo_jax import distributed, metrics, minibatches, plot, sampling, sharding
from tapo_jax import eval as eval_lib
from tapo_jax import policy as policy_lib
from tapo_jax import rewards as rewards_lib
from tapo_jax.data import text as text_lib
from tapo_jax.data.prompts import check_prompt_lengths
from tapo_jax.models import export
from tapo_jax.opsd import Distiller
from tapo_jax.sampling import engines as engines_lib
from tapo_jax.sampling import stage
from tapo_jax.tapo import batch as batch_lib
from tapo_jax.tapo import construct, divergence, synthesis
from tapo_jax.tapo import loss as loss_lib
from tapo_jax.train import checkpoint
from tapo_jax.train import problems as problems_lib
from tapo_jax.train import rollouts as rollouts_lib
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib
from tapo_jax.train.iterator import BatchIterator

# ------------------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Run:
  """What every step of a run reads, built once by `setup`: the meshes, the engines, the verifier
  pool, the data, the compiled step functions and the run's writers. `synced` is the one field a
  step changes: the samplers' copy of the params when an eval already made it (used, then
  cleared, by the next step)."""

  cfg: Any
  workdir: str
  mesh: Any  # the training mesh
  tokenizer: Any
  eos: list[int]
  engines: engines_lib.Engines
  pool: rewards_lib.VerifierPool
  grade: Callable  # (texts, golds) -> rewards: the pool, divided over processes, locked
  held_out: dict  # eval set name -> problems
  it: BatchIterator
  producer: rollouts_lib.Producer
  distiller: Distiller | None  # algorithm=opsd
  graphdef: Any
  optimizer: Any
  ckpt: checkpoint.Checkpointer
  loss_cfg: loss_lib.LossConfig
  roll: sampling.Sampling  # the rollouts' (and the synthesis') sampling settings
  tables: construct.TokenTables
  diag: Any  # the divergence construction's diagnosis line and joiner
  joiner: Any
  template: synthesis.Template | None  # the policy construction's synthesis prompt
  train_step: Callable
  old_logprobs: Callable
  relayout: Callable
  rows_per_micro: int
  writer: metrics.MetricWriter
  compiles: metrics.CompileCounter
  stop: checkpoint.PreemptionGuard
  copy: bool  # one-step-off: the samplers read a copy while the trainer donates its params
  synced: Any = None
  syncs: int = 0

  def close(self) -> None:
    self.stop.restore()  # the caller's SIGINT/SIGTERM handlers again (a notebook's Ctrl-C)
    self.compiles.close()
    self.producer.close()
    self.writer.close()
    self.pool.close()
    self.ckpt.close()  # last: it raises a failed save's error again


def setup(cfg, workdir: str):
  """(run, state, start): everything built once, and the train state at step `start` (resumed
  from the newest checkpoint in `workdir`, else fresh)."""
  t_setup = time.time()
  compiles = metrics.CompileCounter()
  mesh, model, tokenizer = policy_lib.load_policy(cfg)
  sampler_mesh = policy_lib.meshes(cfg)[1] if cfg.rollout.sampler_devices else mesh
  os.makedirs(workdir, exist_ok=True)
  eos = text_lib.default_eos_ids(tokenizer)
  template = None
  if cfg.algorithm == "tapo" and cfg.tapo.construction == "policy":
    text = cfg.tapo.synthesis_template or synthesis.SYNTHESIS_TEMPLATE
    template = synthesis.encode_template(tokenizer, text, cfg.data.use_chat_template)
  engines = engines_lib.build_engines(cfg, model, sampler_mesh, template)
  for name, engine in engines.unique().items():
    print(f"engine {name}: {engine.describe()}", file=sys.stderr)
  vocab_size = model.cfg.vocab_size
  pool = rewards_lib.VerifierPool(
    workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s, extract=cfg.reward.extract
  )
  pool.start()
  problems = problems_lib.training_problems(cfg)
  check_prompt_lengths(
    problems, cfg.data.prompt_template, tokenizer, cfg.data.max_prompt_tokens,
    cfg.data.use_chat_template, path=cfg.data.train_path,
  )  # fmt: skip
  periodic = cfg.train.eval_every or cfg.train.eval_at_start
  held_out = eval_lib.checked_eval_sets(cfg, tokenizer) if periodic else {}
  if cfg.data.pass_rate_window:
    params = engines.sync(nnx.state(model, nnx.Param))
    problems = problems_lib.filter_by_difficulty(
      cfg, engines.rollout, params, tokenizer, pool, problems, workdir
    )
  distiller = None
  if cfg.algorithm == "opsd":
    distiller = Distiller(cfg, tokenizer, eos, problems, model.cfg.max_position_embeddings)
    print(distiller.describe(), file=sys.stderr)
  it = BatchIterator(problems, cfg.rollout.batch_queries, seed=cfg.seed, shuffle=cfg.data.shuffle)

  updates_per_step = cfg.optim.ppo_epochs * cfg.optim.minibatches
  optimizer = state_lib.make_optimizer(cfg.optim, cfg.train.steps * updates_per_step)
  graphdef, state, ssh = state_lib.create(model, mesh, optimizer)
  del model  # its arrays are the state's params now (donated by every update)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
  state, start, restored = ckpt.resume(state, ssh, it)

  loss_cfg = loss_lib.LossConfig.from_config(cfg)
  roll = engines_lib.rollout_sampling(cfg, eos)
  grade = rollouts_lib.locked(distributed.divided(pool.grade))  # loop and producer thread
  sampler = rollouts_lib.Sampler(cfg, engines.rollout, tokenizer, grade, eos, roll)
  pending = restored.get("pending")  # the next step's rollouts, made before an interruption
  pending = rollouts_lib.StepRollouts.from_json(pending) if pending else None
  producer = rollouts_lib.Producer(sampler, cfg.rollout.async_steps, pending)
  diag, joiner = divergence.diagnosis_tokens(tokenizer, cfg.tapo.diagnosis_template)
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(
      graphdef,
      optimizer,
      distiller.loss_fn() if distiller else functools.partial(loss_lib.tapo_loss, cfg=loss_cfg),
      ssh,
      max_update_ratio=cfg.optim.max_update_ratio,
    )
  rows_per_micro = minibatches.rows_per_micro_batch(
    config_lib.micro_batch_tokens(cfg, cfg.tapo.max_len),
    cfg.tapo.max_len,
    sharding.data_parallel_size(mesh),
  )
  stop = checkpoint.PreemptionGuard()  # before the writer: its metrics.jsonl says "guarded"
  try:
    writer = metrics.MetricWriter(workdir, total_steps=cfg.train.steps, start_step=start)
  except BaseException:
    stop.restore()
    raise
  run = Run(
    cfg=cfg,
    workdir=workdir,
    mesh=mesh,
    tokenizer=tokenizer,
    eos=eos,
    engines=engines,
    pool=pool,
    grade=grade,
    held_out=held_out,
    it=it,
    producer=producer,
    distiller=distiller,
    graphdef=graphdef,
    optimizer=optimizer,
    ckpt=ckpt,
    loss_cfg=loss_cfg,
    roll=roll,
    tables=construct.token_tables(tokenizer, vocab_size, eos),
    diag=diag,
    joiner=joiner,
    template=template,
    train_step=train_step,
    old_logprobs=step_lib.make_old_logprobs(graphdef, cfg.loss.vocab_chunk, loss_cfg.temperature),
    relayout=minibatches.make_relayout(mesh),
    rows_per_micro=rows_per_micro,
    writer=writer,
    compiles=compiles,
    stop=stop,
    copy=bool(cfg.rollout.async_steps),
    syncs=engines.syncs,
  )
  logging.info("setup took %.1fs", time.time() - t_setup)
  return run, state, start


# ------------------------------------------------------------------------------------------- step


def rl_step(run: Run, state, step: int):
  """One RL step: (state after the step's updates, the step's metrics)."""
  cfg, k = run.cfg, run.cfg.rollout.n
  t0 = time.time()
  key = jax.random.fold_in(jax.random.key(cfg.seed), step)

  # 1-2. Rollouts: K samples per query from the policy, graded by the verifier pool (now, or,
  #      one-step-off, during the previous step with its params; the next step's start here with
  #      the params this step starts from). The samplers' decode copy of the params is made once
  #      per step, on device, and serves every engine of the step.
  params = run.synced if run.synced is not None else run.engines.sync(state.params, copy=run.copy)
  run.synced = None
  r, staleness = run.producer.take(params, run.it, step)
  if step + 1 < cfg.train.steps:
    run.producer.start_next(params, run.it, step)
  originals = batch_lib.pack_rollouts(
    r.prompts,
    r.completions,
    r.logprobs,
    samples_per_prompt=k,
    max_len=cfg.tapo.max_len,
    eos_ids=run.eos,
    max_new_tokens=cfg.rollout.max_new_tokens,
    rewards=r.rewards,
  )
  t_reward = time.time()

  # 3. TAPO: candidate selection, micro-reflective constructions (added, never replacing),
  #    graded like the originals.
  batch, tapo_metrics = originals, {}
  if cfg.algorithm == "tapo":
    cands = construct.select(
      originals, jax.random.fold_in(key, 1), k=k,
      n_pos=cfg.tapo.n_pos, n_neg=cfg.tapo.n_neg, m_max=cfg.tapo.m_max,
    )  # fmt: skip
    if run.template is not None:  # the paper's: the policy rewrites y⁻ given y⁺
      cons, prefix, synth_metrics = _policy_constructions(run, params, originals, cands, r, step)
    else:
      cons, prefix = divergence.divergence_rows(
        originals, cands, run.diag, run.joiner, run.tables, k=k
      )
      synth_metrics = {}
    golds = [p.answer for p in r.problems]
    cons = cons.replace(rewards=grade_constructions(run.grade, run.tokenizer, cons, golds, run.eos))
    tapo_metrics = {**construct.construction_metrics(cands, cons, prefix), **synth_metrics}
    batch = batch_lib.concat_rollouts(originals, cons)
  t_construct = time.time()
  if cfg.train.dump_rollouts_every and (step + 1) % cfg.train.dump_rollouts_every == 0:
    _dump_rollouts(run.workdir, step + 1, r.problems, run.tokenizer, batch, run.eos)  # process 0

  # 4. Decoupled advantages, masks and loss scales over the whole step; the sequences with a
  #    loss token dealt to minibatches and packed into rows (micro-batches of rows_per_micro x
  #    max_len tokens), put on the mesh once (the same on every process; rows split over the
  #    data axes); π_old computed where they lie.
  train, prep_metrics = loss_lib.prepare_batch(batch, run.loss_cfg)
  train = sharding.to_host(train)
  n_mb, mesh, m = cfg.optim.minibatches, run.mesh, run.rows_per_micro
  num_micro = minibatches.micro_batches_bound(train.num_rows, n_mb, m)
  if run.distiller:  # OPSD: each rollout's teacher row, packed in pairs with its student row
    train, prep_metrics = run.distiller.add_teacher(
      train, prep_metrics, originals, r.problems, step
    )
    deal = functools.partial(run.distiller.layout, train, n=n_mb, m=m, num_micro=num_micro)
    layout = deal(jax.random.fold_in(key, 2))
    parts = run.distiller.minibatches(train, layout, mesh)
  else:
    seqs = (
      train.segment_ids.sum(axis=1),
      train.loss_mask.any(axis=1),
      train.is_constructed[:, 0],
    )
    deal = functools.partial(
      minibatches.layout_minibatches, *seqs, n=n_mb, m=m, width=cfg.tapo.max_len,
      num_micro=num_micro,
    )  # fmt: skip
    layout = deal(jax.random.fold_in(key, 2))
    parts = minibatches.packed_minibatches(train, layout, mesh)
  if not run.distiller or run.distiller.needs_old_logprobs:
    with jax.set_mesh(mesh):
      parts = [p.replace(old_logprobs=run.old_logprobs(state.params, p)) for p in parts]
  jax.block_until_ready(parts)  # π_old's time in time/advantage, not the update's
  real_tokens, processed = layout.tokens()  # (OPSD: the student's and the teacher's)
  micro_batches = layout.micro_batches_used()
  t_advantage = time.time()

  # 5. Updates: ppo_epochs passes over `minibatches` shuffled parts of the batch (dealt anew
  #    each epoch, on the mesh; with one minibatch the dealing changes nothing). The last
  #    checkpoint's asynchronous save (it overlapped the rollouts) must have succeeded.
  run.ckpt.wait()
  step_metrics = []
  for epoch in range(cfg.optim.ppo_epochs):
    if epoch and n_mb > 1:
      new = deal(jax.random.fold_in(key, 2 + epoch))
      if run.distiller:  # its distilled slots are row-relative: packed anew on the host
        parts, layout = run.distiller.relayout(train, parts, new, layout, mesh), new
      else:
        parts, layout = run.relayout(parts, new, layout), new
    for part in parts:
      with jax.set_mesh(mesh):
        state, out = run.train_step(state, part)
      step_metrics.append(out)
  jax.block_until_ready(state.params)  # the update's time, not its dispatch's
  t_update = time.time()

  # 6. The step's metrics (host side).
  out = _step_metrics(step_metrics, prep_metrics, tapo_metrics, r)
  out.update(run.compiles.take())  # (the first step's include setup's)
  out.update(
    {
      "rollout/staleness": float(staleness),
      "perf/weight_syncs": float(run.engines.syncs - run.syncs),  # 1: the step's decode copy
      "time/rollout_wait": t_reward - t0,  # all of rollout + reward unless one-step-off
      "time/construct": t_construct - t_reward,
      "time/advantage": t_advantage - t_construct,
      "time/update": t_update - t_advantage,
      "time/step": time.time() - t0,
      "perf/rollout_tokens_per_s": r.stats["perf/rollout_tokens"]
      / max(r.stats["time/rollout"], 1e-9),
      # real (prompt + response) tokens of the trained sequences per second of update
      "perf/train_tokens_per_s": real_tokens
      * cfg.optim.ppo_epochs
      / max(t_update - t_advantage, 1e-9),
      # padding / processed tokens of π_old and the updates (the same layout)
      "perf/pad_fraction": 1.0 - real_tokens / max(processed, 1),
      "perf/micro_batches": float(micro_batches),
    }
  )
  run.syncs = run.engines.syncs
  return state, out


def _policy_constructions(run: Run, params, originals, cands, r, step: int):
  """The paper's construction, in the order it runs: synthesis requests -> the policy samples one
  rewrite per request (the synthesis engine) -> anchored rows. (Graded by the caller.)"""
  cfg = run.cfg
  req = synthesis.requests(
    originals, cands, [p.problem for p in r.problems], run.tokenizer, run.tables.is_eos,
    k=cfg.rollout.n, template=run.template, eos_ids=run.eos,
  )  # fmt: skip
  outputs = []
  if req.prompts:  # a step with no eligible query samples nothing
    outputs = sampling.generate(
      run.engines.synthesis,
      params,
      req.prompts,
      run.roll,
      n=1,
      max_new_tokens=config_lib.synthesis_max_new_tokens(cfg),
      seed=cfg.seed * 1_000_003 + step + 7919,
    ).completions
  return synthesis.rows(
    run.tokenizer, req, outputs, originals, cands, k=cfg.rollout.n, eos_ids=run.eos,
    min_anchor=cfg.tapo.min_anchor, anchor_prefix=cfg.tapo.anchor,
  )  # fmt: skip


def grade_constructions(grade, tokenizer, cons, golds, eos) -> np.ndarray:
  """[C] rewards of the built constructions against their source query's gold (0 elsewhere)."""
  q = len(golds)
  built = np.flatnonzero(np.asarray(cons.valid))
  rewards = np.zeros(cons.num_rows, np.float32)
  if built.size:
    source = np.asarray(cons.group_ids)[built] - q
    responses = batch_lib.response_ids(batch_lib.take_rows(cons, built), eos)
    rewards[built] = stage.grade(grade, tokenizer, responses, [golds[j] for j in source], eos)
  return rewards


# ------------------------------------------------------------------------------------------- loop


def run(cfg, workdir: str) -> None:
  """Trains for cfg.train.steps RL steps; resumes from the newest checkpoint in `workdir`."""
  run, state, start = setup(cfg, workdir)  # (the Run: this function is the loop around it)

  def evaluate(at: int, params) -> dict[str, float]:
    """The held-out sets at step `at` (eval.k samples, and one greedy sample with eval.greedy)
    with the samplers' copy `params`, written to the metrics as eval/<set>/<metric>."""
    summary = eval_lib.evaluate_sets(
      run.engines.eval,
      params,
      run.tokenizer,
      run.held_out,
      out_dir=os.path.join(workdir, "eval", f"step_{at}") if distributed.is_main() else None,
      grade_fn=run.grade,
      **eval_lib.eval_kwargs(cfg),
    )
    run.writer.write(at, summary, prefix="eval/")
    return summary

  evals = {}  # step -> eval summary, this process's run only
  try:
    if cfg.train.eval_at_start and start == 0 and cfg.train.steps:
      run.synced = run.engines.sync(state.params, copy=run.copy)
      evals[0] = evaluate(0, run.synced)
    for step in range(start, cfg.train.steps):
      state, out = rl_step(run, state, step)
      run.writer.write(step + 1, out)
      run.writer.advance({"acc": out["reward/accuracy"], "loss": out["loss"]})
      if out["skipped"]:
        logging.warning("step %d: non-finite or exploding update, skipped", step + 1)
      if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
        run.synced = run.engines.sync(
          state.params, copy=run.copy
        )  # also the next step's rollouts' copy
        evals[step + 1] = evaluate(step + 1, run.synced)
      if run.ckpt.due(step + 1, force=run.stop.requested):
        run.ckpt.save(step + 1, state, _extra(run.it, run.producer), force=True)
      if run.stop.requested:
        print(
          f"{run.stop.reason}: checkpointed step {step + 1} in {workdir}; exiting", file=sys.stderr
        )
        break
    else:
      if start < cfg.train.steps:  # (a rerun with fewer steps than done saves nothing)
        run.ckpt.save(cfg.train.steps, state, _extra(run.it, run.producer), force=True)
    # The policy as a Hugging Face directory and the run's curves (also after a SIGTERM).
    policy = nnx.merge(run.graphdef, state.params)
    hf_dir = os.path.join(workdir, "hf")
    export.export_model(policy, run.tokenizer, hf_dir, source_dir=policy_lib.model_dir(cfg))
    if distributed.is_main():
      if cfg.train.curves:
        plot.plot_if_logged(workdir)  # none with train.steps=0 or metrics.jsonl removed
      if len(evals) > 1:
        print(eval_lib.describe_change(evals), file=sys.stderr)
  finally:
    run.close()


def _extra(it, producer) -> dict:
  """What a checkpoint holds besides the train state: the data iterator's position and, with
  one-step-off rollouts, the next step's rollouts (waited for: they drew from the iterator)."""
  pending = producer.settle()
  extra = {"data": it.state()}
  if pending is not None:
    extra["pending"] = pending.to_json()
  return extra


def _step_metrics(step_metrics, prep_metrics, tapo_metrics, r) -> dict[str, float]:
  """Metrics of the step: means over its updates ("*_max": the max), skipped updates summed."""
  host = [metrics.to_host(m) for m in step_metrics]
  pick = lambda key: np.max if key.endswith("_max") else np.mean  # noqa: E731
  out = {key: float(pick(key)([h[key] for h in host])) for key in host[0]}
  out["skipped"] = float(sum(h["skipped"] for h in host))
  out.update(metrics.to_host(prep_metrics))
  out.update({k_: float(v) for k_, v in tapo_metrics.items()})
  out.update({k_: float(v) for k_, v in r.stats.items() if k_ != "perf/rollout_tokens"})
  lens = np.array([len(c) for c in r.completions])
  out["reward/accuracy"] = float(np.mean(r.rewards > 0.5))
  out["reward/mean"] = float(np.mean(r.rewards))
  out["response/len_mean"] = float(lens.mean())
  out["response/len_max"] = float(lens.max())
  out["response/truncated_frac"] = float(np.mean(r.truncated))
  return out


def _dump_rollouts(workdir, step, problems, tokenizer, batch, eos) -> None:
  """WORKDIR/rollouts/step_N.jsonl: every valid row of the step (originals then constructions)
  as the verifier read it, with its reward (written by process 0)."""
  if not distributed.is_main():
    return
  valid = np.flatnonzero(np.asarray(batch.valid))
  rows = batch_lib.take_rows(batch, valid)
  texts = text_lib.decode_responses(tokenizer, batch_lib.response_ids(rows, eos), eos)
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
