"""The jitted splicer against a plain-Python reference (hypothesis): empty parts, overflow."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.tapo.splice import splice

N = 3
WIDTHS = (6, 3, 5)  # source 1 is shared by all rows (leading dim 1), like a template
SHARED = (False, True, False)


def reference(data, starts, ends, out_len):
  """Python lists: concatenate clamped slices, truncate to out_len."""
  rows = []
  for i in range(N):
    toks, vals, segs = [], [], []
    for k, (tok, val) in enumerate(data):
      r = 0 if SHARED[k] else i
      w = WIDTHS[k]
      s = min(max(starts[k][i], 0), w)
      e = min(max(ends[k][i], s), w)
      toks += list(tok[r][s:e])
      vals += list(val[r][s:e])
      segs += [k] * (e - s)
    total = len(toks)
    rows.append((toks[:out_len], vals[:out_len], segs[:out_len], total > out_len))
  return rows


@st.composite
def cases(draw):
  data = []
  for w, shared in zip(WIDTHS, SHARED, strict=True):
    n = 1 if shared else N
    tok = draw(st.lists(st.integers(1, 1000), min_size=n * w, max_size=n * w))
    val = draw(st.lists(st.floats(-5, 5, width=32), min_size=n * w, max_size=n * w))
    data.append((np.array(tok, np.int32).reshape(n, w), np.array(val, np.float32).reshape(n, w)))
  idx = st.integers(-2, 8)  # out of range on both sides, start > end allowed
  starts = [draw(st.lists(idx, min_size=N, max_size=N)) for _ in WIDTHS]
  ends = [draw(st.lists(idx, min_size=N, max_size=N)) for _ in WIDTHS]
  return data, starts, ends


def check(data, starts, ends, out_len):
  sources = tuple(
    {"tok": jnp.asarray(t), "val": jnp.asarray(v), "flag": jnp.asarray(t % 2 == 0)} for t, v in data
  )
  out = splice(
    sources,
    tuple(jnp.asarray(s, jnp.int32) for s in starts),
    tuple(jnp.asarray(e, jnp.int32) for e in ends),
    out_len=out_len,
  )
  tok, val, flag = (np.asarray(out.values[k]) for k in ("tok", "val", "flag"))
  seg, pos, lens, over = map(np.asarray, (out.segment, out.positions, out.lengths, out.overflow))
  for i, (rt, rv, rs, ro) in enumerate(reference(data, starts, ends, out_len)):
    n = len(rt)
    assert lens[i] == n and over[i] == ro
    np.testing.assert_array_equal(tok[i, :n], rt)
    np.testing.assert_array_equal(val[i, :n], np.asarray(rv, np.float32))
    np.testing.assert_array_equal(flag[i, :n], np.asarray(rt) % 2 == 0)
    np.testing.assert_array_equal(seg[i, :n], rs)
    np.testing.assert_array_equal(pos[i, :n], np.arange(n))
    # padding is zero everywhere
    assert not tok[i, n:].any() and not val[i, n:].any() and not flag[i, n:].any()
    assert (seg[i, n:] == -1).all() and not pos[i, n:].any()


@settings(max_examples=40, deadline=None)
@given(cases())
def test_splice_matches_reference_with_overflow(case):
  check(*case, out_len=8)  # shorter than most totals: truncation and the flag


@settings(max_examples=30, deadline=None)
@given(cases())
def test_splice_matches_reference_at_maximum_length(case):
  check(*case, out_len=sum(WIDTHS))  # every total fits; full rows reach the last position


def test_splice_hand_case_all_parts_and_empty_middle():
  a = {"t": jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])}
  b = {"t": jnp.array([[9, 9]])}
  c = {"t": jnp.array([[10, 11, 12], [13, 14, 15]])}
  out = splice(
    (a, b, c),
    (jnp.array([0, 0]), jnp.array([0, 0]), jnp.array([1, 0])),
    (jnp.array([2, 4]), jnp.array([2, 0]), jnp.array([3, 3])),
    out_len=6,
  )
  np.testing.assert_array_equal(out.values["t"], [[1, 2, 9, 9, 11, 12], [5, 6, 7, 8, 13, 14]])
  np.testing.assert_array_equal(out.lengths, [6, 6])
  np.testing.assert_array_equal(out.overflow, [False, True])
  np.testing.assert_array_equal(out.segment, [[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 2, 2]])


def test_splice_exact_fit_is_not_overflow_and_one_more_is():
  rng = np.random.default_rng(0)
  data = [
    (rng.integers(1, 99, (n, w)).astype(np.int32), rng.normal(size=(n, w)).astype(np.float32))
    for w, n in zip(WIDTHS, (1 if s else N for s in SHARED), strict=True)
  ]
  full = [[0] * N for _ in WIDTHS]
  ends = [[w] * N for w in WIDTHS]
  check(data, full, ends, out_len=sum(WIDTHS))  # total == out_len: no overflow
  check(data, full, ends, out_len=sum(WIDTHS) - 1)  # one token too many: truncated, flagged


def test_splice_skips_zero_width_sources():
  out = splice(
    ({"t": jnp.zeros((1, 0), jnp.int32)}, {"t": jnp.array([[3, 4]])}),
    (jnp.array([0]), jnp.array([0])),
    (jnp.array([5]), jnp.array([2])),
    out_len=3,
  )
  np.testing.assert_array_equal(out.values["t"], [[3, 4, 0]])
  np.testing.assert_array_equal(out.segment, [[1, 1, -1]])
