"""Blockwise and splash attention against the plain XLA path: forward, gradients, cache, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.models import attention
from tapo_jax.sharding import make_mesh

TOL = 2e-5


def _qkv(b, t, n, k, h, s=None, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  s = s or t
  arr = lambda *shape: jnp.asarray(r.standard_normal(shape), dtype)  # noqa: E731
  return arr(b, t, n, h), arr(b, s, k, h), arr(b, s, k, h), arr(b, t, n, h)


def _plain(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5)


def _blockwise(bq, bk):
  def f(q, k, v):
    b, t = q.shape[:2]
    qpos = jnp.broadcast_to(jnp.arange(t), (b, t))
    k_BKSH, v_BKSH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scale = q.shape[-1] ** -0.5
    return attention.blockwise_attention(
      q, k_BKSH, v_BKSH, qpos, scale=scale, block_q=bq, block_k=bk
    )

  return f


def _grads(f, q, k, v, w):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)


def _maxdiff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# (T, block_q, block_k, N, K): several blocks, T not a multiple of either block, unequal blocks,
# GQA ratios 3 and 4, plain MHA with one block holding everything.
CASES = [(37, 8, 16, 6, 2), (64, 32, 8, 4, 1), (20, 64, 64, 4, 4)]


@pytest.mark.parametrize("t,bq,bk,n,kh", CASES)
def test_blockwise_equals_plain_forward_and_gradients(t, bq, bk, n, kh):
  q, k, v, w = _qkv(2, t, n, kh, 16)
  f = jax.jit(_blockwise(bq, bk))
  assert _maxdiff(f(q, k, v), _plain(q, k, v)) <= TOL
  diff = _maxdiff(_grads(f, q, k, v, w), _grads(_plain, q, k, v, w))
  print(f"T={t} blocks=({bq},{bk}) N={n} K={kh}: max |grad diff| = {diff:.1e}")
  assert diff <= TOL


def test_blockwise_bfloat16_close_to_float32_reference():
  q, k, v, _ = _qkv(2, 48, 4, 2, 32, dtype=jnp.bfloat16)
  ref = _plain(*(x.astype(jnp.float32) for x in (q, k, v)))
  out = jax.jit(_blockwise(16, 16))(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 2e-2


def test_blockwise_over_a_cache_follows_positions():
  """Queries at arbitrary positions over S > T cache slots see exactly the slots s <= position."""
  b, t, s, n, kh, h = 3, 5, 40, 4, 2, 8
  q, _, _, _ = _qkv(b, t, n, kh, h, seed=1)
  _, k, v, _ = _qkv(b, s, n, kh, h, seed=2)
  pos = jnp.asarray([[0, 1, 2, 3, 4], [17, 18, 19, 20, 21], [35, 36, 37, 38, 39]], jnp.int32)
  k_BKSH, v_BKSH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = attention.blockwise_attention(q, k_BKSH, v_BKSH, pos, scale=0.3, block_q=2, block_k=8)
  mask = jnp.arange(s)[None, None, :] <= pos[:, :, None]  # [B, T, S]
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=0.3)
  assert _maxdiff(out, ref) <= TOL


def test_blockwise_never_holds_the_score_matrix():
  """Compiled forward + backward at T=8192: XLA's temp bytes vs one [B, N, T, T] f32 array."""
  b, t, n, kh, h = 1, 8192, 8, 2, 64
  sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  args = (sd(b, t, n, h), sd(b, t, kh, h), sd(b, t, kh, h))
  scores = b * n * t * t * 4

  def temp(f):
    g = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)))
    return g.lower(*args).compile().memory_analysis().temp_size_in_bytes

  plain, blockwise = temp(_plain), temp(_blockwise(512, 512))
  print(f"temp bytes: plain {plain / 2**20:.0f} MiB, blockwise {blockwise / 2**20:.0f} MiB, "
        f"one score matrix {scores / 2**20:.0f} MiB")  # fmt: skip
  assert plain >= scores
  assert blockwise < scores / 20


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    tiny.model("tiny", attention_impl="flash")


# ---- through the model -------------------------------------------------------------------------

CFG = tiny.config("hf", num_hidden_layers=1, head_dim=16)


def _model(impl, remat=False):
  return tiny.model(CFG, remat=remat, attention_impl=impl)


def _loss_and_grads(model, tokens, mask):
  def loss(params):
    m = nnx.merge(nnx.graphdef(model), params)
    logp = jax.nn.log_softmax(m(tokens)[:, :-1])
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return -jnp.sum(picked * mask[:, 1:])

  return jax.jit(jax.value_and_grad(loss))(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_model_logits_and_gradients_match_plain(impl, monkeypatch):
  """Right-padded rows (one all padding), loss on real tokens only; blockwise under remat (its
  custom backward inside a checkpoint). Splash is forced on (its Pallas kernel in interpret mode
  on CPU)."""
  monkeypatch.setattr(attention, "splash_applies", lambda head_dim: True)
  r = np.random.default_rng(0)
  t = 40
  tokens = jnp.asarray(r.integers(1, 97, (3, t)), jnp.int32)
  lengths = np.array([t, 23, 0])
  mask = jnp.asarray(np.arange(t)[None] < lengths[:, None], jnp.float32)
  tokens = jnp.where(mask > 0, tokens, 0)
  ref_loss, ref_grads = _loss_and_grads(_model(""), tokens, mask)
  loss, grads = _loss_and_grads(_model(impl, remat=impl == "blockwise"), tokens, mask)
  grad_diff = _maxdiff(grads, ref_grads)
  print(f"{impl}: loss {abs(loss - ref_loss):.1e}, grads {grad_diff:.1e}")
  assert abs(float(loss - ref_loss)) <= 1e-4 * abs(float(ref_loss)) and grad_diff <= 1e-4


def test_prefill_over_cache_matches_plain():
  """decode() with T > 1 (the engine's prefill) and then one token: logits and cache agree."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 9)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))

  @nnx.jit
  def run(m):
    logits, cache = m.decode(tokens, pos, m.init_cache(2, 16))
    step, cache = m.decode(tokens[:, :1], jnp.full((2, 1), 9), cache)
    return logits, step, cache

  outs = {impl: run(_model(impl)) for impl in ("", "blockwise")}
  assert _maxdiff(outs["blockwise"], outs[""]) <= 1e-5


@pytest.mark.parametrize("kh", [2, 1])
def test_sharded_memory_efficient_paths_match_plain(kh):
  """On a (data 2, fsdp 2, tensor 2) mesh: kv-heads split over tensor (K=2) or not (K=1, so
  splash gives each q-head its own kv-head)."""
  q, k, v, w = _qkv(4, 40, 4, kh, 16)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  scale = 16**-0.5
  fns = {
    "": jax.jit(_plain),
    "blockwise": jax.jit(
      lambda q, k, v: attention.causal_attention(q, k, v, scale=scale, impl="blockwise")
    ),
    "splash": jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, scale=scale)),
  }
  with jax.set_mesh(mesh):
    put = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))  # noqa: E731
    q = put(q, jax.P(("data", "fsdp"), None, "tensor"))
    k, v = (put(x, jax.P(("data", "fsdp"), None, "tensor" if kh == 2 else None)) for x in (k, v))
    outs = {impl: (f(q, k, v), _grads(f, q, k, v, w)) for impl, f in fns.items()}
  for impl in ("blockwise", "splash"):
    assert _maxdiff(outs[impl], outs[""]) <= TOL, impl


# ---- packed rows: segment ids ------------------------------------------------------------------


def _segments(lengths_per_row, t):
  """[B, T] int32 segment ids: 1, 2, ... for the given lengths in each row, 0 after them."""
  seg = np.zeros((len(lengths_per_row), t), np.int32)
  for b, lengths in enumerate(lengths_per_row):
    at = 0
    for i, n in enumerate(lengths):
      seg[b, at : at + n] = i + 1
      at += n
  return jnp.asarray(seg)


def _per_sequence(seg, scale):
  """f(q, k, v): each segment (padding included) attended on its own through the XLA path, put
  back in place (the reference; segments from host ids, so it is differentiable)."""
  ids = np.asarray(seg)

  def f(q, k, v):
    rows = []
    for b in range(ids.shape[0]):
      out = jnp.zeros_like(q[b : b + 1])
      for s in np.unique(ids[b]):
        idx = np.flatnonzero(ids[b] == s)
        x = (q[b : b + 1, idx], k[b : b + 1, idx], v[b : b + 1, idx])
        out = out.at[:, idx].set(jax.nn.dot_product_attention(*x, is_causal=True, scale=scale))
      rows.append(out)
    return jnp.concatenate(rows)

  return f


def _blockwise_packed(q, k, v, seg, scale):
  b, t = seg.shape
  qpos = jnp.broadcast_to(jnp.arange(t), (b, t))
  k_BKSH, v_BKSH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return attention.blockwise_attention(
    q, k_BKSH, v_BKSH, qpos, scale=scale, block_q=8, block_k=16, segment_ids_BT=seg
  )


# impl -> f(q, k, v, segment_ids, scale): every uncached attention_impl on packed rows (splash in
# interpret mode off TPU; cuDNN where there is a GPU)
SEGMENT_IMPLS = {
  "xla": lambda q, k, v, seg, scale: attention.causal_attention(
    q, k, v, scale=scale, impl="", segment_ids_BT=seg
  ),
  "blockwise": _blockwise_packed,
  "splash": lambda q, k, v, seg, scale: attention.splash_attention(
    q, k, v, scale=scale, segment_ids_BT=seg
  ),
  "cudnn": lambda q, k, v, seg, scale: attention.causal_attention(
    *(x.astype(jnp.bfloat16) for x in (q, k, v)), scale=scale, impl="cudnn", segment_ids_BT=seg
  ).astype(jnp.float32),
}


@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash", "cudnn"])
def test_segment_masked_attention_equals_per_sequence_attention(impl):
  """Rows packed with sequences of 1..17 tokens (a block boundary inside a segment, segments
  ending mid-block, one row a single sequence, trailing padding), GQA 3: forward and gradients
  equal to attending each sequence alone (cuDNN in bf16, on a GPU only)."""
  if impl == "cudnn" and jax.default_backend() != "gpu":
    pytest.skip("cuDNN needs an NVIDIA GPU")
  t, n, kh, h = 40, 6, 2, 16
  seg = _segments([[7, 13, 1, 12], [40], [3, 17, 5]], t)
  q, k, v, w = _qkv(3, t, n, kh, h, seed=3)
  scale, tol = h**-0.5, (3e-2 if impl == "cudnn" else TOL)
  f = functools.partial(SEGMENT_IMPLS[impl], seg=seg, scale=scale)
  ref = _per_sequence(seg, scale)
  assert _maxdiff(jax.jit(f)(q, k, v), jax.jit(ref)(q, k, v)) <= tol
  diff = _maxdiff(_grads(f, q, k, v, w), _grads(ref, q, k, v, w))
  print(f"{impl}: max |grad diff| = {diff:.1e}")
  assert diff <= tol


PROPERTY_T = 80  # room for 6 sequences of 12 and padding
PROPERTY_IMPLS = {
  name: jax.jit(functools.partial(SEGMENT_IMPLS[name], scale=0.3)) for name in ("xla", "blockwise")
}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=6), st.data())
def test_no_sequence_attends_across_a_segment_boundary(lengths, data):
  """Changing one segment's queries, keys and values changes no other segment's output, bit for
  bit (XLA and blockwise; random packings of 1-6 sequences into a row, then padding, and a second
  row that packs the same sequences in reverse)."""
  t = PROPERTY_T
  seg = _segments([lengths, lengths[::-1]], t)
  victim = data.draw(st.integers(1, len(lengths)))
  q, k, v, _ = _qkv(2, t, 4, 2, 8, seed=len(lengths))
  noise = _qkv(2, t, 4, 2, 8, seed=99)
  hit = (seg == victim)[..., None, None]
  q2, k2, v2 = (jnp.where(hit, x + 5.0 * e, x) for x, e in zip((q, k, v), noise))
  others = ~np.asarray(hit[..., 0, 0])
  for name, f in PROPERTY_IMPLS.items():
    a, b = np.asarray(f(q, k, v, seg)), np.asarray(f(q2, k2, v2, seg))
    np.testing.assert_array_equal(a[others], b[others], err_msg=name)
    assert not np.array_equal(a[~others], b[~others]), name  # the victim itself did change


def test_segment_starts():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1] * 8])
  np.testing.assert_array_equal(attention.segment_starts(seg), [[0, 0, 2, 2, 2, 5, 6, 6], [0] * 8])
