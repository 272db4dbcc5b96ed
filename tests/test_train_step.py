"""The jitted train step: mesh invariance, micro-batch invariance, NaN skip, SFT masking, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx

from tapo_jax import config as base
from tapo_jax import minibatches, sharding
from tapo_jax.train import sft
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib
from tapo_jax.train.iterator import BatchIterator

CFG = tiny.config("tiny")


def _assert_params_close(a, b, atol):
  """k_bias gets an exactly-zero gradient in theory (softmax is shift-invariant), so its float
  noise is amplified by Adam into arbitrary updates: it is left out of the comparison."""
  fa = jax.tree_util.tree_flatten_with_path(a)[0]
  fb = jax.tree_util.tree_flatten_with_path(b)[0]
  assert len(fa) == len(fb)
  compared = 0
  for (path, x), (_, y) in zip(fa, fb):
    if "k_bias" in jax.tree_util.keystr(path):
      continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, err_msg=str(path))
    compared += 1
  assert compared > 10


def _examples(rows=8, t=12, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(rows):
    n = rng.randint(4, t + 1)
    ids = rng.randint(0, CFG.vocab_size, n).tolist()
    p = rng.randint(1, n)
    out.append((ids, [False] * p + [True] * (n - p)))
  return out


def _padded(examples, t):
  """One right-padded row per example (no positions, no segment ids): the plain layout."""
  tokens = np.zeros((len(examples), t), np.int32)
  mask = np.zeros((len(examples), t), bool)
  for i, (ids, m) in enumerate(examples):
    tokens[i, : len(ids)], mask[i, 1 : len(ids)] = ids, m[1:]
  return {"tokens": tokens, "loss_mask": mask, "denom": np.full(len(examples), mask.sum())}


def _batch(rows=8, t=12, seed=0):
  return _padded(_examples(rows, t, seed), t)


def _run(dims, micro, batch, steps=2, lr=1e-2, loss_fn=None, devices=None, ratio=1.0):
  mesh = sharding.make_mesh(dims, devices)
  model = tiny.model("tiny")
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  oc = base.base_config().optim
  oc.lr, oc.warmup_steps = lr, 0
  tx = state_lib.make_optimizer(oc, 10)
  state, ssh = state_lib.init_state(params, tx, mesh)
  fn = loss_fn or (lambda m, b: sft.sft_loss(m, b, chunk=16))
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(graphdef, tx, fn, ssh, max_update_ratio=ratio)
    out = []
    for _ in range(steps):
      state, m = train_step(state, minibatches.split_micro_batches(batch, micro))
      out.append(jax.device_get(m))
  return state, out


def test_sharded_step_matches_single_device():
  batch = _batch()
  s1, m1 = _run({}, 8, batch, devices=jax.devices()[:1])
  s8, m8 = _run(dict(data=2, fsdp=2, tensor=2), 4, batch)
  assert len(jax.devices()) == 8
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  spec = s8.params["layers"][0]["mlp"]["gate_proj"][...].sharding.spec
  assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  _assert_params_close(s1.params, s8.params, atol=1e-5)


def test_micro_batches_sum_to_full_batch():
  batch = _batch()
  s_full, m_full = _run({}, 8, batch, devices=jax.devices()[:1])
  s_micro, m_micro = _run({}, 2, batch, devices=jax.devices()[:1])
  np.testing.assert_allclose(m_full[0]["loss"], m_micro[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_full[0]["grad_norm"], m_micro[0]["grad_norm"], rtol=1e-5)
  _assert_params_close(s_full.params, s_micro.params, atol=1e-5)


def test_non_finite_loss_skips_update():
  batch = _batch()

  def nan_loss(model, b):
    loss, m = sft.sft_loss(model, b, chunk=16)
    return loss * jnp.nan, m

  mesh_dev = jax.devices()[:1]
  init, _ = _run({}, 8, batch, steps=0, devices=mesh_dev)
  state, ms = _run({}, 8, batch, steps=2, loss_fn=nan_loss, devices=mesh_dev)
  assert int(state.skipped) == 2 and int(state.step) == 0
  assert [int(m["skipped"]) for m in ms] == [1, 1]
  for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(init.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("lr", [float("nan"), 1e6, float("inf")])
def test_non_finite_or_exploding_update_is_skipped(lr):
  batch = _batch()
  dev = jax.devices()[:1]
  init, _ = _run({}, 8, batch, steps=0, devices=dev)
  state, ms = _run({}, 8, batch, steps=2, lr=lr, devices=dev)
  assert [int(m["skipped"]) for m in ms] == [1, 1] and int(state.step) == 0
  for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # without the ratio guard a finite but huge learning rate goes through
  if np.isfinite(lr):
    state, ms = _run({}, 8, batch, steps=1, lr=lr, devices=dev, ratio=0.0)
    assert int(ms[0]["skipped"]) == 0 and float(ms[0]["update_norm"]) > 1e3


def test_minibatches_deal_originals_and_constructions_evenly():
  """24 sequences of 5 tokens (6 constructions, 2 without a loss token) packed 2 to a row of 10
  into 3 minibatches on the mesh: each holds 2 constructions, every trained sequence lands
  once, the loss scale is the step's weight x 3, and the same key deals the same way."""
  from tapo_jax.tapo.batch import TrainBatch

  r, t = 24, 5
  constructed = np.zeros(r, bool)
  constructed[[1, 4, 5, 9, 13, 20]] = True
  trained = np.ones(r, bool)
  trained[[0, 7]] = False
  per_row = lambda x: jnp.broadcast_to(jnp.asarray(x)[:, None], (r, t))  # noqa: E731
  batch = TrainBatch(
    tokens=jnp.arange(r * t, dtype=jnp.int32).reshape(r, t),
    positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (r, t)),
    segment_ids=jnp.ones((r, t), jnp.int32),
    loss_mask=per_row(trained),
    advantages=per_row(np.arange(r, dtype=np.float32)),
    loss_scale=jnp.full((r, t), 0.5),
    token_scale=jnp.ones((r, t)),
    is_constructed=per_row(constructed),
    old_logprobs=jnp.zeros((r, t)),
    sampler_logprobs=jnp.zeros((r, t)),
    sampled=jnp.zeros((r, t), bool),
    is_scale=jnp.zeros((r, t)),
  )
  batch = jax.tree.map(np.asarray, batch)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  deal = lambda: minibatches.layout_minibatches(  # noqa: E731
    np.full(r, t), trained, constructed, jax.random.key(3), 3, 4, 2 * t,
    minibatches.micro_batches_bound(r, 3, 4),
  )  # fmt: skip
  layout = deal()
  parts = minibatches.packed_minibatches(batch, layout, mesh)
  seen = []
  for part in parts:
    assert part.tokens.shape == (3, 4, 2 * t)  # (8 + 1) sequences -> 3 micro-batches of 4 rows
    assert tuple(part.tokens.sharding.spec)[:2] == (None, ("data", "fsdp"))
    tokens, seg = np.asarray(part.tokens), np.asarray(part.segment_ids)
    rows = tokens[seg > 0].reshape(-1, t)[:, 0] // t  # each sequence's first token: its row
    assert constructed[rows].sum() == 2  # 6 constructions over 3 minibatches
    np.testing.assert_array_equal(np.asarray(part.loss_scale)[seg > 0], 1.5)  # x 3
    np.testing.assert_array_equal(np.asarray(part.advantages)[seg > 0].reshape(-1, t)[:, 0], rows)
    seen += rows.tolist()
  assert sorted(seen) == np.flatnonzero(trained).tolist()
  assert (deal().row == layout.row).all() and (deal().source == layout.source).all()


def test_sft_loss_counts_response_tokens_only():
  batch = _batch(rows=4)
  model = tiny.model("tiny", seed=1)
  loss, m = sft.sft_loss(model, jax.tree.map(jnp.asarray, batch), chunk=7)
  logp = jax.nn.log_softmax(model(jnp.asarray(batch["tokens"])), axis=-1)
  toks, mask = batch["tokens"], batch["loss_mask"]
  expected, count = 0.0, 0
  for r in range(toks.shape[0]):
    for t in range(1, toks.shape[1]):
      if mask[r, t]:
        expected -= float(logp[r, t - 1, toks[r, t]])
        count += 1
  assert int(m["tokens"]) == count == mask.sum()
  np.testing.assert_allclose(float(loss), expected / count, rtol=1e-5)
  # Changing a prompt token's *target* (the token itself stays input) cannot change the loss
  # unless it is a response token: flip the loss mask off everywhere -> zero loss.
  off = dict(batch, loss_mask=np.zeros_like(mask))
  zero, _ = sft.sft_loss(model, jax.tree.map(jnp.asarray, off), chunk=7)
  assert float(zero) == 0.0


def test_pack_sft_truncates_packs_and_rounds():
  rows = [([1, 2, 3, 4, 5], [False, False, True, True, True]), ([7, 8], [False, True])]
  assert sft.sft_width(rows, max_len=4) == 4 and sft.sft_width(rows, 300) == 128
  out = sft.pack_sft(rows, width=6, m=1, pad_id=9)
  assert out["tokens"].shape == (2, 1, 6)  # 5 + 2 tokens do not share a row of 6
  np.testing.assert_array_equal(out["tokens"][:, 0], [[1, 2, 3, 4, 5, 9], [7, 8, 9, 9, 9, 9]])
  np.testing.assert_array_equal(out["segment_ids"][:, 0], [[1] * 5 + [0], [1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["positions"][0, 0], [0, 1, 2, 3, 4, 0])
  np.testing.assert_array_equal(out["loss_mask"][0, 0], [0, 0, 1, 1, 1, 0])  # a row per segment
  out = sft.pack_sft(rows, width=8, m=2)
  np.testing.assert_array_equal(out["tokens"][0, 0], [1, 2, 3, 4, 5, 7, 8, 0])
  np.testing.assert_array_equal(out["segment_ids"][0, 0], [1, 1, 1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(out["positions"][0, 0], [0, 1, 2, 3, 4, 0, 1, 0])
  np.testing.assert_array_equal(out["loss_mask"][0, 0], [0, 0, 1, 1, 1, 0, 1, 0])
  assert out["denom"][0, 0] == 4 and not out["tokens"][0, 1].any()
  out = sft.pack_sft(rows, width=4, m=2)  # truncated to the width
  np.testing.assert_array_equal(out["tokens"][0], [[1, 2, 3, 4], [7, 8, 0, 0]])


def test_packed_sft_loss_equals_padded():
  """The packed step (4 rows of 24 holding 12 examples) gives the padded loss and gradients."""
  examples = _examples(rows=12, t=12, seed=4)
  model = tiny.model("tiny", seed=2)
  graphdef, params = nnx.split(model, nnx.Param)
  f = jax.jit(jax.value_and_grad(lambda p, b: sft.sft_loss(nnx.merge(graphdef, p), b, chunk=16)[0]))
  want, want_g = f(params, jax.tree.map(jnp.asarray, _padded(examples, 12)))
  packed = sft.pack_sft(examples, width=24, m=2)
  assert packed["tokens"].shape == (6, 2, 24) and packed["segment_ids"].max() >= 2
  used = [i for i in range(6) if packed["segment_ids"][i].any()]
  assert len(used) < 6  # packing left micro-batches empty
  got, got_g = 0.0, None
  for i in used:
    loss, g = f(params, {k: jnp.asarray(v[i]) for k, v in packed.items()})
    got, got_g = got + loss, g if got_g is None else jax.tree.map(jnp.add, got_g, g)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_iterator_resumes_exactly():
  items = list(range(10))
  a = BatchIterator(items, 4, seed=3)
  first = [a.next() for _ in range(2)]
  saved = a.state()
  rest = [a.next() for _ in range(4)]
  b = BatchIterator(items, 4, seed=3)
  b.restore(saved)
  assert [b.next() for _ in range(4)] == rest
  seen = [x for batch in first + rest for x in batch]
  assert sorted(seen[:10]) == items  # each epoch is a permutation
  with pytest.raises(ValueError, match="data changed"):
    BatchIterator(items[:5], 4).restore(saved)


def test_optimizer_state_is_sharded_like_params():
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  model = tiny.model("tiny")
  _, params = nnx.split(model, nnx.Param)
  psh = sharding.param_shardings(params, mesh)
  tx = state_lib.make_optimizer(base.base_config().optim, 10)
  state, ssh = state_lib.init_state(jax.device_put(params, psh), tx, mesh)
  assert ssh.opt_state[0] == ()  # clip_by_global_norm keeps no state
  assert ssh.opt_state[1][0].count.spec == jax.sharding.PartitionSpec()
  adam = state.opt_state[1][0]
  mu = adam.mu["layers"][0]["mlp"]["down_proj"][...]
  assert mu.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_bf16_compute_keeps_f32_master_weights_and_remat_changes_nothing():
  batch = jax.tree.map(jnp.asarray, _batch(rows=4))
  losses = {}
  for name, kw in {
    "f32": {},
    "f32_remat": dict(remat=True),
    "bf16": dict(dtype=jnp.bfloat16),
  }.items():
    model = tiny.model("tiny", param_dtype=jnp.float32, **kw)
    graphdef, params = nnx.split(model, nnx.Param)
    loss_of = lambda p, g=graphdef: sft.sft_loss(nnx.merge(g, p), batch, chunk=16)[0]  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_of))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    losses[name] = (float(loss), grads)
  assert losses["f32"][0] == pytest.approx(losses["f32_remat"][0], rel=1e-6)
  for a, b in zip(jax.tree.leaves(losses["f32"][1]), jax.tree.leaves(losses["f32_remat"][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # bf16 compute is close to f32 but not identical (it really ran in bf16).
  assert losses["bf16"][0] == pytest.approx(losses["f32"][0], rel=2e-2)
  assert losses["bf16"][0] != losses["f32"][0]


def test_gradients_accumulate_in_float32_in_the_params_sharding():
  """bf16 params and compute on a (data 2, fsdp 4) mesh: the compiled update's micro-batch loop
  carries one float32 accumulator per parameter, at the parameter's per-device shard shape (the
  cross-device sum of each micro-batch's gradient is scattered into it: on CPU XLA writes that
  reduce-scatter as all-reduce + dynamic-slice, GPU and TPU fuse the two)."""
  import re

  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  cfg = tiny.config("wide", vocab_size=64, num_hidden_layers=1)
  model = tiny.model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  tx = state_lib.make_optimizer(base.base_config().optim, 10)
  state, ssh = state_lib.init_state(params, tx, mesh)
  rng = np.random.default_rng(0)
  batch = {
    "tokens": rng.integers(0, 64, (2, 8, 32)).astype(np.int32),
    "loss_mask": np.ones((2, 8, 32), bool),
    "denom": np.full((2, 8), 2 * 8 * 32),
  }
  batch = sharding.put_global(batch, sharding.batch_shardings(batch, mesh, row_axis=1))
  with jax.set_mesh(mesh):
    fn = step_lib.make_train_step(graphdef, tx, lambda m, b: sft.sft_loss(m, b, 64), ssh)
    hlo = fn.lower(state, batch).compile().as_text()
  loops = [line for line in hlo.splitlines() if re.match(r"\s*%while[.\d]* = \(", line)]
  carried = set()
  for line in loops:
    carried |= set(re.findall(r"(f32|bf16)\[([\d,]*)\]", line.split(" while(")[0]))
  shards = {
    ",".join(map(str, x.sharding.shard_shape(x.shape)))
    for x in jax.tree.leaves(params)
    if x.ndim and x.sharding.shard_shape(x.shape) != x.shape
  }
  assert len(shards) >= 5
  for shape in shards:
    assert ("f32", shape) in carried, shape  # a float32 accumulator of the shard
  new_state, _ = fn(state, batch)  # and the update still runs, params in their dtype
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new_state.params))


def test_old_logprobs_of_a_remat_model_compile_and_equal_the_plain_model():
  """π_old is forward only: a model built with remat=True (configs/qwen7b.py) must not fail
  under the skip-empty-micro-batch cond (flax: Param mutated from another trace level)."""
  import flax.struct

  @flax.struct.dataclass
  class Rows:
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array

  rows = Rows(
    tokens=jnp.arange(32, dtype=jnp.int32).reshape(1, 2, 16) % 96,
    positions=jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, 2, 16)),
    segment_ids=jnp.ones((1, 2, 16), jnp.int32),
  )
  out = []
  for remat in (True, False):
    graphdef, params = nnx.split(tiny.model("tiny", remat=remat), nnx.Param)
    out.append(np.asarray(step_lib.make_old_logprobs(graphdef, 32)(params, rows)))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
