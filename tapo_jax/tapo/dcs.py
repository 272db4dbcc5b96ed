"""Difficulty-aware Candidate Selection: which (wrong, correct) rollout pairs get a construction.

Legend: Q queries, K samples per query, M = m_max pairs per query.

A query is eligible iff it has >= n_pos correct and >= n_neg wrong rollouts. An eligible query
gets min(#wrong, M) pairs: the wrong rollouts are a uniformly random subset of distinct wrongs
(all of them, in random order, when there are <= M), each paired with a correct rollout of the
same query drawn uniformly and independently (with replacement across pairs). Shapes are fixed
([Q, M] with a valid mask), so this traces once inside jit; it is deterministic in `key`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Candidates:
  """Pairs as indices within each query's K samples; invalid slots hold index 0."""

  neg: jax.Array  # [Q, M] int32  index of the wrong rollout y⁻
  pos: jax.Array  # [Q, M] int32  index of the correct rollout y⁺
  valid: jax.Array  # [Q, M] bool
  eligible: jax.Array  # [Q] bool

  def rows(self, k: int) -> tuple[jax.Array, jax.Array]:
    """(neg, pos) as flat row indices [Q*M] into a prompt-major batch of K samples per query."""
    base = jnp.arange(self.neg.shape[0], dtype=jnp.int32)[:, None] * k
    return (base + self.neg).reshape(-1), (base + self.pos).reshape(-1)


def select_candidates(
  correct_QK: jax.Array, key: jax.Array, n_pos: int = 2, n_neg: int = 4, m_max: int = 4
) -> Candidates:
  """DCS over a [Q, K] bool grid of verifier outcomes."""
  correct = jnp.asarray(correct_QK, bool)
  q, k = correct.shape
  n_correct = correct.sum(axis=1)
  n_wrong = k - n_correct
  eligible = (n_correct >= n_pos) & (n_wrong >= n_neg) & (n_correct > 0) & (n_wrong > 0)
  key_neg, key_pos = jax.random.split(key)
  # Wrong rollouts first, in a random order; the first M of them are the chosen distinct wrongs.
  u = jax.random.uniform(key_neg, (q, k))
  order = jnp.argsort(jnp.where(correct, 1.0 + u, u), axis=1).astype(jnp.int32)
  m = min(m_max, k)
  neg = jnp.pad(order[:, :m], ((0, 0), (0, m_max - m)))
  g = jax.random.gumbel(key_pos, (q, m_max, k))
  pos = jnp.argmax(jnp.where(correct[:, None, :], g, -jnp.inf), axis=-1).astype(jnp.int32)
  slot = jnp.arange(m_max)[None, :]
  valid = eligible[:, None] & (slot < jnp.minimum(n_wrong, m)[:, None])
  return Candidates(
    neg=jnp.where(valid, neg, 0),
    pos=jnp.where(valid, pos, 0),
    valid=valid,
    eligible=eligible,
  )


def dcs_metrics(c: Candidates) -> dict[str, jax.Array]:
  """Eligible-query rate and pairs selected."""
  return {
    "tapo/eligible_rate": c.eligible.mean(),
    "tapo/pairs": c.valid.sum().astype(jnp.float32),
  }
