"""The TAPO/GRPO loss: chunked logprobs, PPO-clip, OTS, aggregation, λ = 0 == GRPO, additivity,
and prepare_batch pinned to the values it gave before the typed-batch refactor."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapo_jax import config as config_lib
from tapo_jax.models.logprobs import sequence_logprobs, token_logprobs_and_entropy
from tapo_jax.tapo.batch import Rollouts, TrainBatch
from tapo_jax.tapo.loss import (
  LossConfig,
  ots_weights,
  policy_loss,
  prepare_batch,
  rollout_correction,
  tapo_loss,
)


def make_cfg(**over):
  c = config_lib.base_config()
  c.rollout.max_new_tokens = 8
  c.loss.vocab_chunk = 4
  c.loss.filter_zero_variance = False
  for k, v in over.items():
    section, key = k.split("__") if "__" in k else (None, k)
    (c[section] if section else c)[key] = v
  return LossConfig.from_config(c)


def reference_logprobs(hidden, w, targets):
  logits = jnp.einsum("btd,dv->btv", hidden, w)
  logp = jax.nn.log_softmax(logits, -1)
  lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return lp, -(jnp.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize("chunk", [8, 37, 64])  # V = 37: not divisible, exact, larger than V
def test_chunked_logprobs_and_entropy_match_unchunked_values_and_grads(chunk):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k1, (2, 5, 6))
  w = 2.0 * jax.random.normal(k2, (6, 37))
  targets = jax.random.randint(k3, (2, 5), 0, 37)
  targets = targets.at[0].set(jnp.asarray([30, 29, 31, 36, 0]))  # in the overlapping last chunk
  c_lp, c_ent = jax.random.normal(k4, (2, 2, 5))

  def weighted(fn):  # a scalar that mixes logprobs and entropies with random cotangents
    def f(h, w_):
      a, b = fn(h, w_, targets)
      return jnp.sum(a * c_lp) + jnp.sum(b * c_ent)

    return f

  @jax.jit
  def both(h, w_):
    chunked = lambda *x: token_logprobs_and_entropy(*x, chunk)  # noqa: E731
    return (
      chunked(h, w_, targets),
      reference_logprobs(h, w_, targets),
      jax.grad(weighted(chunked), (0, 1))(h, w_),
      jax.grad(weighted(reference_logprobs), (0, 1))(h, w_),
    )

  (lp, ent), (rlp, rent), g, rg = both(hidden, w)
  np.testing.assert_allclose(lp, rlp, atol=1e-5)
  np.testing.assert_allclose(ent, rent, atol=1e-5)
  for a, b in zip(g, rg, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)


def _all_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_shapes(inner)


def test_no_full_vocabulary_logits_in_forward_or_backward():
  b, t, d, v = 2, 5, 4, 37
  targets = jnp.zeros((b, t), jnp.int32)

  def loss(h, w):
    lp, ent = token_logprobs_and_entropy(h, w, targets, 8)
    return lp.sum() + ent.sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(jnp.ones((b, t, d)), jnp.ones((d, v)))
  shapes = list(_all_shapes(jaxpr.jaxpr))
  assert any(s[-1:] == (8,) and len(s) == 3 for s in shapes)  # chunk logits exist
  assert not [s for s in shapes if len(s) >= 3 and s[-1] == v], "a [.., T, V] array appeared"


def test_sequence_logprobs_alignment():
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(k1, (2, 6, 4))
  w = jax.random.normal(k2, (4, 9))
  tokens = jax.random.randint(k3, (2, 6), 0, 9)
  lp, ent = jax.jit(sequence_logprobs, static_argnums=3)(hidden, w, tokens, 4)
  logp = jax.nn.log_softmax(hidden @ w, -1)
  assert (lp[:, 0] == 0).all() and (ent[:, 0] == 0).all()
  for t in range(1, 6):
    np.testing.assert_allclose(lp[:, t], logp[jnp.arange(2), t - 1, tokens[:, t]], atol=1e-5)


# ----------------------------------------------------------------------------------- batch fixture


class Stub:
  """hidden = tanh(E[tokens] + pos), lm_head = W: a differentiable stand-in for the model."""

  def __init__(self, params):
    self.emb, self.w = params

  def hidden(self, tokens, positions, segment_ids=None):
    return jnp.tanh(self.emb[tokens] + 0.1 * positions[..., None])

  def lm_head(self):
    return self.w


V, D, T = 11, 5, 8


def make_batch(seed=0, n_orig=6, n_cons=3, k=3):
  rng = np.random.default_rng(seed)
  r = n_orig + n_cons
  tokens = rng.integers(0, V, (r, T)).astype(np.int32)
  plen = np.full(r, 2, np.int32)
  rlen = rng.integers(2, T - 2, r).astype(np.int32)
  t = np.arange(T)[None]
  mask = (t >= plen[:, None]) & (t < (plen + rlen)[:, None])
  rewards = np.array([1, 0, 0, 1, 1, 0] + [1, 0, 1], np.float32)[:r]
  q = n_orig // k
  groups = np.concatenate([np.arange(n_orig) // k, q + np.arange(n_cons) % q]).astype(np.int32)
  return Rollouts(
    tokens=jnp.asarray(tokens),
    positions=jnp.asarray(np.broadcast_to(t, (r, T)).astype(np.int32)),
    loss_mask=jnp.asarray(mask),
    sampler_logprobs=jnp.asarray(-rng.random((r, T)).astype(np.float32) * mask),
    from_learner=jnp.asarray(mask),
    prompt_lens=jnp.asarray(plen),
    response_lens=jnp.asarray(rlen),
    truncated=jnp.zeros(r, bool),
    rewards=jnp.asarray(rewards),
    group_ids=jnp.asarray(groups),
    is_constructed=jnp.asarray(np.arange(r) >= n_orig),
    valid=jnp.ones(r, bool),
  )


def old_logprobs(batch, seed=0):
  """A fixed π_old for the rows of `batch`."""
  rng = np.random.default_rng(seed + 100)
  return jnp.asarray(-2.5 + rng.normal(size=batch.tokens.shape).astype(np.float32))


def prepare(batch, cfg):
  prepared, metrics = prepare_batch(batch, cfg)
  return prepared.replace(old_logprobs=old_logprobs(batch)), metrics


def params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (V, D)), jax.random.normal(k2, (D, V)))


def rows(batch, idx):
  return jax.tree.map(lambda x: x[np.asarray(idx)], batch)


def loss_and_grad(p, batch, cfg):
  @jax.jit
  def run(p, batch):
    prepared, _ = prepare(batch, cfg)
    f = lambda p_: tapo_loss(Stub(p_), prepared, cfg)  # noqa: E731
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(p)
    return loss, g, metrics

  return run(p, batch)


def train_batch(**fields) -> TrainBatch:
  """A padded TrainBatch from hand-written fields: [R] ones broadcast to their row's tokens, one
  segment per row."""
  shape = fields["tokens"].shape
  fields = {k: jnp.broadcast_to(v[:, None], shape) if v.ndim == 1 else v for k, v in fields.items()}
  return TrainBatch(segment_ids=jnp.ones(shape, jnp.int32), **fields)


def plain_ppo_clip(lp, old, adv, mask, eps_low=0.2, eps_high=0.28):
  """Per-token PPO-clip in numpy, summed over masked tokens."""
  ratio = np.exp(lp - old)
  obj = np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[:, None])
  return -(obj * mask).sum()


# ------------------------------------------------------------------------------------------ tests


def test_ppo_clip_hand_computed():
  cfg = make_cfg()
  lp = jnp.log(jnp.asarray([[1.0, 1.0, 1.0, 1.0]]))  # log 1 = 0
  old = jnp.log(jnp.asarray([[1.0, 0.5, 1.25, 1.0]]))  # ratios 1, 2, 0.8, 1
  b = train_batch(
    tokens=jnp.zeros((2, 4), jnp.int32),
    positions=jnp.zeros((2, 4), jnp.int32),
    loss_mask=jnp.asarray([[0, 1, 1, 1], [0, 1, 1, 0]], bool),
    advantages=jnp.asarray([2.0, -1.0]),
    loss_scale=jnp.full(2, 1 / 5),
    token_scale=jnp.full(2, 1 / 5),
    is_constructed=jnp.zeros(2, bool),
    old_logprobs=jnp.concatenate([old, old]),
    sampler_logprobs=jnp.zeros((2, 4)),
    sampled=jnp.zeros((2, 4), bool),
    is_scale=jnp.zeros(2),
  )
  loss, m = policy_loss(jnp.concatenate([lp, lp]), jnp.zeros((2, 4)), b, cfg)
  # row 0 (A=2): ratio 2 -> clipped 1.28 -> -2.56; ratio .8 -> min(1.6, 1.6) -> -1.6; 1 -> -2
  # row 1 (A=-1): ratio 2 -> max(2, 1.28) unclipped -> 2; ratio .8 -> clipped .8 -> 0.8 ... min
  # of (-.8, -max(.8, .8)) = -.8 -> loss .8
  expected = (-2.56 - 1.6 - 2.0 + 2.0 + 0.8) / 5
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["loss/clip_frac_orig"], 1 / 5, rtol=1e-6)  # only row 0's ratio 2


def test_ots_weights_hand_values():
  lp = jnp.asarray([-5.0, -1.0, 0.0, -0.1])
  ent = jnp.asarray([0.0, 1.0, 3.0, 0.1])
  np.testing.assert_allclose(
    ots_weights(lp, ent, 0.01, 10.0), [0.01, 1.0, 10.0, 1.0], rtol=1e-6
  )  # exp(-5) = .0067 -> .01, exp(0) = 1, exp(3) = 20 -> 10
  g = jax.grad(lambda x: ots_weights(x, ent, 0.01, 10.0).sum())(lp)
  assert (g == 0).all()  # no gradient through w


def test_lambda_zero_equals_grpo_loss_and_grads():
  batch, p = make_batch(), params()
  l_tapo, g_tapo, m_tapo = loss_and_grad(p, batch, make_cfg(tapo__lam=0.0))
  l_grpo, g_grpo, _ = loss_and_grad(p, batch, make_cfg(algorithm="grpo"))
  l_orig, g_orig, _ = loss_and_grad(p, rows(batch, range(6)), make_cfg(algorithm="grpo"))
  assert abs(float(m_tapo["loss/ref"])) > 1e-4  # the constructions' loss exists; λ = 0 drops it
  np.testing.assert_allclose(l_tapo, l_grpo, rtol=1e-6)
  np.testing.assert_allclose(l_tapo, l_orig, rtol=1e-6)
  leaves = zip(
    jax.tree.leaves(g_tapo), jax.tree.leaves(g_grpo), jax.tree.leaves(g_orig), strict=True
  )
  for a, b, c in leaves:
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_ots_forced_to_one_gives_plain_ppo_clip_on_constructed_rows():
  batch, p = make_batch(), params()
  cfg = make_cfg(tapo__ots_min=1.0, tapo__ots_max=1.0)
  prepared, _ = prepare(batch, cfg)
  lp, ent = sequence_logprobs(
    Stub(p).hidden(batch.tokens, batch.positions), p[1], batch.tokens, cfg.vocab_chunk
  )
  _, m = policy_loss(lp, ent, prepared, cfg)
  cons = np.arange(9) >= 6
  mask = np.asarray(prepared.loss_mask)[cons]
  ref = plain_ppo_clip(
    np.asarray(lp)[cons],
    np.asarray(prepared.old_logprobs)[cons],
    np.asarray(prepared.advantages)[cons][:, 0],
    mask,
  )
  np.testing.assert_allclose(m["loss/ref"], ref / mask.sum(), rtol=1e-5)
  _, m_ots = policy_loss(lp, ent, prepared, make_cfg())
  assert abs(float(m_ots["loss/ref"]) - float(m["loss/ref"])) > 1e-4  # OTS changes it otherwise
  w = np.clip(np.exp(np.asarray(lp + ent)), 0.01, 10)[cons]
  np.testing.assert_allclose(
    m_ots["tapo/ots_weight_mean"], (w * mask).sum() / mask.sum(), rtol=1e-5
  )


def test_micro_batches_add_up_to_the_full_batch():
  batch, p = make_batch(), params()
  cfg = make_cfg(loss__aggregation="seq-mean-token-mean")
  prepared, _ = prepare(batch, cfg)
  f = jax.jit(lambda b: tapo_loss(Stub(p), b, cfg))
  loss, metrics = f(prepared)
  parts = [f(rows(prepared, idx)) for idx in ([0, 4, 7], [1, 2, 3], [5, 6, 8])]
  np.testing.assert_allclose(sum(x[0] for x in parts), loss, rtol=1e-5)
  for key in metrics:
    combine = max if key.endswith("_max") else sum  # the train step's rule (step._combine)
    got = combine(x[1][key] for x in parts)
    np.testing.assert_allclose(got, metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)


def _two_row_batch(loss_mask, constructed=(False, False)):
  r = len(loss_mask)
  return Rollouts(
    tokens=jnp.zeros((r, 6), jnp.int32),
    positions=jnp.zeros((r, 6), jnp.int32),
    loss_mask=jnp.asarray(loss_mask, bool),
    sampler_logprobs=jnp.zeros((r, 6)),
    from_learner=jnp.zeros((r, 6), bool),
    prompt_lens=jnp.ones(r, jnp.int32),
    response_lens=jnp.asarray(np.sum(loss_mask, 1), jnp.int32),
    truncated=jnp.asarray([False, True]),
    rewards=jnp.asarray([1.0, 0.0]),
    group_ids=jnp.zeros(r, jnp.int32),
    is_constructed=jnp.asarray(constructed),
    valid=jnp.ones(r, bool),
  )


@pytest.mark.parametrize(
  "aggregation,expected",
  [
    ("token-mean", (2 * 1 + 4 * 2) / 6),
    ("seq-mean-token-mean", (1 + 2) / 2),
    ("seq-mean-token-sum-norm", (2 * 1 + 4 * 2) / (2 * 8)),
  ],
)
def test_aggregations_hand_computed(aggregation, expected):
  mask = [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]]
  prepared, _ = prepare(_two_row_batch(mask), make_cfg(loss__aggregation=aggregation))
  prepared = prepared.replace(old_logprobs=jnp.zeros((2, 6)))
  # per-token loss 1 on row 0 and 2 on row 1, via A and ratio 1: loss = -A
  prepared = prepared.replace(advantages=jnp.asarray([[-1.0] * 6, [-2.0] * 6]))
  loss, _ = policy_loss(jnp.zeros((2, 6)), jnp.zeros((2, 6)), prepared, make_cfg())
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_prepare_filters_masks_and_penalties():
  batch = make_batch()
  # group 1 (rows 3-5) -> rewards [1, 1, 1]: zero variance
  batch = batch.replace(
    rewards=batch.rewards.at[5].set(1.0), truncated=batch.truncated.at[0].set(True)
  )
  on, m = prepare_batch(batch, make_cfg(loss__filter_zero_variance=True, loss__mask_truncated=True))
  kept = np.asarray(on.loss_mask).any(1)
  np.testing.assert_array_equal(kept, [False, True, True, False, False, False, True, True, True])
  assert float(m["loss/zero_variance_rows"]) == 3
  off, _ = prepare_batch(batch, make_cfg())
  assert np.asarray(off.loss_mask).any(1).all()
  # grpo: constructed rows leave the loss entirely
  g, _ = prepare_batch(batch, make_cfg(algorithm="grpo"))
  assert not np.asarray(g.loss_mask)[6:].any() and not np.asarray(g.advantages)[6:].any()
  # overlong penalty: originals only (lengths 8 = max_new_tokens get -0.5, 6 get -0.25, 4 none)
  lens = jnp.asarray([8, 4, 6, 8, 8, 4, 8, 8, 8], jnp.int32)
  long = batch.replace(response_lens=lens)
  pen, _ = prepare_batch(long, make_cfg(loss__overlong_penalty=0.5, loss__overlong_buffer=4))
  by_hand = np.asarray(batch.rewards) - np.asarray([0.5, 0, 0.25, 0.5, 0.5, 0, 0, 0, 0])
  want, _ = prepare_batch(long.replace(rewards=jnp.asarray(by_hand)), make_cfg())
  np.testing.assert_allclose(pen.advantages, want.advantages, rtol=1e-6)
  plain, _ = prepare_batch(long, make_cfg())
  assert not np.allclose(pen.advantages, plain.advantages)


def test_tapo_loss_with_the_qwen_model_matches_full_logits():
  import tiny
  from flax import nnx

  model = tiny.model(tiny.config("micro", vocab_size=V))
  batch = make_batch()
  cfg = make_cfg()

  @nnx.jit
  def both(model, batch):
    prepared, _ = prepare(batch, cfg)
    loss, _ = tapo_loss(model, prepared, cfg)
    logp = jax.nn.log_softmax(model(batch.tokens, batch.positions), -1)
    lp = jnp.take_along_axis(logp[:, :-1], batch.tokens[:, 1:, None], -1)[..., 0]
    ent = -(jnp.exp(logp) * logp).sum(-1)[:, :-1]
    pad = jnp.zeros((9, 1))
    ref, _ = policy_loss(
      jnp.concatenate([pad, lp], 1), jnp.concatenate([pad, ent], 1), prepared, cfg
    )
    return loss, ref

  loss, ref = both(model, batch)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


# ------------------------------------------------------------------- prepare_batch, pinned values

PINNED = pathlib.Path(__file__).parent / "data" / "prepare_batch_pinned.json"


def pinned_batch():
  """The fixed batch the pinned values were computed on (before the TrainBatch refactor): 2
  queries x K=4 originals, 4 constructions, 2 invalid padding rows; T = 10."""
  rng = np.random.default_rng(7)
  r, t_len = 14, 10
  plen = np.array([3] * 12 + [0] * 2, np.int32)
  rlen = np.array([5, 7, 2, 7, 4, 6, 7, 3, 6, 5, 7, 4, 0, 0], np.int32)
  t = np.arange(t_len)[None]
  mask = (t >= plen[:, None]) & (t < (plen + rlen)[:, None])
  return Rollouts(
    tokens=jnp.asarray(rng.integers(0, 50, (r, t_len)).astype(np.int32)),
    positions=jnp.asarray(np.where(mask | (t < plen[:, None]), t, 0).astype(np.int32)),
    loss_mask=jnp.asarray(mask),
    sampler_logprobs=jnp.asarray((-rng.random((r, t_len)) * mask).astype(np.float32)),
    from_learner=jnp.asarray(mask),
    prompt_lens=jnp.asarray(plen),
    response_lens=jnp.asarray(rlen),
    truncated=jnp.asarray(np.array([0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], bool)),
    rewards=jnp.asarray(np.array([1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0], np.float32)),
    group_ids=jnp.asarray(np.array([0] * 4 + [1] * 4 + [2, 2, 3, 3] + [0, 0], np.int32)),
    is_constructed=jnp.asarray(np.array([0] * 8 + [1] * 4 + [0, 0], bool)),
    valid=jnp.asarray(np.array([1] * 12 + [0, 0], bool)),
  )


@pytest.mark.parametrize("case", sorted(json.loads(PINNED.read_text())))
def test_prepare_batch_reproduces_the_pinned_values(case):
  want = json.loads(PINNED.read_text())[case]
  c = config_lib.base_config()
  c.rollout.max_new_tokens = 7
  c.tapo.ref_baseline = "group"  # the default when the values were pinned
  for key, value in want["config"].items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  got, metrics = prepare_batch(pinned_batch(), LossConfig.from_config(c))
  # per-row values, on every token of the row (the padded layout)
  for field in ("advantages", "loss_scale", "token_scale"):
    x = np.asarray(getattr(got, field))
    assert (x == x[:, :1]).all(), field
  np.testing.assert_allclose(got.advantages[:, 0], want["advantages"], atol=2e-6)
  np.testing.assert_array_equal(np.asarray(got.loss_mask).astype(int), want["loss_mask"])
  np.testing.assert_allclose(got.loss_scale[:, 0], want["loss_scale"], rtol=1e-6)
  np.testing.assert_allclose(got.token_scale[:, 0], want["token_scale"], rtol=1e-6)
  assert set(metrics) == set(want["metrics"])
  for key, value in want["metrics"].items():
    np.testing.assert_allclose(metrics[key], value, atol=2e-6, err_msg=key)


# ---------------------------------------------------------------------------- rollout correction


def _is_batch(constructed=(False, False, True)):
  """3 rows of 5 tokens; row 2 (a construction) has 2 sampled prefix tokens then 2 inserted."""
  mask = jnp.asarray([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], bool)
  sampled = mask & jnp.asarray([[1] * 5, [1] * 5, [1, 1, 1, 0, 0]], bool)
  old = jnp.log(jnp.asarray([[1, 0.5, 0.3, 0.9, 1], [1, 0.2, 0.2, 1, 1], [1, 0.6, 0.6, 0.5, 0.5]]))
  smp = jnp.log(jnp.asarray([[1, 0.1, 0.3, 0.9, 1], [1, 0.8, 0.8, 1, 1], [1, 0.3, 0.6, 1, 1]]))
  return train_batch(
    tokens=jnp.zeros((3, 5), jnp.int32),
    positions=jnp.zeros((3, 5), jnp.int32),
    loss_mask=mask,
    advantages=jnp.asarray([1.0, -1.0, 1.0]),
    loss_scale=jnp.asarray([1 / 5, 1 / 5, 1 / 4]),
    token_scale=jnp.asarray([1 / 5, 1 / 5, 1 / 4]),
    is_constructed=jnp.asarray(constructed),
    old_logprobs=old,
    sampler_logprobs=jnp.where(sampled, smp, 0.0),
    sampled=sampled,
    is_scale=jnp.asarray([1 / 5, 1 / 5, 1 / 2]),
  )


def test_rollout_correction_hand_computed():
  b = _is_batch()
  # u = old / sampler on sampled tokens: row 0 [5, 1, 1], row 1 [.25, .25], row 2 [2, 1]
  rho, m = rollout_correction(b, make_cfg(loss__rollout_is="token-tis", loss__rollout_is_cap=2.0))
  np.testing.assert_allclose(rho[0, 1:4], [2.0, 1.0, 1.0], rtol=1e-6)  # 5 capped at 2
  np.testing.assert_allclose(rho[1, 1:3], [0.25, 0.25], rtol=1e-6)
  np.testing.assert_allclose(rho[2, 1:5], [2.0, 1.0, 1.0, 1.0], rtol=1e-6)  # inserted: 1
  np.testing.assert_allclose(m["rollout_is/orig_ratio_mean"], (5 + 1 + 1 + 0.25 + 0.25) / 5)
  np.testing.assert_allclose(m["rollout_is/orig_ratio_max"], 5.0, rtol=1e-6)
  np.testing.assert_allclose(m["rollout_is/orig_capped_frac"], 1 / 5)
  np.testing.assert_allclose(m["rollout_is/ref_ratio_mean"], 1.5, rtol=1e-6)  # prefix only
  np.testing.assert_allclose(m["rollout_is/ref_ratio_max"], 2.0, rtol=1e-6)
  # seq-mask: geometric means 5^(1/3) = 1.71 (kept), 0.25 (out), sqrt(2) = 1.41 (kept)
  cfg = make_cfg(loss__rollout_is="seq-mask", loss__rollout_is_band=(0.5, 2.0))
  rho, m = rollout_correction(b, cfg)
  assert np.asarray(rho).tolist() == [[1] * 5, [0] * 5, [1] * 5]
  np.testing.assert_allclose(m["rollout_is/orig_masked_frac"], 2 / 5)  # row 1's 2 tokens
  assert float(m["rollout_is/ref_masked_frac"]) == 0.0
  rho, m = rollout_correction(b, make_cfg())  # off: weights 1, ratios still measured
  assert (np.asarray(rho) == 1).all() and float(m["rollout_is/orig_ratio_max"]) == 5.0


def test_rollout_correction_enters_the_loss_as_a_token_weight():
  b = _is_batch()
  lp = b.old_logprobs  # ratio π_θ / π_old = 1: per-token loss -A
  off, _ = policy_loss(lp, jnp.zeros((3, 5)), b, make_cfg(tapo__ots=False))
  tis, _ = policy_loss(
    lp, jnp.zeros((3, 5)), b, make_cfg(tapo__ots=False, loss__rollout_is="token-tis")
  )
  np.testing.assert_allclose(off, -(3 / 5) + (2 / 5) - (4 / 4), rtol=1e-6)
  np.testing.assert_allclose(tis, -(2 + 1 + 1) / 5 + (0.5) / 5 - (2 + 1 + 1 + 1) / 4, rtol=1e-6)


def test_temperature_divides_the_logits():
  batch, p = make_batch(), params()
  cfg = make_cfg(rollout__temperature=0.5)
  prepared, _ = prepare(batch, cfg)
  got = jax.jit(lambda: tapo_loss(Stub(p), prepared, cfg))()
  scaled = (p[0], p[1] / 0.5)
  want = jax.jit(lambda: tapo_loss(Stub(scaled), prepared, make_cfg()))()
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
