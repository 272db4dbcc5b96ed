"""Decoupled advantages (hand-computed), their invariants, and the GRPO reward extras."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tapo_jax.tapo.advantages import (
  decoupled_advantages,
  group_stats,
  overlong_penalty,
  zero_variance_rows,
)


def dae(rewards, groups, constructed, valid=None, **kw):
  n = len(rewards)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid)
  return np.asarray(
    jax.jit(functools.partial(decoupled_advantages, **kw))(
      jnp.asarray(rewards, jnp.float32),
      jnp.asarray(groups, jnp.int32),
      jnp.asarray(constructed, bool),
      jnp.asarray(valid),
    )
  )


def test_originals_hand_computed_unbiased_std():
  # group 0: [1,0,0,0] mean .25, sample std sqrt(.75/3) = .5; group 1: [1,1,0,0] std sqrt(1/3)
  a = dae([1, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1], [0] * 8, eps=0.0)
  s = np.sqrt(1 / 3)
  np.testing.assert_allclose(a, [1.5, -0.5, -0.5, -0.5, 0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s])


def test_eps_is_added_to_std():
  a = dae([1, 0], [0, 0], [0, 0], eps=0.5)
  s = np.sqrt(0.5)
  np.testing.assert_allclose(a, [0.5 / (s + 0.5), -0.5 / (s + 0.5)], rtol=1e-6)


def test_adding_constructions_leaves_original_advantages_unchanged():
  orig_r, orig_g = [1, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]
  base = dae(orig_r, orig_g, [0] * 8)
  more = dae(orig_r + [1, 1, 0, 1], orig_g + [2, 2, 3, 3], [0] * 8 + [1] * 4)
  np.testing.assert_array_equal(more[:8], base)


def test_zero_variance_group_gives_zero_advantage():
  a = dae([1, 1, 1, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 2, 2], [0] * 6 + [1, 1])
  np.testing.assert_array_equal(a, np.zeros(8))


def test_ref_scope_batch_vs_query_hand_computed():
  # originals: q0 [1,0], q1 [0,1]; constructions of q0: [1,0], of q1: [1,1]
  r = [1, 0, 0, 1, 1, 0, 1, 1]
  g = [0, 0, 1, 1, 2, 2, 3, 3]
  c = [0, 0, 0, 0, 1, 1, 1, 1]
  o = 1 / np.sqrt(0.5) * 0.5  # originals: ±0.5 / sqrt(.5)
  # batch: G_ref = [1,0,1,1], mean .75, sample std sqrt((3*.0625 + .5625)/3) = .5
  np.testing.assert_allclose(
    dae(r, g, c, scope="batch", eps=0.0), [o, -o, -o, o, 0.5, -1.5, 0.5, 0.5], rtol=1e-6
  )
  # query: q0's constructions [1,0] -> ±.5/sqrt(.5); q1's [1,1] -> 0
  np.testing.assert_allclose(
    dae(r, g, c, scope="query", eps=0.0), [o, -o, -o, o, o, -o, 0, 0], rtol=1e-6
  )


def test_dropping_failed_constructions_and_invalid_rows():
  r = [1, 0, 1, 0, 1, 0, 5]
  g = [0, 0, 2, 2, 3, 3, 0]
  c = [0, 0, 1, 1, 1, 1, 0]
  valid = [1, 1, 1, 1, 1, 1, 0]  # the last row pads the batch: ignored (its 5 would shift q0)
  keep = dae(r, g, c, valid, eps=0.0)
  s = np.sqrt(1 / 3)  # G_ref [1,0,1,0]: mean .5, sample std sqrt(1/3)
  o = 0.5 / np.sqrt(0.5)
  np.testing.assert_allclose(keep, [o, -o, 0.5 / s, -0.5 / s, 0.5 / s, -0.5 / s, 0], rtol=1e-6)
  drop = dae(r, g, c, valid, eps=0.0, keep_failed=False)
  # failed constructions leave G_ref: [1,1] -> zero variance -> 0; originals unchanged
  np.testing.assert_allclose(drop, [o, -o, 0, 0, 0, 0, 0], rtol=1e-6)


def test_group_stats_and_zero_variance_rows():
  vals = jnp.asarray([1.0, 3.0, 2.0, 2.0, 7.0])
  groups = jnp.asarray([0, 0, 1, 1, 2])
  mean, std, count = group_stats(vals, groups, jnp.ones(5, bool))
  np.testing.assert_allclose(mean, [2, 2, 2, 2, 7])
  np.testing.assert_allclose(std, [np.sqrt(2), np.sqrt(2), 0, 0, 0])  # single row: std 0
  np.testing.assert_array_equal(count, [2, 2, 2, 2, 1])
  zv = zero_variance_rows(vals, groups, jnp.asarray([1, 1, 1, 1, 0], bool))
  np.testing.assert_array_equal(zv, [False, False, True, True, False])


def test_overlong_penalty_hand_values():
  lens = jnp.asarray([10, 12, 14, 16, 20])
  p = overlong_penalty(lens, max_new_tokens=20, buffer=8, factor=1.0)
  np.testing.assert_allclose(p, [0, 0, -0.25, -0.5, -1.0])
  np.testing.assert_array_equal(overlong_penalty(lens, 20, 8, 0.0), np.zeros(5))


def test_orig_baseline_compares_constructions_with_their_query_originals():
  # Q=2, K=4: query 0 rewards [1,0,0,0] (mean .25), query 1 [1,1,0,0] (mean .5).
  # Constructions (group Q+q): two of query 0 (both correct), one of query 1 (wrong), one invalid.
  rewards = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1]
  groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]
  constructed = [0] * 8 + [1] * 4
  valid = [1] * 11 + [0]
  a = dae(rewards, groups, constructed, valid, eps=0.0, baseline="orig")
  group = dae(rewards, groups, constructed, valid, eps=0.0)
  np.testing.assert_allclose(a[:8], group[:8])  # originals are untouched
  np.testing.assert_allclose(a[8:], [0.75, 0.75, -0.5, 0.0])
  # The paper's group baseline: G_ref = {1, 1, 0} (batch scope), mean 2/3, std sqrt(1/3).
  s = np.sqrt(1 / 3)
  np.testing.assert_allclose(group[8:], [(1 / 3) / s, (1 / 3) / s, -(2 / 3) / s, 0.0], rtol=1e-6)


def test_joint_baseline_normalizes_constructions_with_their_query():
  # query 0: originals [1, 0, 0, 0] + its 2 constructions [1, 1]: one group of 6, mean 1/2,
  # sample std sqrt(1.5 / 5); query 1's originals [1, 1, 0, 0] alone (no construction)
  r = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1]
  g = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
  c = [0] * 8 + [1, 1]
  a = dae(r, g, c, eps=0.0, baseline="joint")
  s0, s1 = np.sqrt(1.5 / 5), np.sqrt(1 / 3)
  want = [0.5 / s0, -0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s1, 0.5 / s1, -0.5 / s1, -0.5 / s1]
  np.testing.assert_allclose(a, want + [0.5 / s0, 0.5 / s0], rtol=1e-6)
  # DAE keeps the originals as if there were no constructions
  dae_a = dae(r, g, c, eps=0.0, baseline="group")
  np.testing.assert_allclose(dae_a[:8], dae(r[:8], g[:8], c[:8], eps=0.0), rtol=1e-6)
  assert not np.allclose(a[:4], dae_a[:4])
