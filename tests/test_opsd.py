"""OPSD (tapo_jax/opsd): the chunked divergence against a direct full-vocabulary computation on
padded and packed rows, the teacher's lack of gradient, a zero divergence when the teacher sees
the student's own prompt, privileged-solution choice and teacher prompts, the config keys, and a
2-step run on 8 fake devices that resumes bit-identically."""

import json
import pathlib
import signal
import subprocess
import time
import types

import cli
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx

from tapo_jax import config as config_lib
from tapo_jax import minibatches, opsd, sharding
from tapo_jax.models import logprobs as logprobs_lib
from tapo_jax.opsd import batch as opsd_batch_lib
from tapo_jax.opsd import loss as opsd_loss_lib
from tapo_jax.opsd import teacher as teacher_lib
from tapo_jax.tapo import batch as batch_lib
from tapo_jax.tapo import loss as tapo_loss_lib
from tapo_jax.validate import ConfigError, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
V = 37  # vocabulary: not a multiple of the chunks below, so the last chunk overlaps


def direct_divergence(hs, ws, ht, wt, beta):
  """D_β over the full vocabulary from explicit logits [..., V]; the teacher under stop_gradient."""
  ls = jax.nn.log_softmax(hs @ ws, -1)
  lt = jax.nn.log_softmax(jax.lax.stop_gradient(ht @ wt), -1)
  ps, pt = jnp.exp(ls), jnp.exp(lt)
  if beta == 0.0:
    return (pt * (lt - ls)).sum(-1)
  if beta == 1.0:
    return (ps * (ls - lt)).sum(-1)
  lm = jnp.logaddexp(ls + np.log1p(-beta), lt + np.log(beta))
  return beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)


def _random(n, *shapes, scale=1.0):
  keys = jax.random.split(jax.random.key(n), len(shapes))
  return [scale * jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]


def _cfg(beta=0.5, grpo_coef=0.0, chunk=16, **loss):
  c = config_lib.base_config()
  c.algorithm = "opsd"
  c.loss.vocab_chunk = chunk
  c.loss.filter_zero_variance = False
  c.rollout.max_new_tokens = 8
  c.opsd.beta, c.opsd.grpo_coef = beta, grpo_coef
  for k, v in loss.items():
    c.loss[k] = v
  return c


# ------------------------------------------------------------------- the divergence, by itself


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("chunk", [8, 16, 64])  # V = 37: overlapping last chunk, one chunk
def test_chunked_divergence_matches_full_vocabulary_values_and_gradients(beta, chunk):
  hs, ht, ws, wt = _random(0, (2, 5, 6), (2, 5, 6), (6, V), (6, V))
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, V)
  targets = targets.at[0, :3].set(jnp.array([36, 33, 0]))  # in the overlapping last chunk
  (cot,) = _random(2, (2, 5))

  def chunked(h, w):
    return opsd_loss_lib.token_divergence(h, w, ht, wt, targets, beta, chunk)

  out = jax.jit(chunked)(hs, ws)
  want = direct_divergence(hs, ws, ht, wt, beta)
  np.testing.assert_allclose(out["divergence"], want, rtol=1e-5, atol=1e-5)
  ls, lt = jax.nn.log_softmax(hs @ ws, -1), jax.nn.log_softmax(ht @ wt, -1)
  pick = lambda lp: jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]  # noqa: E731
  np.testing.assert_allclose(out["student_logprob"], pick(ls), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["teacher_logprob"], pick(lt), rtol=1e-5, atol=1e-5)
  agree = (jnp.argmax(hs @ ws, -1) == jnp.argmax(ht @ wt, -1)).astype(jnp.float32)
  np.testing.assert_array_equal(out["agree"], agree)
  g = jax.grad(lambda h, w: jnp.sum(chunked(h, w)["divergence"] * cot), (0, 1))(hs, ws)
  direct = lambda h, w: jnp.sum(direct_divergence(h, w, ht, wt, beta) * cot)  # noqa: E731
  g_want = jax.grad(direct, (0, 1))(hs, ws)
  for a, b in zip(g, g_want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_no_full_vocabulary_array_in_forward_or_backward():
  hs, ht, ws, wt = _random(3, (2, 5, 4), (2, 5, 4), (4, V), (4, V))
  targets = jnp.zeros((2, 5), jnp.int32)

  def loss(h, w):
    return opsd_loss_lib.token_divergence(h, w, ht, wt, targets, 0.5, 8)["divergence"].sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(hs, ws)
  shapes = []

  def walk(jx):
    for eqn in jx.eqns:
      shapes.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for p in eqn.params.values():
        for sub in p if isinstance(p, list | tuple) else [p]:
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jaxpr.jaxpr)
  assert any(len(s) == 3 and s[-1] == 8 for s in shapes)  # chunk logits exist
  assert not [s for s in shapes if len(s) >= 3 and s[-1] == V], "a [.., N, V] array appeared"


def _rows(index_pairs, n_slots):
  """student_index, teacher_index, mask [R, N] from per-row lists of (student col, teacher col)."""
  r = len(index_pairs)
  s = np.zeros((r, n_slots), np.int32)
  t = np.zeros((r, n_slots), np.int32)
  m = np.zeros((r, n_slots), bool)
  for i, pairs in enumerate(index_pairs):
    for n, (a, b) in enumerate(pairs):
      s[i, n], t[i, n], m[i, n] = a, b, True
  return s, t, m


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_distillation_over_padded_and_packed_rows_matches_direct(beta):
  """Row 0: one sequence then padding; row 1: two packed sequences (segments) whose teacher
  versions sit at other offsets. Only the indexed response tokens count, each once."""
  hs, ht, ws, wt = _random(4, (2, 12, 6), (2, 20, 6), (6, V), (6, V))
  pairs = [
    # one sequence: student prompt 3 + response 5 (cols 3-7); teacher prompt 9 (cols 9-13)
    [(2 + j, 8 + j) for j in range(5)],
    # segment A: student prompt 2 + response 4 (cols 2-5), teacher prompt 5 (cols 5-8);
    # segment B: student cols 6-11 (prompt 3, response 3: 9-11), teacher cols 9-19 (prompt 8)
    [(1 + j, 4 + j) for j in range(4)] + [(8 + j, 16 + j) for j in range(3)],
  ]
  s_idx, t_idx, mask = _rows(pairs, 8)
  targets = np.asarray(jax.random.randint(jax.random.key(5), (2, 8), 0, V), np.int32)
  batch = types.SimpleNamespace(
    student_index=jnp.asarray(s_idx), teacher_index=jnp.asarray(t_idx),
    targets=jnp.asarray(targets), distill_mask=jnp.asarray(mask),
    distill_scale=jnp.full((2, 8), 1 / 12, jnp.float32),
  )  # fmt: skip
  cfg = opsd_loss_lib.OpsdConfig.from_config(_cfg(beta=beta, chunk=8))

  def chunked(h, w):
    return opsd_loss_lib.distillation(h, w, ht, wt, batch, cfg)[0]

  def direct(h, w):
    total = 0.0
    for r, row in enumerate(pairs):
      for a, b in row:
        total += direct_divergence(h[r, a], w, ht[r, b], wt, beta)
    return total / 12

  np.testing.assert_allclose(chunked(hs, ws), direct(hs, ws), rtol=1e-5, atol=1e-6)
  g = jax.grad(chunked, (0, 1))(hs, ws)
  g_want = jax.grad(direct, (0, 1))(hs, ws)
  for a, b in zip(g, g_want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Padding and the prompt columns get no gradient; distilled columns do.
  assert not np.any(np.asarray(g[0])[0, 7:])
  assert np.all(np.abs(np.asarray(g[0])[0, 2:7]).sum(-1) > 0)


def test_teacher_gets_no_gradient():
  hs, ht, ws, wt = _random(6, (2, 5, 6), (2, 5, 6), (6, V), (6, V))
  targets = jnp.zeros((2, 5), jnp.int32)

  def f(h_t, w_t):
    return opsd_loss_lib.token_divergence(hs, ws, h_t, w_t, targets, 0.5, 16)["divergence"].sum()

  for g in jax.grad(f, (0, 1))(ht, wt):
    assert not np.any(np.asarray(g))
  # The teacher's forward runs on stop-gradient params: no gradient reaches them through it.
  model = _model()
  graphdef, params = nnx.split(model)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % V

  def teacher_hidden(p):
    return opsd_loss_lib.frozen(nnx.merge(graphdef, p)).hidden(tokens).sum()

  grads = jax.grad(teacher_hidden)(params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(grads))


# ------------------------------------------------------------------------ with the Qwen model


def _model():
  return tiny.model(tiny.config("micro", vocab_size=V))


def _batch(cfg, teacher_prompts=None, width=24, max_len=12):
  """2 queries x K=2 rollouts of random tokens, prepared, with teacher rows (default: prompts of
  their own, longer than the students')."""
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, V, 4)), list(rng.integers(1, V, 3))]
  responses = [list(rng.integers(1, V, n)) for n in (5, 3, 6, 4)]
  rollouts = batch_lib.pack_rollouts(
    prompts, responses, None, samples_per_prompt=2, max_len=max_len, rewards=[1.0, 0.0, 0.0, 1.0]
  )
  train, _ = tapo_loss_lib.prepare_batch(rollouts, tapo_loss_lib.LossConfig.from_config(cfg))
  if teacher_prompts is None:
    teacher_prompts = [list(rng.integers(1, V, 7 + i)) for i in range(4)]
  batch, _ = opsd.with_teacher(
    sharding.to_host(train), rollouts, teacher_prompts, width=width, slots=8
  )
  return batch, prompts


def test_with_teacher_aligns_each_response_token_in_both_rows():
  batch, _ = _batch(_cfg())
  b = jax.tree.map(np.asarray, batch)
  for r in range(4):
    m = b.distill_mask[r]
    assert m.sum() == b.loss_mask[r].sum() == (5, 3, 6, 4)[r]
    # The column after each index holds the target: in the student's row and in the teacher's.
    np.testing.assert_array_equal(b.tokens[r, b.student_index[r, m] + 1], b.targets[r, m])
    np.testing.assert_array_equal(b.teacher_tokens[r, b.teacher_index[r, m] + 1], b.targets[r, m])
    # The teacher's row is its prompt then exactly the student's response.
    n = int(m.sum())
    np.testing.assert_array_equal(b.teacher_tokens[r, 7 + r : 7 + r + n], b.targets[r, :n])
    np.testing.assert_array_equal(b.teacher_positions[r, : 7 + r + n], np.arange(7 + r + n))
    np.testing.assert_array_equal(b.teacher_segment_ids[r], np.arange(24) < 7 + r + n)
  np.testing.assert_allclose(b.distill_scale[b.distill_mask], 1 / 18)
  assert not np.any(b.distill_scale[~b.distill_mask])


def test_divergence_is_zero_when_the_teacher_sees_the_students_prompt():
  cfg = _cfg()
  model = _model()
  _, prompts = _batch(cfg)
  same = [prompts[i // 2] for i in range(4)]
  batch, _ = _batch(cfg, teacher_prompts=same, width=20)  # other padding than the students' 12
  loss_cfg = opsd_loss_lib.OpsdConfig.from_config(cfg)
  graphdef, params = nnx.split(model)

  def f(p):
    return opsd.opsd_loss(nnx.merge(graphdef, p), batch, loss_cfg)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  assert abs(float(loss)) < 1e-8  # float noise of a differently padded forward
  assert float(metrics["opsd/agreement"]) == pytest.approx(1.0)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6
  # ... and not with the teacher's own prompts (this near-uniform random model: ~2e-4).
  other, _ = _batch(cfg)
  assert float(opsd.opsd_loss(model, other, loss_cfg)[0]) > 1e-5


@pytest.mark.parametrize("grpo_coef", [0.0, 0.7])
def test_micro_batches_add_up_to_the_full_batch(grpo_coef):
  cfg = _cfg(grpo_coef=grpo_coef)
  batch, _ = _batch(cfg)
  loss_cfg = opsd_loss_lib.OpsdConfig.from_config(cfg)
  model = _model()
  graphdef, params = nnx.split(model)

  def f(p, b):
    return opsd.opsd_loss(nnx.merge(graphdef, p), b, loss_cfg)[0]

  half = lambda lo: jax.tree.map(lambda x: x[lo : lo + 2], batch)  # noqa: E731
  grad = jax.jit(jax.value_and_grad(f))  # one compile per shape, not op by op
  full, g = grad(params, batch)
  (a, ga), (b, gb) = (grad(params, half(i)) for i in (0, 2))
  np.testing.assert_allclose(a + b, full, rtol=1e-5)
  for x, y, z in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), jax.tree.leaves(g), strict=True):
    np.testing.assert_allclose(x + y, z, rtol=1e-4, atol=1e-7)
  if grpo_coef:  # the GRPO term is there, weighted
    hidden = model.hidden(batch.tokens, batch.positions)
    lp, ent = logprobs_lib.sequence_logprobs(hidden, model.lm_head(), batch.tokens, 16)
    grpo, _ = tapo_loss_lib.policy_loss(lp, ent, batch, loss_cfg.loss)
    head = model.lm_head()
    teacher_hidden = model.hidden(batch.teacher_tokens, batch.teacher_positions)
    distill, _ = opsd_loss_lib.distillation(hidden, head, teacher_hidden, head, batch, loss_cfg)
    np.testing.assert_allclose(full, distill + grpo_coef * grpo, rtol=1e-5)


def _packed(batch, n, m, grpo, key=0):
  """`batch` in the loop's paired layout: n minibatches [M, m, ...] on a 1-device mesh."""
  num_micro = minibatches.micro_batches_bound(batch.num_rows, n, m)
  layout = opsd_batch_lib.layout(
    batch, jax.random.key(key), n=n, m=m, num_micro=num_micro, with_loss_tokens=grpo
  )
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  return minibatches.packed_minibatches(batch, layout, mesh, pack=opsd_batch_lib.pack), layout


def test_pairs_share_rows_and_each_distilled_token_keeps_its_columns():
  batch, _ = _batch(_cfg(), width=32, max_len=20)
  (part,), layout = _packed(batch, 1, 2, grpo=False)
  b = jax.tree.map(np.asarray, part)
  # The 4 sequences (9, 7, 9, 7 student tokens; 12, 11, 15, 14 teacher tokens) fill 2 paired rows
  # of 20 + 32 tokens: (9 + 9, 15 + 12) and (7 + 7, 14 + 11).
  assert layout.micro_batches_used() == 1 and b.tokens.shape == (2, 2, 20)
  assert b.teacher_tokens.shape == (2, 2, 32) and b.distill_mask.shape == (2, 2, 20)
  assert sorted(np.asarray(b.segment_ids).max(axis=-1).ravel().tolist()) == [0, 0, 2, 2]
  for row in zip(*(x.reshape(-1, x.shape[-1]) for x in (
    b.tokens, b.segment_ids, b.teacher_tokens, b.teacher_segment_ids, b.student_index,
    b.teacher_index, b.targets, b.distill_mask,
  )), strict=True):  # fmt: skip
    tok, seg, t_tok, t_seg, s_idx, t_idx, tgt, mask = row
    np.testing.assert_array_equal(tok[s_idx[mask] + 1], tgt[mask])
    np.testing.assert_array_equal(t_tok[t_idx[mask] + 1], tgt[mask])
    # a token and its teacher twin are in the same sequence, in both rows' numbering
    np.testing.assert_array_equal(seg[s_idx[mask]], seg[s_idx[mask] + 1])
    np.testing.assert_array_equal(t_seg[t_idx[mask]], t_seg[t_idx[mask] + 1])
    assert set(seg[seg > 0]) == set(t_seg[t_seg > 0])  # the same sequences in both
  assert b.distill_mask.sum() == 18
  np.testing.assert_allclose(b.distill_scale[b.distill_mask], 1 / 18)
  # Two minibatches: each update has the whole step's weight.
  parts, _ = _packed(batch, 2, 1, grpo=False)
  scales = np.concatenate([np.asarray(p.distill_scale)[np.asarray(p.distill_mask)] for p in parts])
  np.testing.assert_allclose(scales, 2 / 18)


def test_unpack_returns_pi_old_to_the_padded_rows_for_another_epochs_layout():
  """ppo_epochs > 1 with minibatches > 1: π_old, computed on one epoch's packed rows, goes back
  to the padded rows (`Distiller.relayout`) to be packed into the next epoch's layout."""
  batch, _ = _batch(_cfg(), width=32, max_len=20)
  old = np.random.default_rng(1).normal(size=batch.old_logprobs.shape).astype(np.float32)
  batch = batch.replace(old_logprobs=old)
  num_micro = minibatches.micro_batches_bound(batch.num_rows, 2, 1)
  layouts = [
    opsd_batch_lib.layout(
      batch, jax.random.key(k), n=2, m=1, num_micro=num_micro, with_loss_tokens=False
    )
    for k in (0, 3)
  ]
  where = [dict(zip(x.student.source, x.student.row, strict=True)) for x in layouts]
  assert where[0] != where[1]  # other pairs share rows
  packed = opsd_batch_lib.pack(batch, layouts[0])
  back = batch_lib.unpack(packed.old_logprobs, layouts[0].student, batch.num_rows, 20)
  np.testing.assert_array_equal(back, np.where(np.asarray(batch.segment_ids) > 0, old, 0.0))
  again = opsd_batch_lib.pack(batch.replace(old_logprobs=back), layouts[1])
  np.testing.assert_array_equal(
    again.old_logprobs, opsd_batch_lib.pack(batch, layouts[1]).old_logprobs
  )


@pytest.mark.parametrize("grpo_coef, n, m", [(0.0, 1, 2), (0.7, 1, 1), (0.7, 2, 2)])
def test_packed_loss_equals_the_padded_loss(grpo_coef, n, m):
  """The micro-batch losses and gradients of the packed minibatches add up to n x the padded
  batch's (each minibatch carries the whole step's weight), at 1e-5."""
  cfg = _cfg(grpo_coef=grpo_coef)
  batch, _ = _batch(cfg, width=32, max_len=20)  # two sequences a row
  loss_cfg = opsd_loss_lib.OpsdConfig.from_config(cfg)
  graphdef, params = nnx.split(_model())

  def f(p, b):
    return opsd.opsd_loss(nnx.merge(graphdef, p), b, loss_cfg)

  grad = jax.jit(jax.value_and_grad(f, has_aux=True))  # one compile per shape, not op by op
  (want, want_metrics), g_want = grad(params, batch)
  parts, layout = _packed(batch, n, m, grpo=bool(grpo_coef))
  got, g_got, agree = 0.0, jax.tree.map(jnp.zeros_like, params), 0.0
  for part in parts:
    for i in range(part.tokens.shape[0]):
      micro = jax.tree.map(lambda x, i=i: x[i], part)
      (loss, metrics), g = grad(params, micro)
      got, agree = got + loss, agree + metrics["opsd/agreement"]
      g_got = jax.tree.map(jnp.add, g_got, g)
  assert max(np.asarray(p.segment_ids).max() for p in parts) == 2  # packed: two in a row
  np.testing.assert_allclose(got, n * want, rtol=1e-5)
  np.testing.assert_allclose(agree, n * want_metrics["opsd/agreement"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
    np.testing.assert_allclose(a, n * b, rtol=1e-5, atol=1e-6)


def _toy_step(k=8, q=4, seed=0):
  """A toy step's OPSD batch: the smoke config, the arith tokenizer and problems, each query's K
  responses its worked solution cut at a random length (reward 1 when whole)."""
  from tapo_jax.data import Problem
  from tapo_jax.toy import arith

  cfg = _valid()
  tok = arith.make_tokenizer()
  eos = [tok.eos_token_id]
  problems = [
    Problem(f"p{i}", p.problem, p.answer, solution=p.solution)
    for i, p in enumerate(arith.make_problems(q, seed=seed))
  ]
  rng = np.random.default_rng(seed)
  prompts = [tok.encode(p.problem, add_special_tokens=False) for p in problems]
  responses, rewards = [], []
  for p in problems:
    full = tok.encode(p.solution, add_special_tokens=False) + eos
    for _ in range(k):
      cut = int(rng.integers(len(full) // 2, len(full) + 1))
      responses.append(full[:cut]), rewards.append(float(cut == len(full)))
  rollouts = batch_lib.pack_rollouts(
    prompts, responses, None, samples_per_prompt=k, max_len=cfg.tapo.max_len, eos_ids=eos,
    max_new_tokens=cfg.rollout.max_new_tokens, rewards=rewards,
  )  # fmt: skip
  train, prep = tapo_loss_lib.prepare_batch(rollouts, tapo_loss_lib.LossConfig.from_config(cfg))
  distiller = opsd.Distiller(cfg, tok, eos, problems, 256)
  batch, _ = distiller.add_teacher(sharding.to_host(train), prep, rollouts, problems, 0)
  return cfg, distiller, batch


def test_toy_step_pad_fraction_is_grpos_not_the_padded_layouts():
  """perf/pad_fraction as the loop computes it (every slot of the micro-batches used, both
  forwards): the smoke config's step, 32 sequences, 16-row micro-batches of 160 + 192 tokens.
  Measured: OPSD 0.38, GRPO on the student rows alone 0.52, the padded pairs 0.69."""
  cfg, distiller, batch = _toy_step()
  t, u = cfg.tapo.max_len, distiller.width
  m = minibatches.rows_per_micro_batch(config_lib.micro_batch_tokens(cfg, t), t)
  num_micro = minibatches.micro_batches_bound(batch.num_rows, 1, m)
  key = jax.random.key(2)
  pairs = distiller.layout(batch, key, n=1, m=m, num_micro=num_micro)
  trained = np.asarray(batch.distill_mask).any(axis=1)
  lengths = np.asarray(batch.segment_ids).sum(axis=1)
  constructed = np.zeros(batch.num_rows, bool)
  grpo = minibatches.layout_minibatches(lengths, trained, constructed, key, 1, m, t, num_micro)
  real, processed = pairs.tokens()
  assert real == lengths[trained].sum() + np.asarray(batch.teacher_segment_ids)[trained].sum()
  opsd_pad = 1 - real / processed
  grpo_pad = 1 - grpo.tokens()[0] / grpo.tokens()[1]
  # the padded layout: every row a student row of T and a teacher row of U
  padded_pad = 1 - real / (-(-batch.num_rows // m) * m * (t + u))
  assert opsd_pad <= grpo_pad + 0.05, (opsd_pad, grpo_pad, padded_pad)
  assert opsd_pad < padded_pad - 0.25, (opsd_pad, grpo_pad, padded_pad)


# -------------------------------------------------------------- privileged solutions, prompts


def test_choose_solutions_never_picks_the_row_itself():
  rewards = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], np.float32)  # K = 4, 3 queries
  got = teacher_lib.choose_solutions(rewards, 4, [True, False, False], "group", seed=(0, 1))
  ref, none = teacher_lib.REFERENCE, teacher_lib.NONE
  # Query 0: its only correct row falls back to the reference, the others are taught by it.
  np.testing.assert_array_equal(got[:4], [ref, 0, 0, 0])
  # Query 1: two correct rows teach each other; the wrong ones get one of them.
  assert got[4] == 5 and got[5] == 4 and set(got[6:8]) <= {4, 5}
  np.testing.assert_array_equal(got[8:], [none] * 4)  # no correct row, no reference
  only_ref = teacher_lib.choose_solutions(rewards, 4, [True, False, False], "reference", (0, 1))
  np.testing.assert_array_equal(only_ref, [ref] * 4 + [none] * 8)
  # Deterministic in the seed (every process draws the same).
  many = np.ones(16, np.float32)
  a = teacher_lib.choose_solutions(many, 16, [False], "group", seed=(3, 7))
  assert np.array_equal(a, teacher_lib.choose_solutions(many, 16, [False], "group", (3, 7)))
  assert not np.array_equal(a, teacher_lib.choose_solutions(many, 16, [False], "group", (3, 8)))


class _CharTokenizer:
  """One token per character (ids = code points), no chat template."""

  eos_token_id = 0

  def encode(self, text, add_special_tokens=True):
    return [ord(c) for c in text]

  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(i) for i in ids if i)


def test_teacher_prompts_wrap_the_student_template_and_cut_long_solutions():
  from tapo_jax.data import Problem

  prompts = teacher_lib.TeacherPrompts(
    _CharTokenizer(), "{problem}|{solution}", "Q: {problem}!", False, 6, eos_ids=[0]
  )
  assert prompts.overhead() == len("Q: |!")
  problems = [Problem("a", "1+1", "2", solution="1+1=2 so 2"), Problem("b", "2+2", "4")]
  responses = [[ord(c) for c in "2"], [ord(c) for c in "1+1=2"], [], []]
  choice = np.array([1, teacher_lib.REFERENCE, teacher_lib.NONE, teacher_lib.NONE])
  text = lambda ids: "".join(map(chr, ids))  # noqa: E731
  got, metrics = prompts.build(problems, responses, choice, room=[100, 100, 100, 100], k=2)
  assert text(got[0]) == "Q: 1+1|1+1=2!"  # row 1's response
  assert text(got[1]) == "Q: 1+1|1+1=2 !"  # the reference, cut to 6 tokens
  assert got[2] is None and got[3] is None
  assert metrics["opsd/rows_from_group"] == metrics["opsd/rows_from_reference"] == 1
  assert metrics["opsd/rows_without_solution"] == 2 and metrics["opsd/solutions_cut"] == 1
  # A row whose teacher row has less room gets a shorter solution; none at all: no teacher.
  got, metrics = prompts.build(problems, responses, choice, room=[12, 6, 100, 100], k=2)
  assert text(got[0]) == "Q: 1+1|1+1=!" and got[1] is None  # 12 tokens
  assert metrics["opsd/solutions_dropped"] == 1


def test_builtin_teacher_template_has_its_fields():
  assert teacher_lib.template_fields(opsd.TEACHER_TEMPLATE) == ["problem", "solution"]


# --------------------------------------------------------------------------- config, data


def _valid(**over):
  """configs/smoke.py (the arith toy: 256 positions) with algorithm=opsd; SECTION__KEY=value."""
  return cli.config("smoke", algorithm="opsd", **{k.replace("__", "."): v for k, v in over.items()})


@pytest.mark.parametrize(
  "over, match",
  [
    (dict(opsd__beta=1.5), "opsd.beta"),
    (dict(opsd__beta=float("nan")), "opsd.beta"),
    (dict(opsd__grpo_coef=-1.0), "opsd.grpo_coef"),
    (dict(opsd__solution_source="gold"), "opsd.solution_source"),
    (dict(opsd__teacher_template="{problem} {answer}"), "opsd.teacher_template"),
    (dict(opsd__teacher_template="{problem} only"), "no {solution} field"),
    (dict(opsd__max_len=100), "opsd.max_len"),
    (dict(opsd__max_solution_tokens=-1), "opsd.max_solution_tokens"),
    (dict(opsd__max_solution_tokens=200), "an OPSD teacher row.*max_position_embeddings=256"),
    (dict(opsd__max_len=300), "opsd.max_len = 300 = 300 positions > the model's"),
  ],
)
def test_bad_opsd_keys_are_rejected_up_front(over, match):
  with pytest.raises(ConfigError, match=match.replace("{", r"\{").replace("}", r"\}")):
    validate(_valid(**over), 1)


def test_good_opsd_config_and_k_of_one_from_references():
  validate(_valid(), 1)
  with pytest.raises(ConfigError, match="rollout.n"):
    validate(_valid(rollout__n=1), 1)
  validate(_valid(rollout__n=1, opsd__solution_source="reference"), 1)  # the paper's: K = 1


def test_every_layout_reads_an_optional_solution(tmp_path):
  from tapo_jax.data import DataError, load_problems

  path = tmp_path / "p.jsonl"
  rows = [
    {"problem": "1+1", "answer": "2", "solution": " 1+1=2 "},
    {"problem": "2+2", "answer": "4"},
    {"problem": "3+3", "answer": "6", "solution": ""},
  ]
  path.write_text("\n".join(json.dumps(r) for r in rows))
  got = load_problems(path)
  assert [p.solution for p in got] == ["1+1=2", None, None]
  path.write_text(json.dumps({"problem": "1+1", "answer": "2", "solution": 3}))
  with pytest.raises(DataError, match="'solution'"):
    load_problems(path)
  from tapo_jax import toy

  assert toy.train_problems("chain", 0, 2)[0].solution.endswith("}")


def test_study_has_the_opsd_arm():
  from tapo_jax import study

  assert "algorithm=opsd" in study.VARIANTS["opsd"]


# ------------------------------------------------------------------ the CLI on 8 fake devices


def _cmd(workdir, data):
  return cli.command(
    workdir, "--config.algorithm=opsd", f"--config.data.train_path={data}",
    "--config.opsd.grpo_coef=0.5", "--config.opsd.teacher_template={problem}|{solution}",
    "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.optim.minibatches=2",
    "--config.train.steps=2",
  )  # fmt: skip


def _env():
  return cli.env(devices=8)


def _run(workdir, data):
  out = subprocess.run(
    _cmd(workdir, data), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _preempted_after_one_step(workdir, data):
  """The same run, sent SIGTERM as soon as its loop started: it checkpoints step 1 and exits."""
  proc = subprocess.Popen(
    _cmd(workdir, data), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  deadline = time.time() + 900
  while not (workdir / "metrics.jsonl").exists():  # written after the preemption guard is set
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "the run did not start in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=900)
  assert proc.returncode == 0 and "checkpointed step 1" in err, err[-3000:]


def _params(workdir, step):
  import orbax.checkpoint as ocp

  path = pathlib.Path(workdir, "checkpoints", str(step), "state").resolve()
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path)["params"])


@pytest.mark.slow
def test_two_steps_on_eight_devices_and_exact_resume(tmp_path):
  from tapo_jax.toy import arith

  data = tmp_path / "train.jsonl"
  with open(data, "w") as f:  # half the problems carry a worked solution (the reference)
    for i, p in enumerate(arith.make_problems(8, seed=1)):
      row = {"id": f"t{i}", "problem": p.problem, "answer": p.answer}
      f.write(json.dumps(row | ({"solution": p.solution} if i % 2 else {})) + "\n")
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  out = _run(straight, data)
  assert "opsd: teacher rows of" in out.stderr
  _preempted_after_one_step(resumed, data)
  out = _run(resumed, data)
  assert "resumed from" in out.stderr and "at step 1" in out.stderr
  for a, b in zip(_params(straight, 2), _params(resumed, 2), strict=True):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2]
  for r in steps:
    assert r["opsd/rows_privileged"] + r["opsd/rows_without_solution"] == 8
    assert r["opsd/distill_tokens"] > 0 and 0.0 <= r["opsd/agreement"] <= 1.0
    assert 0.0 < r["opsd/divergence"] <= np.log(2) + 1e-6  # JSD (β = 0.5) is at most ln 2
    assert "loss/orig" in r  # the GRPO term (grpo_coef = 0.5) ran too
  assert any(r["update_norm"] > 0 for r in steps)
  assert any(r["opsd/rows_from_group"] > 0 or r["opsd/rows_from_reference"] > 0 for r in steps)


def test_the_recipe_config_is_qwen7b_with_algorithm_opsd():
  import importlib.util

  def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().to_dict()

  tapo, opsd_cfg = load("qwen7b"), load("qwen7b_opsd")
  assert opsd_cfg.pop("algorithm") == "opsd" and tapo.pop("algorithm") == "tapo"
  assert opsd_cfg.pop("opsd")["beta"] == 0.5
  tapo.pop("opsd")
  assert opsd_cfg == tapo  # the same model, data, rollouts, optimizer, mesh and eval
