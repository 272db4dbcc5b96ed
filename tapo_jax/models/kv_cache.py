"""The KV cache: plain arrays passed into and returned from `Qwen.decode` (no hidden state)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# (batch, kv-head) lead each layer's [B, K, S, H] block, so decode attention reads it in place
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer; slot s of row b holds position s."""

  k: jax.Array  # [L, B, K, S, H]
  v: jax.Array  # [L, B, K, S, H]

  @classmethod
  def zeros(cls, cfg, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def slots(self) -> int:
    return self.k.shape[3]
