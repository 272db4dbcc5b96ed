"""A JetStream Engine over the Flax Qwen model: bucketed prefill, slot insert, multi-step generate.

Legend: B slots (max concurrent decodes), P prompts in one prefill, T prefill bucket, S cache
length, W decode window (the first W cache slots, all a chunk of steps can touch), L layers,
K kv-heads, H head dim, V vocab.

A slot holds one sequence. Prefill writes the KV of a prompt's tokens; the last prompt token is
fed again by the first generate step (which samples the first new token), so a prefill samples
nothing and one prefix serves all n samples of a prompt. Params are an explicit argument of every
jitted call, so new weights need no recompile; the decode state is donated. An engine is built
once per purpose (rollouts, synthesis, eval) over a set of devices, and `traces` counts the
traces of its jitted functions (a retrace is a recompile).

Decode layout: an engine does not decode with the trainer's FSDP layout (on a pod that layout
all-gathers every weight on every token). It lays its devices out as (data, 1, tensor)
(`sharding.decode_mesh`, tensor <= kv heads, inside one host) and keeps its own copy of the
weights in `weight_dtype`, split over tensor and replicated over data; the KV cache's slots are
split over data and its kv heads over tensor. `load_params` makes that copy on device: one
jitted cast + reshard from the trainer's layout when both use the same devices, or (disjoint
sampler devices, one process) a reshard on the source devices into shards equal to the
target's, then device-to-device copies of whole shards; never through host memory.

Decode windows: a chunk of generate steps attends over the first W cache positions, W the
smallest window holding the longest live slot; windows double from the smallest prefill bucket
to the cache length, so attention reads at most 2x the live KV.
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
from jax.sharding import NamedSharding

from tapo_jax import sharding
from tapo_jax.models.kv_cache import CACHE_AXES, KVCache
from tapo_jax.models.qwen import Qwen
from tapo_jax.sampling.jetstream_compat import engine_api
from tapo_jax.sampling.sample import Sampling, sample

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)
WEIGHT_DTYPES = ("bfloat16", "float32")  # rollout.weight_dtype
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
    weight_dtype: Any = None,
    tensor: int = 0,
  ):
    if slots < 1 or max_len < 2:
      raise ValueError(f"need slots >= 1 and max_len >= 2, got {slots}, {max_len}")
    self.cfg = model.cfg
    self.slots, self.max_len = int(slots), int(max_len)
    self.buckets = tuple(sorted({min(int(b), self.max_len) for b in prefill_buckets}))
    if not self.buckets or self.buckets[0] < 1:
      raise ValueError(f"prefill_buckets must be positive, got {prefill_buckets}")
    self.windows = decode_windows(self.buckets, self.max_len) if windowed else (self.max_len,)
    self.graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
    devices = mesh if mesh is not None else sharding.mesh_of(params)
    flat = list(np.asarray(devices.devices).flat)
    per_host = sum(d.process_index == flat[0].process_index for d in flat)
    t = sharding.decode_tensor(self.cfg.num_key_value_heads, len(flat), per_host, tensor)
    self._mesh = sharding.decode_mesh(devices, t)
    self.weight_dtype = None if weight_dtype is None else jnp.dtype(weight_dtype)
    self.sampling = sampling
    self.prefill_batch, self.prefill_tokens = int(prefill_batch), int(prefill_tokens)
    self.cache_dtype = cache_dtype or model.dtype
    self.tokenizer_path = tokenizer_path
    self.traces: collections.Counter = collections.Counter()  # jitted function -> traces
    self.syncs = 0  # decode copies made by load_params (reshards, not no-ops)
    rules = sharding.DECODE_RULES
    self.param_shardings = sharding.param_shardings(params, self._mesh, rules)
    self._param_tree = jax.tree.structure(params)
    self._targets = jax.tree.leaves(self.param_shardings)
    self._dtypes = [self._weight_dtype(x.dtype) for x in jax.tree.leaves(params)]
    self.state_shardings = sharding.tree_shardings(
      self._mesh,
      _state_axes(self.cfg.num_hidden_layers),
      jax.eval_shape(self._zero_state, jnp.zeros((2,), jnp.uint32)),
      rules,
    )
    rep = sharding.replicated(self._mesh)
    self._staging_jits: dict = {}  # source devices -> (staging mesh, jitted cast)
    self._sync_jit = jax.jit(self._cast_fn, static_argnames="copy", out_shardings=self._targets)
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

  def _weight_dtype(self, dtype):
    """The decode copy's dtype of a parameter stored in `dtype` (floats only)."""
    if self.weight_dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      return jnp.dtype(dtype)
    return self.weight_dtype

  def _cast_fn(self, leaves, copy: bool):
    self.traces["sync"] += 1
    out = [x.astype(d) for x, d in zip(leaves, self._dtypes)]
    # an unchanged output would be the input buffer itself, which the trainer may donate
    return [jnp.array(y, copy=True) if copy and y is x else y for x, y in zip(leaves, out)]

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
    kv = sharding.named_sharding(self._mesh, CACHE_AXES, cache.k[0].shape, sharding.DECODE_RULES)
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
    """Params (an nnx.State of nnx.Param, or a Qwen module) as the engine's decode copy: in
    `weight_dtype`, with the engine's shardings. Params already so placed are returned as they
    are, unless `copy` (a sampler that runs while the trainer donates its params needs its own).

    From arrays on the engine's devices (the trainer's, in any layout), one jitted cast +
    reshard; from another device set in this process (one-step-off's disjoint sampler devices),
    a reshard on the source devices into shards equal to the target's, then whole-shard
    device-to-device copies; host arrays are placed as usual. Never through host memory."""
    if isinstance(params, nnx.Module):
      params = nnx.state(params, nnx.Param)
    # rebuilt in the engine's own tree structure: any metadata difference would retrace
    leaves = jax.tree.leaves(params)
    if len(leaves) != self._param_tree.num_leaves:
      raise ValueError(f"params have {len(leaves)} arrays, the model {self._param_tree.num_leaves}")
    placed = all(
      isinstance(x, jax.Array) and x.dtype == d and x.sharding.is_equivalent_to(s, x.ndim)
      for x, s, d in zip(leaves, self._targets, self._dtypes)
    )
    if placed and not copy:
      return jax.tree.unflatten(self._param_tree, leaves)
    self.syncs += 1
    source = _device_order(leaves[0])
    if source == list(self._mesh.devices.flat) and all(_device_order(x) == source for x in leaves):
      with jax.set_mesh(self._mesh):
        out = self._sync_jit(leaves, copy=copy)
    elif source is not None and len(source) % self._mesh.shape["tensor"] == 0:
      out = self._copy_across(leaves, source)
    else:
      out = jax.device_put(leaves, self._targets)
      with jax.set_mesh(self._mesh):
        out = self._sync_jit(out, copy=False)
    return jax.tree.unflatten(self._param_tree, out)

  def _copy_across(self, leaves, source):
    """Params on other devices (of this process) -> the decode copy: cast and reshard on the
    source devices into a (data', 1, tensor) layout whose shards are the target's, then copy
    whole shards device to device (jax.device_put finds each target shard among the source's)."""
    staging = sharding.decode_mesh(source, self._mesh.shape["tensor"])
    key = tuple(d.id for d in source)
    if key not in self._staging_jits:
      targets = [NamedSharding(staging, s.spec) for s in self._targets]
      self._staging_jits[key] = (
        staging,
        jax.jit(self._cast_fn, static_argnames="copy", out_shardings=targets),
      )
    staging, stage = self._staging_jits[key]
    with jax.set_mesh(staging):
      staged = stage(leaves, copy=False)
    return jax.device_put(staged, self._targets)

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
    rules = sharding.DECODE_RULES
    kv = (
      sharding.named_sharding(self._mesh, CACHE_AXES, shape, rules),
    ) * self.cfg.num_hidden_layers
    return Prefix(
      cache=KVCache(k=kv, v=kv),
      tokens=sharding.named_sharding(self._mesh, ("batch", "seq"), (1, t), rules),
      lengths=sharding.named_sharding(self._mesh, ("batch",), (1,), rules),
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
    dtype = "as stored" if self.weight_dtype is None else self.weight_dtype.name
    return (
      f"{self.slots} slots x {self.max_len} tokens, prefill buckets {self.buckets}, decode "
      f"windows {self.windows}, decode layout data={self._mesh.shape['data']} x "
      f"tensor={self._mesh.shape['tensor']}, weights {dtype}, "
      f"KV cache {self.cache_bytes / 2**20:.1f} MiB"
    )

  @functools.cached_property
  def cache_bytes(self) -> int:
    """Bytes of the KV cache of the decode state."""
    c = self.cfg
    per = c.num_hidden_layers * self.slots * self.max_len * c.num_key_value_heads * c.head_dim
    return 2 * per * jnp.dtype(self.cache_dtype).itemsize


def decode_windows(buckets: tuple[int, ...], max_len: int) -> tuple[int, ...]:
  """Decode windows: doubling from the smallest bucket (at least 16) to the cache length."""
  w = min(max_len, max(16, buckets[0]))
  out = []
  while w < max_len:
    out.append(w)
    w *= 2
  return (*out, max_len)


def _device_order(x) -> list | None:
  """The devices of array `x` in its sharding's order (None for host data)."""
  if not isinstance(x, jax.Array):
    return None
  s = x.sharding
  if isinstance(s, NamedSharding):
    return list(s.mesh.devices.flat)
  return list(s._device_assignment)


def param_bytes(params) -> int:
  """Bytes of a params pytree."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
