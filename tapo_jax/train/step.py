"""The one jitted update, π_old, and the split of a step's sequences into minibatches of packed
micro-batches.

Legend: n minibatches, M micro-batches per minibatch, m rows per micro-batch, W row width.

`loss_fn(model, micro_batch) -> (loss, metrics)` must be *additive* over micro-batches: the batch
carries its global normalizers, so the sum of the micro-batch losses is the full-batch loss (and
the gradient of the sum is the full-batch gradient, whatever the micro-batch count or layout).

Micro-batches hold a token budget: m rows of W tokens, each row packed with whole sequences
(`tapo.batch.pack_rows`), so each holds about the same work whatever the sequences' lengths. A
minibatch is [M, m, W] with M fixed for a config (enough for the worst case, one sequence per
row), so the update and π_old compile once; micro-batches with no sequence are skipped at run time
(`lax.cond`), so the fixed M costs nothing when the sequences are short.

Gradients: each micro-batch's gradient is cast to float32 and constrained to the parameters'
sharding before it is added to the float32 accumulator, which has that same sharding, so the
cross-device sum of a micro-batch's gradient is scattered into each device's shard and no
replicated full-size gradient is carried (CPU's compiled HLO writes that reduce-scatter as
all-reduce + dynamic-slice; GPU and TPU compilers fuse the pair). The sum across devices is in
the dtype of the weight-gradient matmul's output: float32 with float32 compute; with bfloat16
compute, bfloat16 partial sums cast to float32 only for the accumulation.

An update is skipped (params and optimizer state unchanged, `skipped` counted) when the loss, the
gradient norm or the updated params are not finite, or when the update is larger than
`max_update_ratio` times the params' norm (an exploding step: a bad learning rate, a broken
batch). Skipped updates never reach a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tapo_jax import sharding
from tapo_jax.models import logprobs as logprobs_lib
from tapo_jax.tapo import batch as batch_lib
from tapo_jax.train.state import TrainState


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
  lengths, trained, constructed, key: jax.Array, n: int, m: int, width: int, num_micro: int
) -> batch_lib.Layout:
  """The step's packed layout [n, M = num_micro, m, W = width]: the trained sequences (those with a
  loss token; the others change no loss term or metric and are left out) dealt to `n`
  minibatches (`deal`), each minibatch's packed into rows (`pack_rows`), rows filling its
  micro-batches in order."""
  lengths = np.asarray(lengths)
  source, row, start = [], [], []
  for i, src in enumerate(deal(constructed, key, n, keep=trained)):
    r, c, used = batch_lib.pack_rows(lengths[src], width)
    if used > num_micro * m:
      raise ValueError(f"minibatch {i}: {used} packed rows do not fit {num_micro} x {m}")
    source.append(src), row.append(r + i * num_micro * m), start.append(c)
  source, row, start = (np.concatenate(x).astype(np.int64) for x in (source, row, start))
  return batch_lib.Layout(source, row, start, lengths[source], (n, num_micro, m, width))


def packed_minibatches(train, layout: batch_lib.Layout, mesh) -> list:
  """`train` (a padded TrainBatch, host arrays, the same on every process) gathered into the
  layout and put on `mesh` once: `n` minibatches [M, m, W] (rows over the data axes), the loss
  scaled by n so each update has the whole step's weight."""
  n = layout.shape[0]
  packed = batch_lib.pack(train, layout)
  packed = packed.replace(loss_scale=packed.loss_scale * n)
  out = []
  for i in range(n):
    part = jax.tree.map(lambda x, i=i: x[i], packed)
    out.append(sharding.put_global(part, sharding.batch_shardings(part, mesh, row_axis=1)))
  return out


def padded_minibatches(batch, key: jax.Array, n: int, m: int, mesh) -> list:
  """algorithm=opsd (its teacher rows are not packed): the step's padded rows (host arrays, one
  sequence per row, the same on every process) dealt like `deal` into `n` minibatches
  [M, m, T] on `mesh`, zero rows filling each minibatch's last micro-batch, loss terms scaled by
  n so each update has the whole step's weight. n = 1 keeps the rows in order."""
  out = []
  for idx in deal(np.asarray(batch.is_constructed)[:, 0], key, n):
    pad = -len(idx) % m
    part = jax.tree.map(
      lambda x, idx=idx, pad=pad: np.concatenate([x[idx], np.zeros((pad, *x.shape[1:]), x.dtype)]),
      batch,
    )
    part = part.replace(loss_scale=part.loss_scale * n)
    if hasattr(part, "distill_scale"):  # the divergence term (tapo_jax/opsd)
      part = part.replace(distill_scale=part.distill_scale * n)
    part = split_micro_batches(part, m)
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


def _combine(name: str):
  """How a metric of micro-batches adds up to the batch's: a sum, or a max for "*_max"."""
  return jnp.maximum if name.endswith("_max") else jnp.add


def is_empty(micro) -> jax.Array:
  """A micro-batch with no loss token (a TrainBatch or an SFT batch): the update skips it."""
  mask = micro["loss_mask"] if isinstance(micro, dict) else micro.loss_mask
  return ~jnp.any(mask)


def make_train_step(
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  loss_fn: Callable,
  state_sharding=None,
  max_update_ratio: float = 0.0,
  skip: Callable | None = is_empty,
):
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

  `batch` leaves are [M, micro_batch, ...]; M micro-batches are scanned and their float32
  gradients summed into accumulators sharded like the params; a micro-batch for which
  `skip(micro)` holds is not computed (None: every one is). `max_update_ratio` 0 turns the
  exploding-update guard off."""

  def grads_of(params, micro):
    def f(p):
      return loss_fn(nnx.merge(graphdef, p), micro)

    return jax.value_and_grad(f, has_aux=True)(params)

  def as_accumulator(grads):
    """float32, in the params' sharding (the reduce of a micro-batch's gradient scatters)."""
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    if state_sharding is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, state_sharding.params)

  def train_step(state: TrainState, batch):
    def add(carry, micro):
      loss_acc, grads_acc, metrics_acc = carry
      (loss, metrics), grads = grads_of(state.params, micro)
      grads_acc = jax.tree.map(jnp.add, grads_acc, as_accumulator(grads))
      metrics_acc = {k: _combine(k)(metrics_acc[k], v) for k, v in metrics.items()}
      return loss_acc + loss, grads_acc, metrics_acc

    def body(carry, micro):
      if skip is None:
        return add(carry, micro), None
      return jax.lax.cond(skip(micro), lambda c, _: c, add, carry, micro), None

    first = jax.tree.map(lambda x: x[0], batch)
    metrics_shape = jax.eval_shape(lambda: grads_of(state.params, first)[0][1])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
    init = (jnp.zeros((), jnp.float32), as_accumulator(zeros(state.params)), zeros(metrics_shape))
    (loss, grads, metrics), _ = jax.lax.scan(body, init, batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)  # optax's dtypes

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    update_norm = optax.tree.norm(updates)
    param_norm = optax.tree.norm(state.params)
    new_norm = optax.tree.norm(params)  # inf or NaN when any updated param is
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    ok &= jnp.isfinite(new_norm)
    if max_update_ratio > 0:
      ok &= update_norm <= max_update_ratio * jnp.maximum(param_norm, 1e-12)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(
      step=state.step + ok.astype(jnp.int32),
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = dict(
      metrics,
      loss=loss,
      grad_norm=grad_norm,
      update_norm=update_norm,
      skipped=(~ok).astype(jnp.int32),
    )
    return new_state, metrics

  shardings = {}
  if state_sharding is not None:
    shardings = dict(in_shardings=(state_sharding, None), out_shardings=(state_sharding, None))
  return jax.jit(train_step, donate_argnums=0, **shardings)


def make_old_logprobs(graphdef, chunk: int, temperature: float = 1.0):
  """Jitted π_old [M, m, W] of a minibatch's packed micro-batches (a TrainBatch [M, m, W]) under
  `params`, one micro-batch at a time; micro-batches with no sequence are skipped (zeros)."""

  @jax.jit
  def old_logprobs(params, batch):
    def one(xs):
      tokens, positions, segment_ids = xs

      def run(_):
        model = nnx.merge(graphdef, params)
        model.remat = False  # forward only: nothing to rematerialize (nnx.remat under cond fails)
        return logprobs_lib.logprobs(model, tokens, positions, chunk, temperature, segment_ids)

      empty = lambda _: jnp.zeros(tokens.shape, jnp.float32)  # noqa: E731
      return jax.lax.cond(jnp.any(segment_ids > 0), run, empty, None)

    return jax.lax.map(one, (batch.tokens, batch.positions, batch.segment_ids))

  return old_logprobs
