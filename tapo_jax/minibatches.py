"""The split of a step's sequences into minibatches of packed micro-batches, and the minibatches
put on the mesh once; the RL loop (GRPO/TAPO and OPSD's paired rows), SFT, the planner and
bench aot all lay out their batches here.

Legend: N sequences, n minibatches, M micro-batches per minibatch, m rows per micro-batch, W row
width.

A minibatch is [M, m, W] with M fixed for a config (`micro_batches_bound`: enough for the worst
case, one sequence per row), so the update and π_old compile once. Sequences are dealt to the
minibatches by `deal` (originals and constructions separately, so each minibatch keeps L_ref's
weight λ relative to L_orig), packed into rows by `tapo.batch.pack_rows` (first-fit decreasing),
rows filling the micro-batches in order; `make_relayout` deals them anew for another epoch on the
mesh, without a host round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tapo_jax import sharding
from tapo_jax.tapo import batch as batch_lib


def split_micro_batches(batch, micro_batch: int):
  """[R, ...] leaves -> [R / micro_batch, micro_batch, ...] (R must be divisible)."""

  def one(x):
    r = x.shape[0]
    if r % micro_batch:
      raise ValueError(f"batch of {r} rows is not divisible by micro_batch={micro_batch}")
    return x.reshape((r // micro_batch, micro_batch) + x.shape[1:])

  return jax.tree.map(one, batch)


def rows_per_micro_batch(tokens: int, width: int, data_parallel: int = 1) -> int:
  """m: the rows of `width` tokens a micro-batch of `tokens` holds (at least one), rounded up to
  a multiple of the data-parallel size so every device gets whole rows."""
  m = max(1, tokens // width)
  return -(-m // data_parallel) * data_parallel


def micro_batches_bound(num_sequences: int, n: int, m: int) -> int:
  """M: micro-batches a minibatch needs in the worst case (one sequence per row), when `n`
  minibatches are dealt from `num_sequences` sequences as `deal` does (±1 of each kind)."""
  per_minibatch = -(-num_sequences // n) + (1 if n > 1 else 0)
  return max(1, -(-per_minibatch // m))


def deal(constructed: np.ndarray, key: jax.Array, n: int, keep=None) -> list[np.ndarray]:
  """`n` minibatches of sequence indices (sorted; only those in `keep`, default all): a random
  order of the sequences, originals and constructions dealt to the minibatches separately, so
  each minibatch holds 1/n of each (±1) and L_ref keeps its weight λ relative to L_orig in every
  update, not only on average. The permutation is of all the sequences (a fixed size: one
  compilation)."""
  constructed = np.asarray(constructed, bool)
  perm = np.asarray(jax.random.permutation(key, constructed.size))
  if keep is not None:
    perm = perm[np.asarray(keep, bool)[perm]]
  order = np.concatenate([perm[~constructed[perm]], perm[constructed[perm]]])
  return [np.sort(order[i::n]) for i in range(n)]


def layout_minibatches(
  lengths, trained, constructed, key: jax.Array, n: int, m: int, width, num_micro: int
):
  """The step's packed layout [n, M = num_micro, m, W = width]: the trained sequences (those with a
  loss token; the others change no loss term or metric and are left out) dealt to `n`
  minibatches (`deal`), each minibatch's packed into rows (`pack_rows`), rows filling its
  micro-batches in order.

  Pairs (algorithm=opsd): `lengths` [N, D] and `width` D ints give D layouts (a tuple) with the
  same sources and rows, row r of each holding the same sequences (`pack_rows` on pairs)."""
  lengths = np.asarray(lengths)
  source, row, start = [], [], []
  for i, src in enumerate(deal(constructed, key, n, keep=trained)):
    r, c, used = batch_lib.pack_rows(lengths[src], width)
    if used > num_micro * m:
      raise ValueError(f"minibatch {i}: {used} packed rows do not fit {num_micro} x {m}")
    source.append(src), row.append(r + i * num_micro * m), start.append(c)
  source, row, start = (np.concatenate(x).astype(np.int64) for x in (source, row, start))
  if lengths.ndim == 1:
    return batch_lib.Layout(source, row, start, lengths[source], (n, num_micro, m, width))
  return tuple(
    batch_lib.Layout(source, row, start[:, d], lengths[source, d], (n, num_micro, m, w))
    for d, w in enumerate(width)
  )


def packed_minibatches(train, layout, mesh, pack=batch_lib.pack) -> list:
  """`train` (a padded TrainBatch, host arrays, the same on every process) gathered into the
  layout by `pack` (algorithm=opsd: `opsd.batch.pack`, a PairLayout) and put on `mesh` once: `n`
  minibatches [M, m, W] (rows over the data axes), the loss terms scaled by n so each update has
  the whole step's weight."""
  n = layout.shape[0]
  packed = pack(train, layout)
  packed = packed.replace(loss_scale=packed.loss_scale * n)
  if hasattr(packed, "distill_scale"):  # the divergence term (tapo_jax/opsd)
    packed = packed.replace(distill_scale=packed.distill_scale * n)
  out = []
  for i in range(n):
    part = jax.tree.map(lambda x, i=i: x[i], packed)
    out.append(sharding.put_global(part, sharding.batch_shardings(part, mesh, row_axis=1)))
  return out


def make_relayout(mesh):
  """`relayout(parts, layout, old) -> parts`: minibatches laid out by `old` gathered into
  `layout` on the mesh (the same sequences, dealt and packed anew; no host round trip)."""

  @jax.jit
  def gather(parts, index_NMmW):
    flat = jax.tree.map(lambda *xs: jnp.concatenate([x.reshape(-1) for x in xs]), *parts)
    pad = index_NMmW < 0
    spec = (None, None, "batch", None)

    def take(x):
      out = jnp.where(pad, jnp.zeros((), x.dtype), x[jnp.maximum(index_NMmW, 0)])
      return jax.lax.with_sharding_constraint(out, sharding.named_sharding(mesh, spec, out.shape))

    out = jax.tree.map(take, flat)
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(index_NMmW.shape[0])]

  def relayout(parts, layout: batch_lib.Layout, old: batch_lib.Layout):
    w = old.shape[3]
    where = np.zeros(int(old.source.max(initial=0)) + 1, np.int64)
    where[old.source] = old.row * w + old.start  # each sequence's first slot in `parts`
    index = layout.index(where[layout.source]).astype(np.int32)
    index = sharding.put_global(index, sharding.batch_shardings(index, mesh, row_axis=2))
    seg = layout.segment_ids()  # ids number the sequences of a row: the new rows' own
    seg = sharding.put_global(seg, sharding.batch_shardings(seg, mesh, row_axis=2))
    return [p.replace(segment_ids=seg[i]) for i, p in enumerate(gather(parts, index))]

  return relayout
