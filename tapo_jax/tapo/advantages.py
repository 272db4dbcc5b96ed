"""Decoupled Advantage Estimation and the GRPO reward/row extras (overlong penalty, zero variance).

Legend: R rows.

Originals are normalized within their query's group (the K samples, group id q); constructions
within G_ref: all constructions of the batch (scope "batch") or those of the same source query
(scope "query"). Constructions never enter the originals' statistics. The std is the *unbiased*
sample std (divide by n - 1, torch's default, as in common GRPO implementations); a group of one
row has std 0. A = (r - mean) / (std + eps), and exactly 0 in a group of std 0 (also when eps = 0).

Baseline "orig" (an option of this project, not the paper's): a construction's advantage is
r - mean(G_orig of its source query), unnormalized. The originals' statistics are untouched; it
gives the rule-based `divergence` construction a signal, whose rows all end correct (so G_ref
has zero variance and the "group" baseline gives them advantage 0).

Baseline "joint" is the ablation DAE exists to avoid: a construction joins its source query's
group, G_orig ∪ G_ref(q), normalized together — the constructions then shift the originals' mean
and std (the contamination the paper measures).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REF_SCOPES = ("batch", "query")  # tapo.ref_scope
REF_BASELINES = ("group", "orig", "joint")  # tapo.ref_baseline


def n_queries(group_ids: jax.Array, is_constructed: jax.Array) -> jax.Array:
  """Q: originals have group ids 0..Q-1, constructions Q + their source query."""
  return jnp.max(jnp.where(is_constructed, -1, group_ids)) + 1


def dae_groups(
  group_ids: jax.Array, is_constructed: jax.Array, scope: str = "batch", baseline: str = "group"
) -> jax.Array:
  """[R] statistics group of each row in [0, 2R]: originals keep their id, constructions are
  shifted past every original id (scope batch: all into one group); with baseline "joint" a
  construction takes its source query's id."""
  if baseline == "joint":
    source = group_ids - n_queries(group_ids, is_constructed)
    return jnp.where(is_constructed, source, group_ids).astype(jnp.int32)
  r = group_ids.shape[0]
  ref = r + (group_ids if scope == "query" else jnp.zeros_like(group_ids))
  return jnp.where(is_constructed, ref, group_ids).astype(jnp.int32)


def group_stats(values: jax.Array, groups: jax.Array, weight: jax.Array):
  """Per-row (mean, unbiased std, count) of `values` over the rows of its group with weight."""
  n_seg = 2 * values.shape[0] + 1
  w = weight.astype(jnp.float32)
  count = jax.ops.segment_sum(w, groups, n_seg)
  mean = jax.ops.segment_sum(w * values, groups, n_seg) / jnp.maximum(count, 1.0)
  dev = (values - mean[groups]) * w
  var = jax.ops.segment_sum(dev * dev, groups, n_seg) / jnp.maximum(count - 1.0, 1.0)
  std = jnp.where(count >= 2, jnp.sqrt(var), 0.0)
  return mean[groups], std[groups], count[groups]


def decoupled_advantages(
  rewards: jax.Array,
  group_ids: jax.Array,
  is_constructed: jax.Array,
  valid: jax.Array,
  scope: str = "batch",
  eps: float = 1e-6,
  keep_failed: bool = True,
  baseline: str = "group",
) -> jax.Array:
  """[R] advantages: originals over their query's group, constructions over G_ref (baseline
  "group") or against their source query's originals' mean reward (baseline "orig"); "joint":
  both over G_orig ∪ G_ref of the query (the ablation).

  Invalid rows, and failed constructions (reward <= 0) when not `keep_failed`, get advantage 0
  and are left out of every statistic."""
  rewards = rewards.astype(jnp.float32)
  rows = included_rows(rewards, is_constructed, valid, keep_failed)
  groups = dae_groups(group_ids, is_constructed, scope, baseline)
  mean, std, _ = group_stats(rewards, groups, rows)
  adv = jnp.where(rows & (std > 0), (rewards - mean) / (std + eps), 0.0)
  if baseline in ("group", "joint"):
    return adv
  orig = rows & ~is_constructed
  n_seg = 2 * rewards.shape[0] + 1
  seg = jnp.where(orig, group_ids, n_seg - 1)
  count = jax.ops.segment_sum(orig.astype(jnp.float32), seg, n_seg)
  orig_mean = jax.ops.segment_sum(jnp.where(orig, rewards, 0.0), seg, n_seg) / jnp.maximum(count, 1)
  src = jnp.clip(group_ids - n_queries(group_ids, is_constructed), 0, n_seg - 1)
  ref = jnp.where(rows & (count[src] > 0), rewards - orig_mean[src], 0.0)
  return jnp.where(is_constructed, ref, adv)


def included_rows(
  rewards: jax.Array, is_constructed: jax.Array, valid: jax.Array, keep_failed: bool = True
) -> jax.Array:
  """[R] rows that take part in the advantage statistics and the loss."""
  if keep_failed:
    return valid
  return valid & ~(is_constructed & (rewards <= 0.0))


def zero_variance_rows(rewards: jax.Array, groups: jax.Array, rows: jax.Array) -> jax.Array:
  """[R] rows whose statistics group has all-equal rewards (they carry no learning signal)."""
  _, std, _ = group_stats(rewards.astype(jnp.float32), groups, rows)
  return rows & (std == 0.0)


def overlong_penalty(
  response_lens: jax.Array, max_new_tokens: int, buffer: int, factor: float
) -> jax.Array:
  """[R] DAPO soft overlong penalty (<= 0): 0 up to max - buffer, then linear down to -factor
  at max_new_tokens, -factor beyond."""
  if factor == 0.0:
    return jnp.zeros(response_lens.shape, jnp.float32)
  start = max_new_tokens - buffer
  over = (response_lens.astype(jnp.float32) - start) / max(buffer, 1)
  return -factor * jnp.clip(over, 0.0, 1.0)


def ref_stats(advantages: jax.Array, rows: jax.Array) -> dict[str, jax.Array]:
  """Mean / std (population) / min / max of A over `rows` (e.g. the included constructions)."""
  w = rows.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  mean = (advantages * w).sum() / n
  std = jnp.sqrt((((advantages - mean) * w) ** 2).sum() / n)
  return {
    "tapo/adv_ref_mean": mean,
    "tapo/adv_ref_std": std,
    "tapo/adv_ref_min": jnp.where(rows.any(), jnp.min(jnp.where(rows, advantages, jnp.inf)), 0.0),
    "tapo/adv_ref_max": jnp.where(rows.any(), jnp.max(jnp.where(rows, advantages, -jnp.inf)), 0.0),
  }
