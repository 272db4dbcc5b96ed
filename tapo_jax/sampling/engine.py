"""A JetStream Engine over the Flax Qwen model: bucketed prefill, slot insert, multi-step generate.

Legend: B slots (max concurrent decodes), P prompts in one prefill, T prefill bucket, S cache
length, W decode window (the first W cache slots, all a chunk of steps can touch), L layers,
K kv-heads, H head dim, V vocab.

A slot holds one sequence. Prefill writes the KV of a prompt's tokens; the last prompt token is
fed again by the first generate step (which samples the first new token), so a prefill samples
nothing and one prefix serves all n samples of a prompt. Params are an explicit argument of every
jitted call, so new weights need no recompile; the decode state is donated. An engine is built
once per purpose (rollouts, synthesis, eval) on the mesh of the params it will be given, and
`traces` counts the traces of its jitted functions (a retrace is a recompile).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tapo_jax import sharding
from tapo_jax.models.kv_cache import CACHE_AXES, KVCache
from tapo_jax.models.qwen import Qwen
from tapo_jax.sampling.jetstream_compat import engine_api
from tapo_jax.sampling.sample import Sampling, sample

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)
GREEDY = Sampling(temperature=0.0)


@flax.struct.dataclass
class Prefix:
  """Prefill result for P prompts: the KV of their tokens and the tokens themselves."""

  cache: KVCache  # L x [P, K, T, H]
  tokens: jax.Array  # [P, T] int32  right-padded prompts
  lengths: jax.Array  # [P] int32   true prompt lengths


@flax.struct.dataclass
class DecodeState:
  """Everything a generate step transforms; slot b's position p lives at [b, p]."""

  cache: KVCache  # L x [B, K, S, H]
  tokens: jax.Array  # [B, S] int32  prompt, then sampled tokens
  logprobs: jax.Array  # [B, S] f32  of the token at p under the distribution sampled (0 on prompt)
  lengths: jax.Array  # [B] int32  tokens so far; the last one has no KV in the cache yet
  limits: jax.Array  # [B] int32  the length at which the slot stops
  done: jax.Array  # [B] bool  finished (EOS or limit) or never filled
  rng: jax.Array  # [2] uint32  split on every step


def _state_axes(layers: int) -> DecodeState:
  """Logical axes of every DecodeState leaf."""
  row = ("batch", "cache_seq")
  return DecodeState(
    cache=KVCache(k=(CACHE_AXES,) * layers, v=(CACHE_AXES,) * layers),
    tokens=row,
    logprobs=row,
    lengths=("batch",),
    limits=("batch",),
    done=("batch",),
    rng=(None,),
  )


class QwenEngine(engine_api.Engine):
  """Engine API (google-jetstream 0.2.2) for `tapo_jax.models.qwen.Qwen` plus the batched fast
  path the driver prefers (`prefill_many`, `insert_many`, `generate_steps`, `bucket`, `window`).

  `mesh` defaults to the mesh of `model`'s params; the engine keeps no params (every call takes
  them). `sampling` is what the Engine API's one-step `generate` samples with."""

  def __init__(
    self,
    model: Qwen,
    *,
    slots: int = 64,
    max_len: int = 2048,
    prefill_buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    mesh: jax.sharding.Mesh | None = None,
    sampling: Sampling = GREEDY,
    prefill_batch: int = 16,
    prefill_tokens: int = 16384,
    windowed: bool = True,
    cache_dtype: Any = None,
    tokenizer_path: str = "",
  ):
    if slots < 1 or max_len < 2:
      raise ValueError(f"need slots >= 1 and max_len >= 2, got {slots}, {max_len}")
    self.cfg = model.cfg
    self.slots, self.max_len = int(slots), int(max_len)
    self.buckets = tuple(sorted({min(int(b), self.max_len) for b in prefill_buckets}))
    if not self.buckets or self.buckets[0] < 1:
      raise ValueError(f"prefill_buckets must be positive, got {prefill_buckets}")
    # decode windows: the buckets above the smallest, and the whole cache
    self.windows = (
      tuple(sorted({b for b in self.buckets if b >= 16} | {self.max_len}))
      if windowed
      else (self.max_len,)
    )
    self.graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
    self._mesh = mesh if mesh is not None else sharding.mesh_of(params)
    self.sampling = sampling
    self.prefill_batch, self.prefill_tokens = int(prefill_batch), int(prefill_tokens)
    self.cache_dtype = cache_dtype or model.dtype
    self.tokenizer_path = tokenizer_path
    self.traces: collections.Counter = collections.Counter()  # jitted function -> traces
    self.param_shardings = sharding.param_shardings(params, self._mesh)
    self._param_tree = jax.tree.structure(params)
    self.state_shardings = sharding.tree_shardings(
      self._mesh,
      _state_axes(self.cfg.num_hidden_layers),
      jax.eval_shape(self._zero_state, jnp.zeros((2,), jnp.uint32)),
    )
    rep = sharding.replicated(self._mesh)
    self._init_jit = jax.jit(self._zero_state, out_shardings=self.state_shardings)
    self._prefill_jit = jax.jit(self._prefill_fn)
    self._insert_jit = jax.jit(
      self._insert_fn, donate_argnums=1, out_shardings=self.state_shardings
    )
    self._generate_jit = jax.jit(
      self._generate_fn,
      static_argnames=("sampling", "steps", "window"),
      donate_argnums=1,
      out_shardings=(self.state_shardings, rep),
    )

  # ---- traced bodies -------------------------------------------------------------------------

  def _model(self, params) -> Qwen:
    return nnx.merge(self.graphdef, params, self._rest)

  def _zero_state(self, rng) -> DecodeState:
    b, s = self.slots, self.max_len
    return DecodeState(
      cache=KVCache.zeros(self.cfg, b, s, self.cache_dtype),
      tokens=jnp.zeros((b, s), jnp.int32),
      logprobs=jnp.zeros((b, s), jnp.float32),
      lengths=jnp.zeros((b,), jnp.int32),
      limits=jnp.zeros((b,), jnp.int32),
      done=jnp.ones((b,), bool),
      rng=rng,
    )

  def _prefill_fn(self, params, tokens_PT, lengths_P) -> Prefix:
    self.traces["prefill"] += 1
    p, t = tokens_PT.shape
    cache = KVCache.zeros(self.cfg, p, t, self.cache_dtype)
    kv = sharding.named_sharding(self._mesh, CACHE_AXES, cache.k[0].shape)
    cache = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, kv), cache)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (p, t))
    _, cache = self._model(params).decode(tokens_PT, positions, cache)  # logits are dead code
    return Prefix(cache=cache, tokens=tokens_PT, lengths=lengths_P)

  def _insert_fn(self, prefix: Prefix, state: DecodeState, slots_M, rows_M, limits_M, count):
    self.traces["insert"] += 1
    zeros_1S = jnp.zeros((1, self.max_len), jnp.float32)

    def put(i, st: DecodeState) -> DecodeState:
      slot, row = slots_M[i], rows_M[i]

      def kv(full, part):
        part = jax.lax.dynamic_slice_in_dim(part, row, 1, axis=0)  # [1, K, T, H]
        return jax.lax.dynamic_update_slice(full, part, (slot, 0, 0, 0))

      tok_1T = jax.lax.dynamic_slice_in_dim(prefix.tokens, row, 1, axis=0)
      return st.replace(
        cache=jax.tree.map(kv, st.cache, prefix.cache),
        tokens=jax.lax.dynamic_update_slice(st.tokens, tok_1T, (slot, 0)),
        logprobs=jax.lax.dynamic_update_slice(st.logprobs, zeros_1S, (slot, 0)),
        lengths=st.lengths.at[slot].set(prefix.lengths[row]),
        limits=st.limits.at[slot].set(limits_M[i]),
        done=st.done.at[slot].set(False),
      )

    return jax.lax.fori_loop(0, count, put, state)

  def _generate_fn(self, params, state: DecodeState, sampling: Sampling, steps: int, window: int):
    self.traces["generate"] += 1
    model = self._model(params)
    b, s = state.tokens.shape
    rows = jnp.arange(b)
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)

    def step(carry):
      i, cache, st, _ = carry
      rng, key = jax.random.split(st.rng)
      active = ~st.done
      pos = jnp.where(active, st.lengths - 1, 0)
      tok_in = st.tokens[rows, pos]
      logits, cache = model.decode(tok_in[:, None], pos[:, None], cache)
      new, lp = sample(logits[:, 0], key, sampling)
      at = jnp.where(active, st.lengths, s)  # out of range: dropped
      lengths = st.lengths + active
      finished = active & (jnp.isin(new, eos) | (lengths >= st.limits))
      st = st.replace(
        tokens=st.tokens.at[rows, at].set(new, mode="drop"),
        logprobs=st.logprobs.at[rows, at].set(lp, mode="drop"),
        lengths=lengths,
        done=st.done | finished,
        rng=rng,
      )
      return i + 1, cache, st, jnp.stack([jnp.where(active, new, -1), active], axis=1)

    def running(carry):
      i, _, st, _ = carry
      return (i < steps) & ~jnp.all(st.done)

    full = state.cache
    cache = jax.tree.map(lambda x: x[:, :, :window], full) if window < s else full
    last_B2 = jnp.stack([jnp.full((b,), -1), jnp.zeros((b,), jnp.int32)], axis=1)
    carry = (jnp.int32(0), cache, state.replace(cache=None), last_B2.astype(jnp.int32))
    _, cache, state, last_B2 = jax.lax.while_loop(running, step, carry)
    if window < s:
      put_back = lambda f, w: jax.lax.dynamic_update_slice(f, w, (0, 0, 0, 0))
      cache = jax.tree.map(put_back, full, cache)
    data_B4 = jnp.concatenate([last_B2, state.lengths[:, None], state.done[:, None]], axis=1)
    return state.replace(cache=cache), data_B4.astype(jnp.int32)

  # ---- batched helpers (host side) -----------------------------------------------------------

  def bucket(self, length: int) -> int:
    """The smallest prefill bucket that holds `length` tokens."""
    for b in self.buckets:
      if b >= length:
        return b
    raise ValueError(
      f"prompt of {length} tokens is longer than the largest prefill bucket {self.buckets[-1]}"
    )

  def window(self, max_length: int) -> int:
    """The smallest decode window that holds positions < `max_length`."""
    return next(w for w in self.windows if w >= max_length)

  def max_prefill_rows(self, bucket: int) -> int:
    """How many prompts of one bucket one prefill call takes (a power of two)."""
    rows = max(1, min(self.prefill_batch, self.prefill_tokens // bucket))
    return 1 << (rows.bit_length() - 1)

  def prefill_many(self, params, prompts: list[list[int]]) -> Prefix:
    """Prefills prompts of one bucket, padded to a power-of-two count (bounded compiles)."""
    t = self.bucket(max(len(p) for p in prompts))
    p = 1 << (len(prompts) - 1).bit_length()
    tokens = np.zeros((p, t), np.int32)
    lengths = np.ones((p,), np.int32)
    for i, prompt in enumerate(prompts):
      tokens[i, : len(prompt)] = prompt
      lengths[i] = len(prompt)
    with jax.set_mesh(self._mesh):
      return self._prefill_jit(params, jnp.asarray(tokens), jnp.asarray(lengths))

  def insert_many(self, prefix: Prefix, state: DecodeState, slots, rows, limits) -> DecodeState:
    """Copies prefix row rows[i] into slot slots[i], stopping at length limits[i]."""
    m = len(slots)
    if not m:
      return state
    if max(limits) > self.max_len:
      raise ValueError(f"limit {max(limits)} exceeds the cache length {self.max_len}")
    pad = lambda xs: np.concatenate([np.asarray(xs, np.int32), np.zeros(self.slots - m, np.int32)])
    with jax.set_mesh(self._mesh):
      return self._insert_jit(prefix, state, pad(slots), pad(rows), pad(limits), np.int32(m))

  def generate_steps(
    self, params, state: DecodeState, *, steps: int, sampling: Sampling, window: int | None = None
  ) -> tuple[DecodeState, jax.Array]:
    """Up to `steps` generate steps in one jitted call (fewer once every slot is done); returns
    (state, data [B, 4] int32: the last step's token (-1 where idle) and valid, then each slot's
    length and done)."""
    window = self.max_len if window is None else window
    with jax.set_mesh(self._mesh):
      return self._generate_jit(params, state, sampling=sampling, steps=steps, window=window)

  # ---- Engine API ----------------------------------------------------------------------------

  def load_params(self, params, *args, copy: bool = False, **kwargs):
    """Params (an nnx.State of nnx.Param, or a Qwen module) placed with the engine's shardings
    (no copy when they already are, e.g. the trainer's params on the same mesh, unless `copy`:
    a sampler that runs while the trainer donates its params needs its own)."""
    if isinstance(params, nnx.Module):
      params = nnx.state(params, nnx.Param)
    # rebuilt in the engine's own tree structure: any metadata difference would retrace
    leaves = jax.tree.leaves(params)
    if len(leaves) != self._param_tree.num_leaves:
      raise ValueError(f"params have {len(leaves)} arrays, the model {self._param_tree.num_leaves}")
    placed = jax.device_put(leaves, jax.tree.leaves(self.param_shardings), may_alias=not copy)
    return jax.tree.unflatten(self._param_tree, placed)

  def init_decode_state(self, seed: int = 0, *args, **kwargs) -> DecodeState:
    with jax.set_mesh(self._mesh):
      return self._init_jit(jax.random.PRNGKey(int(seed) % 2**62))

  def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length) -> Prefix:
    """Prefix of one prompt (padded_tokens [T], T a bucket) or of P prompts ([P, T], [P])."""
    if existing_prefix is not None:
      raise NotImplementedError("QwenEngine.prefill does not extend an existing prefix")
    tokens = np.asarray(padded_tokens, np.int32)
    lengths = np.asarray(true_length, np.int32)
    if tokens.ndim == 1:
      tokens, lengths = tokens[None], lengths.reshape(1)
    if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
      raise ValueError(f"true_length {lengths} outside [1, {tokens.shape[1]}]")
    bucket = self.bucket(int(lengths.max()))  # any padding works: re-padded to a bucket
    tokens = np.pad(tokens[:, :bucket], ((0, 0), (0, max(0, bucket - tokens.shape[1]))))
    with jax.set_mesh(self._mesh):
      return self._prefill_jit(params, jnp.asarray(tokens), jnp.asarray(lengths))

  def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
    return self.insert_many(prefix, decode_state, [slot], [0], [self.max_len])

  def generate(self, params, decode_state: DecodeState):
    state, data_B3 = self.generate_steps(params, decode_state, steps=1, sampling=self.sampling)
    return state, engine_api.ResultTokens(
      data=data_B3, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3), samples_per_slot=1
    )

  def get_prefix_destination_sharding(self) -> Prefix:
    t = self.buckets[-1]
    shape = (1, self.cfg.num_key_value_heads, t, self.cfg.head_dim)
    kv = (sharding.named_sharding(self._mesh, CACHE_AXES, shape),) * self.cfg.num_hidden_layers
    return Prefix(
      cache=KVCache(k=kv, v=kv),
      tokens=sharding.named_sharding(self._mesh, ("batch", "seq"), (1, t)),
      lengths=sharding.named_sharding(self._mesh, ("batch",), (1,)),
    )

  def get_tokenizer(self):
    from jetstream.engine import tokenizer_pb2

    return tokenizer_pb2.TokenizerParameters(path=self.tokenizer_path)

  def build_tokenizer(self, metadata):
    raise NotImplementedError("tokenize on the host with transformers; the engine takes ids")

  @property
  def max_concurrent_decodes(self) -> int:
    return self.slots

  @property
  def samples_per_slot(self) -> int:
    return 1

  @property
  def max_prefill_length(self) -> int:
    return self.buckets[-1]

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self._mesh

  @property
  def colocated_cpus(self) -> None:
    return None

  def describe(self) -> str:
    """One line for logs: slots, cache length, buckets, mesh, KV cache size."""
    mesh = " ".join(f"{k}={v}" for k, v in self._mesh.shape.items())
    return (
      f"{self.slots} slots x {self.max_len} tokens, prefill buckets {self.buckets}, "
      f"mesh {mesh}, KV cache {self.cache_bytes / 2**20:.1f} MiB"
    )

  @functools.cached_property
  def cache_bytes(self) -> int:
    """Bytes of the KV cache of the decode state."""
    c = self.cfg
    per = c.num_hidden_layers * self.slots * self.max_len * c.num_key_value_heads * c.head_dim
    return 2 * per * jnp.dtype(self.cache_dtype).itemsize


def param_bytes(params) -> int:
  """Bytes of a params pytree."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
