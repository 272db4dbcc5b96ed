"""Packed rows: first-fit decreasing, layouts, the minibatch dealing, and a packed step that
trains exactly like the padded one (loss, every metric, gradients, π_old, the update)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax import config as config_lib
from tapo_jax import minibatches, sharding
from tapo_jax.models.logprobs import logprobs
from tapo_jax.tapo import batch as batch_lib
from tapo_jax.tapo.batch import Rollouts
from tapo_jax.tapo.loss import LossConfig, prepare_batch, tapo_loss
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib

# ----------------------------------------------------------------------------------- pack_rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=0, max_size=40), st.integers(20, 50))
def test_pack_rows_places_every_sequence_without_overlap(lengths, width):
  row, start, used = batch_lib.pack_rows(lengths, width)
  assert used <= len(lengths)
  cover = np.zeros((used, width), int)
  for r, c, n in zip(row, start, lengths):
    assert 0 <= c and c + n <= width
    cover[r, c : c + n] += 1
  assert cover.max(initial=0) <= 1 and cover.sum() == sum(lengths)
  # first-fit decreasing: no two rows could be merged, and it never needs more than 2x optimal
  fill = cover.sum(axis=1)
  if used > 1:
    assert np.sort(fill)[:2].sum() > width
  assert used <= 2 * -(-sum(lengths) // width) or used <= 1


def test_pack_rows_fills_rows_in_column_order_and_rejects_overlong():
  row, start, used = batch_lib.pack_rows([3, 5, 2, 5], 8)
  assert used == 2
  assert list(zip(row, start)) == [(0, 5), (0, 0), (1, 5), (1, 0)]  # 5+3 | 5+2
  with pytest.raises(ValueError, match="does not fit"):
    batch_lib.pack_rows([9], 8)


def test_layout_segment_ids_and_token_counts():
  lay = batch_lib.Layout(
    source=np.array([4, 0, 2]), row=np.array([0, 0, 3]), start=np.array([3, 0, 0]),
    length=np.array([2, 3, 4]), shape=(1, 2, 2, 6),
  )  # fmt: skip
  seg = lay.segment_ids().reshape(4, 6)
  np.testing.assert_array_equal(seg[0], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(seg[3], [1, 1, 1, 1, 0, 0])
  assert not seg[1:3].any()
  assert lay.micro_batches_used() == 2 and lay.tokens() == (9, 2 * 2 * 6)
  idx = lay.index(lay.source * 10).reshape(4, 6)
  np.testing.assert_array_equal(idx[0], [0, 1, 2, 40, 41, -1])
  assert lay.locate(4) == (0, 3) and lay.locate(2) == (3, 0)


def test_deal_splits_originals_and_constructions_evenly_and_keeps_only_trained():
  constructed = np.zeros(24, bool)
  constructed[[1, 4, 5, 9, 13, 20]] = True
  keep = np.ones(24, bool)
  keep[[0, 5]] = False
  parts = minibatches.deal(constructed, jax.random.key(3), 3, keep=keep)
  assert sorted(np.concatenate(parts).tolist()) == sorted(np.flatnonzero(keep).tolist())
  for p in parts:
    assert constructed[p].sum() in (1, 2) and (~constructed[p]).sum() in (5, 6)  # 5 / 3, 17 / 3
  again = minibatches.deal(constructed, jax.random.key(3), 3, keep=keep)
  assert all((a == b).all() for a, b in zip(parts, again))
  assert minibatches.micro_batches_bound(24, 3, 2) == 5  # (8 + 1) rows -> 5 micro-batches of 2


# ------------------------------------------------------------------------ a step, padded vs packed

QCFG = tiny.config("packed")
T = 40
Q, K, M_MAX = 3, 4, 2


def step_rollouts(seed=0) -> Rollouts:
  """Q=3 queries x K=4 originals and Q x 2 constructions in rows of T=40: prompts of 3-7 tokens,
  responses of 1-30 (two truncated), query 1's originals all correct (a zero-variance group),
  constructions with a sampled prefix then inserted tokens, one construction not built."""
  rng = np.random.default_rng(seed)
  r = Q * K + Q * M_MAX
  plen = rng.integers(3, 8, r)
  rlen = np.concatenate([[1, 30, 7, 12], rng.integers(2, 20, r - 4)])
  rlen = np.minimum(rlen, T - plen)
  valid = np.ones(r, bool)
  valid[Q * K + 3] = False
  rlen[~valid] = 0
  t = np.arange(T)[None]
  resp = (t >= plen[:, None]) & (t < (plen + rlen)[:, None])
  real = t < (plen + rlen)[:, None]
  constructed = np.arange(r) >= Q * K
  prefix = plen + rlen // 2  # constructions: the learner sampled their first half
  from_learner = resp & (~constructed[:, None] | (t < prefix[:, None]))
  rewards = np.concatenate([[1, 0, 0, 1], [1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 1, 1, 0, 1]])
  return Rollouts(
    tokens=jnp.asarray(np.where(real, rng.integers(1, QCFG.vocab_size, (r, T)), 0), jnp.int32),
    positions=jnp.asarray(np.where(real, t, 0), jnp.int32),
    loss_mask=jnp.asarray(resp),
    sampler_logprobs=jnp.asarray(np.where(from_learner, -rng.random((r, T)) * 3, 0), jnp.float32),
    from_learner=jnp.asarray(from_learner),
    prompt_lens=jnp.asarray(plen, jnp.int32),
    response_lens=jnp.asarray(rlen, jnp.int32),
    truncated=jnp.asarray(np.isin(np.arange(r), [1, 9])),
    rewards=jnp.asarray(rewards, jnp.float32),
    group_ids=jnp.asarray(np.concatenate([np.arange(Q * K) // K, Q + np.arange(Q * M_MAX) // 2])),
    is_constructed=jnp.asarray(constructed),
    valid=jnp.asarray(valid),
  )


def loss_config(**over) -> LossConfig:
  c = config_lib.base_config()
  c.rollout.max_new_tokens = 24
  c.loss.vocab_chunk = 16
  c.tapo.ref_baseline = "group"
  c.loss.rollout_is_band = (0.8, 1.25)
  for key, value in over.items():
    section, name = key.split(".")
    c[section][name] = value
  return LossConfig.from_config(c)


@functools.cache
def model_and_params():
  model = tiny.model("packed")
  return nnx.split(model, nnx.Param)


def prepared_step(cfg: LossConfig):
  """The step's padded TrainBatch (host arrays) with a π_old near the model's own (noise of
  0.3 nats on each token: ratios cross the clip range) and sampler logprobs near π_old (0.05
  nats, and every third sequence 0.6 nats off: outside the IS band)."""
  graphdef, params = model_and_params()
  train, _ = prepare_batch(step_rollouts(), cfg)
  lp = logprobs(nnx.merge(graphdef, params), train.tokens, train.positions, 16)
  k1, k2 = jax.random.split(jax.random.key(7))
  old = lp + 0.3 * jax.random.normal(k1, lp.shape)
  shift = jnp.where(jnp.arange(lp.shape[0]) % 3 == 0, 0.6, 0.0)[:, None]
  sampler = old + shift + 0.05 * jax.random.normal(k2, lp.shape)
  train = train.replace(old_logprobs=old, sampler_logprobs=jnp.where(train.sampled, sampler, 0.0))
  return sharding.to_host(train)


def layout_of(train, m: int, key=0, n: int = 1):
  lengths = train.segment_ids.sum(axis=1)
  trained, constructed = train.loss_mask.any(axis=1), train.is_constructed[:, 0]
  bound = minibatches.micro_batches_bound(train.num_rows, n, m)
  return minibatches.layout_minibatches(
    lengths, trained, constructed, jax.random.key(key), n, m, T, bound
  )


def _loss_grads(cfg):
  graphdef, _ = model_and_params()

  @jax.jit
  def f(params, batch):
    return jax.value_and_grad(
      lambda p: tapo_loss(nnx.merge(graphdef, p), batch, cfg), has_aux=True
    )(params)

  return f


def _assert_close(got, want, what, rtol=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


CASES = [
  dict(aggregation="token-mean", rollout_is="off"),
  dict(aggregation="seq-mean-token-mean", rollout_is="token-tis"),
  dict(aggregation="seq-mean-token-sum-norm", rollout_is="seq-mask"),
  dict(aggregation="token-mean", rollout_is="seq-mask", mask_truncated=True),
  dict(aggregation="seq-mean-token-mean", rollout_is="off", overlong_penalty=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_packed_step_equals_padded_step(case):
  """Loss, every metric (summed over micro-batches, `_max` by max) and the gradients of the
  packed micro-batches equal the padded batch's in one piece, to 1e-5 relative."""
  cfg = loss_config(**{f"loss.{k}": v for k, v in case.items()})
  train = prepared_step(cfg)
  graphdef, params = model_and_params()
  f = _loss_grads(cfg)
  (want_loss, want_metrics), want_grads = f(params, jax.tree.map(jnp.asarray, train))

  layout = layout_of(train, m=2)
  packed = batch_lib.pack(train, layout)
  micro = [
    jax.tree.map(lambda x, i=i: jnp.asarray(x[0, i]), packed) for i in range(layout.shape[1])
  ]
  used = [b for b in micro if bool(b.loss_mask.any())]
  assert 1 < len(used) < len(micro)  # several micro-batches, and empty ones left at the end
  assert layout.length.size == int(np.asarray(train.loss_mask).any(axis=1).sum())
  assert np.asarray(packed.segment_ids).max() >= 3  # rows really hold several sequences
  loss, grads, metrics = 0.0, None, {}
  for b in used:
    (l_, m_), g = f(params, b)
    loss += float(l_)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    for key, v in m_.items():
      combine = max if key.endswith("_max") else lambda a, b_: a + b_
      metrics[key] = combine(metrics[key], float(v)) if key in metrics else float(v)

  _assert_close(loss, want_loss, "loss")
  assert abs(float(want_loss)) > 1e-3
  assert set(metrics) == set(want_metrics)
  for key in want_metrics:
    _assert_close(metrics[key], want_metrics[key], key)
  if case["rollout_is"] == "seq-mask":
    assert want_metrics["rollout_is/orig_masked_frac"] > 0  # the band really masks sequences
  flat, want_flat = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
  assert len(flat) == len(want_flat) > 10
  for path, (g, w) in zip(
    jax.tree_util.tree_flatten_with_path(want_grads)[0], zip(flat, want_flat)
  ):
    _assert_close(g, w, jax.tree_util.keystr(path[0]))


def test_packed_pi_old_equals_padded_logprobs():
  """π_old computed on the packed minibatch (empty micro-batches skipped) equals the padded
  rows' logprobs on every loss token, and is 0 on padding."""
  cfg = loss_config()
  train = prepared_step(cfg)
  graphdef, params = model_and_params()
  layout = layout_of(train, m=2)
  packed = jax.tree.map(lambda x: jnp.asarray(x[0]), batch_lib.pack(train, layout))
  old = step_lib.make_old_logprobs(graphdef, 16)(params, packed)
  want = logprobs(nnx.merge(graphdef, params), jnp.asarray(train.tokens), train.positions, 16)
  want = batch_lib.pack(train.replace(old_logprobs=np.asarray(want)), layout).old_logprobs[0]
  mask = np.asarray(packed.loss_mask)
  _assert_close(np.asarray(old)[mask], np.asarray(want)[mask], "pi_old")
  assert not np.asarray(old)[np.asarray(packed.segment_ids) == 0].any()


def _update(train_parts, cfg, mesh, graphdef, params):
  oc = config_lib.base_config().optim
  oc.lr, oc.warmup_steps = 1e-2, 0
  tx = state_lib.make_optimizer(oc, 10)
  params = jax.tree.map(jnp.copy, params)  # the update donates them
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  state, ssh = state_lib.init_state(params, tx, mesh)
  loss_fn = functools.partial(tapo_loss, cfg=cfg)
  with jax.set_mesh(mesh):
    step = step_lib.make_train_step(graphdef, tx, loss_fn, ssh, max_update_ratio=0.0)
    for part in train_parts:
      state, metrics = step(state, part)
  return state, jax.device_get(metrics)


def test_packed_update_on_a_mesh_equals_the_padded_update():
  """The jitted update of packed minibatches on a (data 2, fsdp 2, tensor 2) mesh, dealt into 2
  minibatches and dealt again (gathered on the mesh), matches the padded update on one device
  with the same minibatches: metrics and the params after two updates."""
  cfg = loss_config(**{"loss.aggregation": "seq-mean-token-mean", "loss.rollout_is": "token-tis"})
  train = prepared_step(cfg)
  graphdef, params = model_and_params()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  first = layout_of(train, m=4, key=1, n=2)
  parts = minibatches.packed_minibatches(train, first, mesh)
  second = layout_of(train, m=4, key=2, n=2)
  moved = minibatches.make_relayout(mesh)(parts, second, first)
  for got, want in zip(moved, minibatches.packed_minibatches(train, second, mesh)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert tuple(moved[0].tokens.sharding.spec)[:2] == (None, ("data", "fsdp"))

  one = sharding.make_mesh({}, jax.devices()[:1])
  padded = []  # the same two minibatches, one padded row per sequence, in one micro-batch each
  for i in range(2):
    src = second.source[second.row // (second.shape[1] * second.shape[2]) == i]
    part = jax.tree.map(lambda x, s=src: x[np.sort(s)][None], train)
    padded.append(jax.tree.map(jnp.asarray, part.replace(loss_scale=part.loss_scale * 2)))
  s_packed, m_packed = _update(moved, cfg, mesh, graphdef, params)
  s_padded, m_padded = _update(padded, cfg, one, graphdef, params)
  for key in ("loss", "grad_norm", "update_norm", "loss/ref", "rollout_is/orig_ratio_mean"):
    _assert_close(m_packed[key], m_padded[key], key)
  # (k_bias's gradient is 0 in exact arithmetic, softmax being shift-invariant: Adam turns its
  # float noise into arbitrary updates, so it is left out, as in test_train_step)
  leaves = jax.tree_util.tree_flatten_with_path(s_padded.params)[0]
  for (path, b), a in zip(leaves, jax.tree.leaves(s_packed.params), strict=True):
    if "k_bias" not in jax.tree_util.keystr(path):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, err_msg=str(path))
