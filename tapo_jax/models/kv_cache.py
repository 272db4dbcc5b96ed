"""The KV cache: plain arrays passed into and returned from `Qwen.decode` (no hidden state)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer; slot s of row b holds position s."""

  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]

  @classmethod
  def zeros(cls, cfg, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def slots(self) -> int:
    return self.k.shape[2]
