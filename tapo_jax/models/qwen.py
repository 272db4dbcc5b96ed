"""The Qwen decoder family (Qwen2, Qwen2.5, Qwen3) in flax.nnx.

Legend: B batch, T tokens, S cache slots, N q-heads, K kv-heads, H head dim, D model, F mlp,
V vocab, L layers.

Qwen2/2.5: q/k/v bias, tied (small sizes) or untied embeddings. Qwen3: RMSNorm on q and k per
head, no q/k/v bias, head_dim independent of hidden_size. All: GQA, RoPE (rotate-half), RMSNorm,
SwiGLU. Every parameter carries `logical_axes` metadata that `tapo_jax.sharding` maps to the mesh.
`attention_impl` ("" XLA, "cudnn", "blockwise", "splash") selects the uncached causal attention
and the prefill's: see `tapo_jax.models.attention` for what each materializes.

Three entry points:
- `model(tokens_BT)` -> logits_BTV: the full causal forward (no cache), right padding is harmless.
- `model.hidden(tokens_BT, positions_BT, segment_ids_BT)` -> final-normed hidden_BTD;
  `model.lm_head()` -> [D, V] (the loss computes logprobs from these in vocabulary chunks). Packed
  rows (several sequences per row, positions restarting at 0 in each) pass segment ids: attention
  never crosses a segment boundary.
- `model.decode(tokens_BT, positions_BT, cache)` -> (logits_BTV, cache): the cache is passed in and
  returned; the T new tokens of row b are written at slots positions[b, 0] .. positions[b, 0]+T-1
  and attend to every slot s <= their position. The cache holds one [B, K, S, H] array per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tapo_jax.models import attention
from tapo_jax.models.kv_cache import KVCache
from tapo_jax.sharding import constrain

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype, model.param_dtype


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Architecture hyper-parameters (names follow the HF config.json where they exist)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  model_type: str = "qwen2"
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768

  @property
  def qkv_bias(self) -> bool:
    return self.model_type == "qwen2"

  @property
  def qk_norm(self) -> bool:
    return self.model_type == "qwen3"

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> QwenConfig:
    """From a HF config.json dict; unsupported features raise naming the key."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"{source}: unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
      )
    rope_scaling = d.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (
      None,
      "default",
    ):
      raise ValueError(f"{source}: rope_scaling={rope_scaling} is not supported")
    if d.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window=true is not supported")
    missing = [
      k
      for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
      )
      if k not in d
    ]
    if missing:
      raise ValueError(f"{source}: missing keys {missing}")
    heads = d["num_attention_heads"]
    rope_theta = d.get("rope_theta")
    if rope_theta is None:  # newer transformers nest it under rope_parameters
      rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return cls(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=heads,
      num_key_value_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // heads,
      model_type=model_type,
      rope_theta=float(rope_theta),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
    )

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that transformers' Qwen2/Qwen3 classes accept."""
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
    d = dict(
      architectures=[arch],
      model_type=self.model_type,
      vocab_size=self.vocab_size,
      hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size,
      num_hidden_layers=self.num_hidden_layers,
      num_attention_heads=self.num_attention_heads,
      num_key_value_heads=self.num_key_value_heads,
      head_dim=self.head_dim,
      rope_theta=self.rope_theta,
      rms_norm_eps=self.rms_norm_eps,
      tie_word_embeddings=self.tie_word_embeddings,
      max_position_embeddings=self.max_position_embeddings,
      hidden_act="silu",
      attention_bias=self.qkv_bias,
      use_sliding_window=False,
      torch_dtype="float32",
    )
    return d


def _param(rngs: nnx.Rngs, shape, axes, dtype, std=0.02, zeros=False, ones=False) -> nnx.Param:
  if zeros:
    value = jnp.zeros(shape, dtype)
  elif ones:
    value = jnp.ones(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.scale = _param(rngs, (dim,), ("norm",), param_dtype, ones=True)
    self.eps = eps

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x).astype(dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half layout (as in HF Qwen)."""
  h = x_BTNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2 :]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BTNH.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: QwenConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.cfg, self.dtype = cfg, dtype
    self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), param_dtype, zeros=True)
      self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, zeros=True)
      self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, zeros=True)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

  def _proj(self, x, name):
    w_DKH = getattr(self, f"{name}_proj")[...].astype(self.dtype)
    # one 2-D matmul (the reshapes are free): no per-call transposes of the weight
    y = (x @ w_DKH.reshape(w_DKH.shape[0], -1)).reshape(*x.shape[:-1], *w_DKH.shape[1:])
    if self.cfg.qkv_bias:
      y = y + getattr(self, f"{name}_bias")[...].astype(self.dtype)
    return y

  def __call__(self, x_BTD, positions_BT, mask_BTS=None, kv=None, impl=None, segment_ids_BT=None):
    """kv: optional (k_cache_BKSH, v_cache_BKSH) of this layer to write into and attend over;
    impl: the model's attention_impl (tapo_jax.models.attention); segment_ids_BT: packed rows
    (uncached only)."""
    cfg = self.cfg
    q = self._proj(x_BTD, "q")
    k = self._proj(x_BTD, "k")
    v = self._proj(x_BTD, "v")
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope(q, positions_BT, cfg.rope_theta)
    k = rope(k, positions_BT, cfg.rope_theta)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    new_kv = None
    if kv is not None:
      # a scatter into this layer's own buffer: in place in a loop carry or a donated buffer
      k_cache, v_cache = kv
      rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]
      k_cache = k_cache.at[rows_B1, :, positions_BT].set(k.astype(k_cache.dtype))
      v_cache = v_cache.at[rows_B1, :, positions_BT].set(v.astype(v_cache.dtype))
      new_kv = (k_cache, v_cache)
      if impl in attention.MEMORY_EFFICIENT and x_BTD.shape[1] > 1:  # a prefill: no [B,N,T,S]
        k_c, v_c = k_cache.astype(self.dtype), v_cache.astype(self.dtype)
        out = attention.blockwise_attention(q, k_c, v_c, positions_BT, scale=cfg.head_dim**-0.5)
      else:
        out = self._attend_cache(q, k_cache, v_cache, mask_BTS)
    else:
      out = attention.causal_attention(  # [B, T, N, H]
        q, k, v, scale=cfg.head_dim**-0.5, impl=impl, segment_ids_BT=segment_ids_BT
      )
    b, t, n, h = out.shape
    o_NHD = self.o_proj[...].astype(self.dtype)
    return out.reshape(b, t, n * h) @ o_NHD.reshape(n * h, -1), new_kv

  def _attend_cache(self, q_BTNH, k_BKSH, v_BKSH, mask_BTS):
    """GQA attention over a [B, K, S, H] cache: (batch, kv-head) lead both operands, so the
    cache is read in place (no transposed copy per step)."""
    b, t, n, h = q_BTNH.shape
    kv = k_BKSH.shape[1]
    q = q_BTNH.reshape(b, t, kv, n // kv, h)
    k, v = k_BKSH.astype(self.dtype), v_BKSH.astype(self.dtype)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * self.cfg.head_dim**-0.5
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class MLP(nnx.Module):
  def __init__(self, cfg: QwenConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.dtype = dtype
    self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), param_dtype)

  def __call__(self, x_BTD):
    gate = x_BTD @ self.gate_proj[...].astype(self.dtype)
    up = x_BTD @ self.up_proj[...].astype(self.dtype)
    h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    return h @ self.down_proj[...].astype(self.dtype)


class Block(nnx.Module):
  def __init__(self, cfg: QwenConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg, dtype=dtype, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, dtype=dtype, **kw)

  def __call__(self, x, positions, mask, kv=None, impl=None, segment_ids=None):
    h, new_kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, impl, segment_ids)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("batch", "seq", "act_embed")), new_kv


class Qwen(nnx.Module):
  """Qwen2/2.5/3 causal LM. `dtype` is the compute dtype, `param_dtype` the stored one."""

  def __init__(
    self,
    cfg: QwenConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool = False,
    attention_impl: str | None = None,
    rngs: nnx.Rngs,
  ):
    attention.check_impl(attention_impl)
    self.cfg, self.dtype, self.remat, self.attention_impl = cfg, dtype, remat, attention_impl
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = _param(
      rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype
    )
    self.layers = nnx.List([Block(cfg, dtype=dtype, **kw) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head_kernel = _param(
        rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype
      )

  def lm_head(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the embedding when tied)."""
    w = self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head_kernel[...]
    return w.astype(self.dtype)

  def logits(self, hidden_BTD: jax.Array) -> jax.Array:
    """Hidden -> float32 logits."""
    out = jnp.einsum("btd,dv->btv", hidden_BTD, self.lm_head(), preferred_element_type=jnp.float32)
    return constrain(out, ("batch", "seq", "vocab"))

  def _embed(self, tokens_BT):
    x = jnp.take(self.embed_tokens[...], tokens_BT, axis=0).astype(self.dtype)
    return constrain(x, ("batch", "seq", "act_embed"))

  def hidden(
    self,
    tokens_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Full causal forward to the final-normed hidden states [B, T, D].

    Without segment ids, rows are right-padded sequences starting at index 0 (`positions_BT`
    only drives RoPE; padding after a row's end cannot affect its real tokens under the causal
    mask). With them, a row packs several sequences, each with its own positions, and a token
    attends only to the earlier tokens of its own segment."""
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask, impl, seg = None, self.attention_impl, segment_ids_BT  # the kernels build the mask
    x = self._embed(tokens_BT)
    for layer in self.layers:
      if self.remat:
        fn = nnx.remat(lambda blk, x_: blk(x_, positions_BT, mask, None, impl, seg)[0])
        x = fn(layer, x)
      else:
        x, _ = layer(x, positions_BT, mask, None, impl, seg)
    return self.norm(x)

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
    """int32 tokens [B, T] -> float32 logits [B, T, V]; full causal forward, no cache."""
    return self.logits(self.hidden(tokens_BT, positions_BT))

  def decode(
    self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache
  ) -> tuple[jax.Array, KVCache]:
    """Writes the T new tokens into `cache` at their positions, attends over it; returns
    (float32 logits [B, T, V], new cache)."""
    s = cache.slots
    mask = jnp.arange(s)[None, None, :] <= positions_BT[:, :, None]  # [B, T, S]
    x = self._embed(tokens_BT)
    ks, vs = list(cache.k), list(cache.v)
    for i, layer in enumerate(self.layers):
      x, (ks[i], vs[i]) = layer(x, positions_BT, mask, (ks[i], vs[i]), self.attention_impl)
    return self.logits(self.norm(x)), KVCache(k=tuple(ks), v=tuple(vs))

  def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of `slots` positions."""
    return KVCache.zeros(self.cfg, batch, slots, dtype or self.dtype)


def param_logical_axes(model: nnx.Module):
  """The nnx.State of `model`'s params with each leaf replaced by its logical axes tuple."""
  state = nnx.state(model, nnx.Param)
  return jax.tree.map(
    lambda v: v.get_metadata().get("logical_axes"),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def count_params(model_or_state) -> int:
  """Number of parameter elements (works on abstract shapes from jax.eval_shape)."""
  state = (
    nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.Module)
    else model_or_state
  )
  return sum(int(x.size) for x in jax.tree.leaves(state))
