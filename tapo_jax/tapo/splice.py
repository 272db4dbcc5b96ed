"""The splicer: concatenate token-range segments of padded rows into new padded rows, on device.

Legend: N output rows, W_k width of source k, L output length.

Segment k of output row i is `source_k[i, start_k[i] : end_k[i]]` (a source with leading dim 1 is
shared by every row, e.g. a template). Each source is a pytree of per-token arrays (tokens, sampler
logprobs, a from-learner mask ...); all sources have the same tree structure and leaf dtypes, and
every leaf is carried along with its segment. Output position p takes its value from the segment
whose cumulative range holds p: one gather per source with index arithmetic, vmapped over rows,
no host round trip. A row longer than L is truncated to L and flagged in `overflow`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Spliced:
  """Spliced rows: the carried values plus where each position came from."""

  values: Any  # pytree like each source, leaves [N, L]; 0 / False on padding
  segment: jax.Array  # [N, L] int32  index of the segment a position came from; -1 on padding
  positions: jax.Array  # [N, L] int32  0..length-1, 0 on padding
  lengths: jax.Array  # [N] int32  min(total, L)
  overflow: jax.Array  # [N] bool   the parts did not fit in L (the row is truncated)


def _splice_row(leaves_k, starts, ends, out_len):
  """One row: leaves_k[k] is the list of source k's leaves for this row ([W_k] each)."""
  widths = [leaves[0].shape[0] for leaves in leaves_k]
  lens, clamped = [], []
  for w, s, e in zip(widths, starts, ends, strict=True):
    s = jnp.clip(s, 0, w)
    e = jnp.clip(e, s, w)
    clamped.append(s)
    lens.append(e - s)
  lens = jnp.stack(lens)
  cum = jnp.cumsum(lens)
  offsets = cum - lens
  p = jnp.arange(out_len, dtype=jnp.int32)
  segment = jnp.sum(p[:, None] >= cum[None, :], axis=1).astype(jnp.int32)  # len(k) = padding
  n_seg = len(widths)
  out = [jnp.zeros((out_len,), leaf.dtype) for leaf in leaves_k[0]]
  for k, (w, s, leaves) in enumerate(zip(widths, clamped, leaves_k, strict=True)):
    if w == 0:  # an empty source (e.g. an empty template piece) contributes nothing
      continue
    idx = jnp.clip(p - offsets[k] + s, 0, w - 1)
    take = segment == k
    out = [jnp.where(take, leaf[idx], o) for leaf, o in zip(leaves, out, strict=True)]
  total = cum[-1]
  length = jnp.minimum(total, out_len).astype(jnp.int32)
  segment = jnp.where(segment < n_seg, segment, -1)
  positions = jnp.where(p < length, p, 0)
  return out, segment, positions, length, total > out_len


@functools.partial(jax.jit, static_argnames=("out_len",))
def splice(
  sources: Sequence[Any],
  starts: Sequence[jax.Array],
  ends: Sequence[jax.Array],
  *,
  out_len: int,
) -> Spliced:
  """Rows `concat_k source_k[i, start_k[i]:end_k[i]]` padded/truncated to `out_len`."""
  if not (len(sources) == len(starts) == len(ends)) or not sources:
    raise ValueError("splice needs one (start, end) per source and at least one source")
  treedef = jax.tree.structure(sources[0])
  leaves_k = []
  for src in sources:
    if jax.tree.structure(src) != treedef:
      raise ValueError("every splice source must have the same pytree structure")
    leaves_k.append(jax.tree.leaves(src))
  n = jnp.shape(starts[0])[0]
  leaves_k = [[jnp.broadcast_to(x, (n,) + x.shape[1:]) for x in leaves] for leaves in leaves_k]
  starts = jnp.stack([jnp.asarray(s, jnp.int32) for s in starts], axis=1)
  ends = jnp.stack([jnp.asarray(e, jnp.int32) for e in ends], axis=1)
  row = lambda lk, s, e: _splice_row(lk, list(s), list(e), out_len)  # noqa: E731
  out, segment, positions, lengths, overflow = jax.vmap(row)(leaves_k, starts, ends)
  return Spliced(
    values=jax.tree.unflatten(treedef, out),
    segment=segment,
    positions=positions,
    lengths=lengths,
    overflow=overflow,
  )
