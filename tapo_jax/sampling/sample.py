"""Next-token sampling (temperature, top-k, top-p) with the logprobs the trainer needs.

Legend: B batch, V vocab. Order of operations follows Hugging Face's logits warpers: divide by the
temperature, keep the top-k, then keep the smallest set whose probability reaches top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Static sampling settings (hashable: a jit static argument). temperature 0 is greedy."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def truncate(logits_BV: jax.Array, top_p: float, top_k: int, candidates: int = 1024) -> jax.Array:
  """Sets logits outside the top-k / top-p set to -inf (ties at the threshold are kept).

  Top-p alone first looks among the `candidates` largest logits and sorts the whole vocabulary
  only when some row's top-p set does not fit in them (exact either way)."""
  v = logits_BV.shape[-1]
  if top_k >= v:
    top_k = 0
  if top_k == 0 and top_p >= 1.0:
    return logits_BV
  if top_k > 0:
    sorted_BK = jax.lax.top_k(logits_BV, top_k)[0]  # descending
    logits_BV = jnp.where(logits_BV < sorted_BK[:, -1:], -jnp.inf, logits_BV)
    if top_p < 1.0:
      logits_BV = _top_p(
        logits_BV, sorted_BK, jax.nn.logsumexp(sorted_BK, -1, keepdims=True), top_p
      )
    return logits_BV
  lse_B1 = jax.nn.logsumexp(logits_BV, axis=-1, keepdims=True)
  full = lambda x: _top_p(x, -jnp.sort(-x, axis=-1), lse_B1, top_p)
  if candidates >= v:
    return full(logits_BV)
  top_BC = jax.lax.top_k(logits_BV, candidates)[0]
  fits = jnp.all(jnp.sum(jnp.exp(top_BC - lse_B1), axis=-1) >= top_p)
  return jax.lax.cond(fits, lambda x: _top_p(x, top_BC, lse_B1, top_p), full, logits_BV)


def _top_p(logits_BV, sorted_BK, lse_B1, top_p):
  """Keeps the tokens whose probability mass strictly above them is < top_p; `sorted_BK` are the
  largest logits in descending order (holding the whole top-p set), lse_B1 the normalizer."""
  probs_BK = jnp.exp(sorted_BK - lse_B1)
  mass_above_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
  keep_BK = mass_above_BK < top_p  # the most likely token is always kept
  threshold_B1 = jnp.min(jnp.where(keep_BK, sorted_BK, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def sample(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row; returns (tokens [B] int32, logprob [B] f32 under the distribution
  sampled: temperature and truncation applied, 0 when greedy)."""
  logits_BV = logits_BV.astype(jnp.float32)
  # logprob of one token = its logit - logsumexp: no [B, V] log-softmax is materialized
  pick = lambda x_BV, t_B: jnp.take_along_axis(x_BV, t_B[:, None], axis=-1)[:, 0]
  if sampling.greedy:
    tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    sampled_lp_B = jnp.zeros(tokens_B.shape, jnp.float32)  # a point mass
  else:
    warped_BV = truncate(logits_BV / sampling.temperature, sampling.top_p, sampling.top_k)
    tokens_B = jax.random.categorical(key, warped_BV, axis=-1).astype(jnp.int32)
    sampled_lp_B = pick(warped_BV, tokens_B) - jax.nn.logsumexp(warped_BV, axis=-1)
  return tokens_B, sampled_lp_B
