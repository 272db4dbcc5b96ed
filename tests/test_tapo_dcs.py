"""Difficulty-aware Candidate Selection: eligibility, pair validity, determinism, uniformity."""

import jax
import jax.numpy as jnp
import numpy as np

from tapo_jax.tapo import dcs
from tapo_jax.tapo.dcs import dcs_metrics

select_candidates = jax.jit(dcs.select_candidates, static_argnums=(2, 3, 4))

# K = 8; rows: 2 correct (eligible), 1 correct, 5 correct / 3 wrong, 4/4 (eligible), 0, 8 correct
GRID = np.array(
  [
    [1, 0, 0, 1, 0, 0, 0, 0],
    [0, 0, 0, 1, 0, 0, 0, 0],
    [1, 1, 0, 1, 1, 0, 1, 0],
    [0, 1, 0, 1, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
  ],
  bool,
)


def test_eligibility_and_pair_counts():
  c = select_candidates(jnp.asarray(GRID), jax.random.key(0), 2, 4, 4)
  np.testing.assert_array_equal(c.eligible, [True, False, False, True, False, False])
  np.testing.assert_array_equal(c.valid.sum(1), [4, 0, 0, 4, 0, 0])
  m = dcs_metrics(c)
  np.testing.assert_allclose(float(m["tapo/eligible_rate"]), 2 / 6, rtol=1e-6)
  assert float(m["tapo/pairs"]) == 8


def test_pairs_are_distinct_wrongs_with_correct_partners_of_the_same_query():
  for seed in range(5):
    c = select_candidates(jnp.asarray(GRID), jax.random.key(seed), 2, 4, 4)
    neg, pos, valid = map(np.asarray, (c.neg, c.pos, c.valid))
    for q in np.flatnonzero(valid.any(1)):
      negs = neg[q][valid[q]]
      assert len(set(negs.tolist())) == len(negs)  # distinct
      assert not GRID[q, negs].any() and GRID[q, pos[q][valid[q]]].all()
    assert (neg[~valid] == 0).all() and (pos[~valid] == 0).all()


def test_fewer_wrongs_than_m_max_gives_all_of_them():
  grid = jnp.asarray([[1, 1, 0, 0, 1, 1]], bool)
  c = select_candidates(grid, jax.random.key(3), n_pos=1, n_neg=1, m_max=4)
  np.testing.assert_array_equal(c.valid, [[True, True, False, False]])
  assert sorted(np.asarray(c.neg)[0, :2].tolist()) == [2, 3]
  rows_neg, rows_pos = c.rows(6)
  assert rows_neg.shape == (4,) and set(np.asarray(rows_pos)[:2].tolist()) <= {0, 1, 4, 5}


def test_m_max_larger_than_k_is_padded_invalid():
  grid = jnp.asarray([[1, 0, 0]], bool)
  c = select_candidates(grid, jax.random.key(0), n_pos=1, n_neg=1, m_max=5)
  assert c.neg.shape == (1, 5)
  np.testing.assert_array_equal(c.valid, [[True, True, False, False, False]])


def test_deterministic_in_key():
  grid = jnp.asarray(GRID)
  a = select_candidates(grid, jax.random.key(7), 2, 4, 4)
  b = select_candidates(grid, jax.random.key(7), 2, 4, 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  outs = {
    tuple(np.asarray(select_candidates(grid, jax.random.key(s), 2, 4, 4).neg[0]).tolist())
    for s in range(8)
  }
  assert len(outs) > 1  # the key matters


def test_choice_of_wrongs_and_partners_is_uniform():
  grid = jnp.asarray(GRID[:1])  # wrongs {1,2,4,5,6,7}, corrects {0,3}
  keys = jax.random.split(jax.random.key(1), 600)
  c = jax.jit(jax.vmap(lambda k: dcs.select_candidates(grid, k)))(keys)
  neg = np.asarray(c.neg)[:, 0].reshape(-1)
  freq = np.bincount(neg, minlength=8)[[1, 2, 4, 5, 6, 7]] / 600
  np.testing.assert_allclose(freq, 4 / 6, atol=0.08)  # each wrong chosen w.p. M / #wrong
  pos = np.asarray(c.pos)[:, 0].reshape(-1)
  assert set(pos.tolist()) == {0, 3} and abs((pos == 0).mean() - 0.5) < 0.06
