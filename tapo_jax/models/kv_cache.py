"""The KV cache: plain arrays passed into and returned from `Qwen.decode` (no hidden state)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# Logical axes of each layer's array. (batch, kv-head) lead, so decode attention reads a layer's
# block in place; one array per layer (not one stacked [L, ...] array), so a decode step writes
# and reads each layer's buffer without slicing copies.
CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


@flax.struct.dataclass
class KVCache:
  """Keys and values, one array per layer; slot s of row b holds position s."""

  k: tuple[jax.Array, ...]  # L x [B, K, S, H]
  v: tuple[jax.Array, ...]  # L x [B, K, S, H]

  @classmethod
  def zeros(cls, cfg, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
    layers = range(cfg.num_hidden_layers)
    return cls(
      k=tuple(jnp.zeros(shape, dtype) for _ in layers),
      v=tuple(jnp.zeros(shape, dtype) for _ in layers),
    )

  @property
  def slots(self) -> int:
    return self.k[0].shape[2]
