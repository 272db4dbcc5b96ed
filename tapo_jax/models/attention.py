r"""Causal attention without a [B, N, T, S] score array: blockwise (pure JAX) and splash (TPU).

Legend: B batch, T queries, S keys, N q-heads, K kv-heads, G = N / K heads per kv-head, H head
dim, Bq / Bk query / key block, nq = T / Bq, nk = S / Bk.

Packed rows (the trainer's batch: several sequences per row, `tapo_jax.tapo.batch`) pass
`segment_ids` [B, T]: query t sees key s iff s <= t and seg[s] = seg[t], so no sequence attends
across a segment boundary. Every implementation takes them: XLA and cuDNN as a [B, 1, T, T] boolean
mask (B·T² bytes, no head factor), blockwise in its block visibility (and it skips key blocks
that lie wholly before the query block's earliest segment), splash through the kernel's
`SegmentIds`.

`model.attention_impl` picks the uncached attention of training and the prefill:
  ""/"xla"   jax.nn.dot_product_attention in XLA: softmax(q kᵀ) materialized, B·N·T² f32 per layer
             (the recipe's 8 x 9,216-token micro-batch: 8·28·9216²·4 B = 76 GB per layer, unsharded)
  "cudnn"    the same call with cuDNN's fused flash kernel (NVIDIA GPUs only)
  "blockwise" `blockwise_attention` below: any backend, O(B·N·T) memory
  "splash"   jax.experimental.pallas.ops.tpu.splash_attention (the Pallas TPU kernel that ships
             with JAX) for the uncached causal forward; on other backends, or head_dim not a
             multiple of 128 (the kernel's lane tile), it runs `blockwise_attention` instead.
Decoding one token (T = 1) keeps the plain cache attention of `Qwen` (its scores are [B, N, 1, S]);
a prefill (T > 1 over the cache) with "cudnn", "blockwise" or "splash" runs `blockwise_attention`,
whose mask comes from runtime positions (the fused kernels take no such mask).

Why both: splash is the fast path on TPU (tiles in VMEM, a tuned backward); blockwise is the same
math in plain JAX, so it runs and is tested everywhere (CPU included), handles the cache's
position-dependent mask, and is the fallback where the kernel does not apply.

Blockwise forward (flash attention's online softmax). Query t sees key s iff s <= qpos[t] (the
causal mask for qpos = 0..T-1; slots s <= position for a cache) and, on packed rows, kseg[s] =
qseg[t]. For each query block, key blocks j = ⌊min segment start / Bk⌋ .. ⌈(max qpos + 1) / Bk⌉ - 1
(the others are fully masked and skipped):
  s_j = scale · q k_jᵀ          m' = max(m, rowmax s_j)         p_j = exp(s_j - m')
  l' = l·e^(m - m') + rowsum p_j  acc' = acc·e^(m - m') + p_j v_j
  out = acc / l,  lse = m + log l   (saved for the backward; a row with no visible key gives 0)
Backward (recomputes p_j from lse instead of storing it), with Δ = rowsum(dO ∘ O):
  p_j = exp(s_j - lse)   dv_j += p_jᵀ dO   dp = dO v_jᵀ   ds = p_j ∘ (dp - Δ) · scale
  dq += ds k_j           dk_j += dsᵀ q
Live memory: the saved q, k, v, out and lse (O(B·N·T·H)), plus a few [B, N, Bq, Bk] f32 blocks
while a block pair is processed; no [B, N, T, S] array exists in the forward or the backward.
Scores, the softmax statistics and all accumulators are float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tapo_jax import sharding

IMPLS = ("", "xla", "cudnn", "blockwise", "splash")  # model.attention_impl ("": xla)
MEMORY_EFFICIENT = ("cudnn", "blockwise", "splash")  # their prefill over the cache is blockwise
BLOCK = 512  # default Bq = Bk; the planner (tapo_jax.plan) sizes the per-block scratch with it


def check_impl(impl: str | None) -> None:
  """Raises ValueError for an attention_impl this module does not know."""
  if (impl or "") not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}: expected one of {IMPLS}")


def causal_attention(
  q_BTNH, k_BTKH, v_BTKH, *, scale: float, impl: str | None, segment_ids_BT=None
) -> jax.Array:
  """Uncached causal attention [B, T, N, H] through the implementation `impl` selects; with
  `segment_ids_BT` (packed rows) a query sees only the keys of its own segment."""
  impl = impl or ""
  if impl == "splash" and splash_applies(q_BTNH.shape[-1]):
    return splash_attention(q_BTNH, k_BTKH, v_BTKH, scale=scale, segment_ids_BT=segment_ids_BT)
  if impl in ("blockwise", "splash"):
    b, t = q_BTNH.shape[:2]
    qpos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_BKSH, v_BKSH = (x.transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))
    return blockwise_attention(
      q_BTNH, k_BKSH, v_BKSH, qpos, scale=scale, segment_ids_BT=segment_ids_BT
    )
  mask = None
  if segment_ids_BT is not None:
    mask = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]  # [B, 1, T, S]
  return jax.nn.dot_product_attention(  # unpacked, plain causal: cuDNN's fused causal kernel
    q_BTNH, k_BTKH, v_BTKH, mask=mask, is_causal=True, scale=scale, implementation=impl or None
  )


def segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T] int32: the column where each token's segment begins (contiguous segments)."""
  t = segment_ids_BT.shape[1]
  col = jnp.arange(t, dtype=jnp.int32)
  first = jnp.concatenate(
    [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]],
    axis=1,
  )
  return jax.lax.cummax(jnp.where(first, col, 0), axis=1)


def splash_applies(head_dim: int) -> bool:
  """Whether "splash" runs the Pallas kernel here (a TPU backend and a lane-aligned head dim)."""
  return jax.default_backend() == "tpu" and head_dim % 128 == 0


# ---- blockwise ---------------------------------------------------------------------------------


def blockwise_attention(
  q_BTNH: jax.Array,
  k_BKSH: jax.Array,
  v_BKSH: jax.Array,
  qpos_BT: jax.Array,
  *,
  scale: float,
  block_q: int = BLOCK,
  block_k: int = BLOCK,
  segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
  """Attention of q over keys/values where query t sees slot s iff s <= qpos[b, t] (and, with
  `segment_ids_BT`, seg[b, s] = seg[b, t]: self-attention of packed rows, S = T); [B, T, N, H].

  k and v are in the cache layout [B, K, S, H]; T and S need not divide the block sizes."""
  b, t, n, h = q_BTNH.shape
  kh, s = k_BKSH.shape[1], k_BKSH.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  q = q_BTNH.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
  qpos = jnp.pad(qpos_BT.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
  if segment_ids_BT is None:
    qseg, kseg = jnp.zeros((b, tp), jnp.int32), jnp.zeros((b, sp), jnp.int32)
    qstart = jnp.zeros((b, tp), jnp.int32)
  else:
    seg = segment_ids_BT.astype(jnp.int32)
    qseg = jnp.pad(seg, ((0, 0), (0, tp - t)))
    kseg = jnp.pad(seg, ((0, 0), (0, sp - s)))
    qstart = jnp.pad(segment_starts(seg), ((0, 0), (0, tp - t)), constant_values=s)
  k = jnp.pad(k_BKSH, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  v = jnp.pad(v_BKSH, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  out = _flash(q, k, v, (qpos, qseg, kseg, qstart), float(scale), bq, bk, s)  # [B, K, G, Tp, H]
  return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _visible(where_i, kseg, j, bk: int, s_valid: int):
  """[B, 1, 1, Bq, Bk] bool: key slot j·Bk + i is visible to each query of the block."""
  qpos_Bq, qseg_Bq = where_i[0], where_i[1]
  idx = j * bk + jnp.arange(bk)
  kseg_Bk = jax.lax.dynamic_slice_in_dim(kseg, j * bk, bk, axis=1)
  vis = (idx[None, None, :] <= qpos_Bq[:, :, None]) & (idx < s_valid)[None, None, :]
  vis &= kseg_Bk[:, None, :] == qseg_Bq[:, :, None]
  return vis[:, None, None]


def _key_blocks(where_i, bk: int, nk: int):
  """[lo, hi) of the key blocks a query block needs: from its earliest segment's start to its
  largest position (causal and segment skipping)."""
  qpos_Bq, qstart_Bq = where_i[0], where_i[2]
  hi = jnp.clip(jnp.max(qpos_Bq) // bk + 1, 0, nk)
  return jnp.minimum(jnp.min(qstart_Bq) // bk, hi), hi


def _block_of(where, i, bq: int):
  """(qpos, qseg, qstart) [B, Bq] of query block i."""
  qpos, qseg, _, qstart = where
  return tuple(jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1) for x in (qpos, qseg, qstart))


def _scores(q_i, k_j, scale):
  return jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, where, scale, bq, bk, s_valid):
  """(out [B, K, G, Tp, H] in q's dtype, lse [B, K, G, Tp] f32)."""
  b, kh, g, tp, h = q.shape
  nq, nk = tp // bq, k.shape[2] // bk
  kseg = where[2]

  def query_block(i):
    q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
    where_i = _block_of(where, i, bq)

    def key_block(j, carry):
      m, l, acc = carry
      k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      vis = _visible(where_i, kseg, j, bk, s_valid)
      s_ij = _scores(q_i, k_j, scale)
      m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s_ij, -jnp.inf), axis=-1))
      m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen no key yet
      p = jnp.where(vis, jnp.exp(s_ij - m_ref[..., None]), 0.0)
      decay = jnp.exp(m - m_ref)  # 0 while m = -inf
      l = l * decay + p.sum(-1)
      pv = jnp.einsum(
        "bkgqs,bksh->bkgqh", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32
      )
      return m_new, l, acc * decay[..., None] + pv

    init = (
      jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
      jnp.zeros((b, kh, g, bq), jnp.float32),
      jnp.zeros((b, kh, g, bq, h), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(*_key_blocks(where_i, bk, nk), key_block, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(query_block, jnp.arange(nq))  # [nq, B, K, G, Bq, (H)]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, tp, h)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, tp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, where, scale, bq, bk, s_valid):
  """where = (qpos [B, Tp], qseg [B, Tp], kseg [B, Sp], qstart [B, Tp]), int32."""
  return _forward(q, k, v, where, scale, bq, bk, s_valid)[0]


def _flash_fwd(q, k, v, where, scale, bq, bk, s_valid):
  out, lse = _forward(q, k, v, where, scale, bq, bk, s_valid)
  return out, (q, k, v, where, out, lse)


def _flash_bwd(scale, bq, bk, s_valid, res, d_out):
  q, k, v, where, out, lse = res
  kseg = where[2]
  b, kh, g, tp, h = q.shape
  nq, nk = tp // bq, k.shape[2] // bk
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, Tp]
  lse_ref = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def query_block(carry, i):
    dk, dv = carry
    q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
    do_i = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=3)
    lse_i = jax.lax.dynamic_slice_in_dim(lse_ref, i * bq, bq, axis=3)
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
    where_i = _block_of(where, i, bq)

    def key_block(j, c):
      dq_i, dk, dv = c
      k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      vis = _visible(where_i, kseg, j, bk, s_valid)
      p = jnp.where(vis, jnp.exp(_scores(q_i, k_j, scale) - lse_i[..., None]), 0.0)
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
      f32 = dict(preferred_element_type=jnp.float32)
      dv_j = jnp.einsum("bkgqs,bkgqh->bksh", p.astype(d_out.dtype), do_i, **f32)
      dk_j = jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, **f32)
      dq_i = dq_i + jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, **f32)
      add = lambda acc, d: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        acc, jax.lax.dynamic_slice_in_dim(acc, j * bk, bk, axis=2) + d, j * bk, axis=2
      )
      return dq_i, add(dk, dk_j), add(dv, dv_j)

    dq_i = jnp.zeros((b, kh, g, bq, h), jnp.float32)
    dq_i, dk, dv = jax.lax.fori_loop(*_key_blocks(where_i, bk, nk), key_block, (dq_i, dk, dv))
    return (dk, dv), dq_i

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(nq))
  dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), (None,) * len(where)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- splash (Pallas, TPU) ----------------------------------------------------------------------


def splash_attention(
  q_BTNH,
  k_BTKH,
  v_BTKH,
  *,
  scale: float,
  block: int = BLOCK,
  interpret: bool | None = None,
  segment_ids_BT=None,
) -> jax.Array:
  """Causal attention [B, T, N, H] through the Pallas splash kernel, per device under the mesh in
  context (shard_map over batch and heads); packed rows pass `segment_ids_BT` (the kernel's
  SegmentIds). interpret=None: Pallas interpret mode off TPU."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  b, t, n, h = q_BTNH.shape
  kh = k_BTKH.shape[2]
  blk = min(block, -(-t // 128) * 128)  # a multiple of the 128-lane tile
  tp = -(-t // blk) * blk
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))  # noqa: E731
  q = pad(q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)  # [B, N, Tp, H]
  k, v = (pad(x).transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))  # [B, K, Tp, H]
  args = (q, k, v)
  if segment_ids_BT is not None:  # the padding to Tp is a segment of its own (-1), cut below
    args += (jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1),)

  def per_device(q, k, v, *seg):
    sizes = sk.BlockSizes(
      block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
      block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk,
    )  # fmt: skip
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(q.shape[1])])
    kernel = sk.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    if not seg:
      return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
      q, k, v, seg[0]
    )

  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    out = per_device(*args)
  else:
    q_spec = sharding.fit_spec(
      sharding.logical_to_spec(("batch", "heads", "seq", "head_dim")), q.shape, mesh
    )
    kv_spec = sharding.fit_spec(
      sharding.logical_to_spec(("batch", "kv_heads", "seq", "head_dim")), k.shape, mesh
    )
    if q_spec[1] is not None and kv_spec[1] is None:
      # q-heads split over the mesh but kv-heads cannot be: give each q-head its own kv-head
      k, v = (jnp.repeat(x, n // kh, axis=1) for x in (k, v))
      kv_spec = q_spec
    specs = (q_spec, kv_spec, kv_spec, jax.P(q_spec[0], None))[: len(args)]
    args = (args[0], k, v) + args[3:]  # k, v: kv-heads repeated above when needed
    out = jax.shard_map(per_device, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
  return out[:, :, :t].transpose(0, 2, 1, 3)
