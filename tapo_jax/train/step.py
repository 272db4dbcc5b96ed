"""The one jitted update and the split of a step's batch into minibatches of micro-batches.

`loss_fn(model, micro_batch) -> (loss, metrics)` must be *additive* over micro-batches: the batch
carries its global normalizers, so the sum of the micro-batch losses is the full-batch loss (and
the gradient of the sum is the full-batch gradient, whatever the micro-batch count).

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
from tapo_jax.tapo import loss as loss_lib
from tapo_jax.train.state import TrainState


def split_micro_batches(batch, micro_batch: int):
  """[R, ...] leaves -> [R / micro_batch, micro_batch, ...] (R must be divisible)."""

  def one(x):
    r = x.shape[0]
    if r % micro_batch:
      raise ValueError(f"batch of {r} rows is not divisible by micro_batch={micro_batch}")
    return x.reshape((r // micro_batch, micro_batch) + x.shape[1:])

  return jax.tree.map(one, batch)


def minibatches(batch, key: jax.Array, n: int, micro_batch: int, mesh) -> list:
  """The step's rows (host arrays, the same on every process) in `n` shuffled minibatches, each
  [M, micro_batch, ...] placed on `mesh` (rows over the data axes), with the loss scaled so each
  update has the whole step's weight.

  Originals and constructions are dealt to the minibatches separately (each minibatch holds
  1/n of each, ±1 row), so L_ref keeps its weight λ relative to L_orig in every update, not
  only on average. R must be a multiple of n * micro_batch."""
  r = batch.num_rows
  if r % (n * micro_batch):
    raise ValueError(f"{r} rows do not split into {n} minibatches of micro_batch={micro_batch}")
  perm = np.asarray(jax.random.permutation(key, r))
  constructed = np.asarray(jax.device_get(batch.is_constructed))[perm]
  order = np.concatenate([perm[~constructed], perm[constructed]])
  take = lambda idx: jax.tree.map(lambda x: x[idx], batch)  # noqa: E731
  out = []
  for i in range(n):
    part = take(np.sort(order[i::n]))
    part = part.replace(loss_scale=part.loss_scale * n)
    if hasattr(part, "distill_scale"):  # algorithm=opsd: its divergence term (tapo_jax/opsd)
      part = part.replace(distill_scale=part.distill_scale * n)
    part = split_micro_batches(part, micro_batch)
    out.append(sharding.put_global(part, sharding.batch_shardings(part, mesh, row_axis=1)))
  return out


def _combine(name: str):
  """How a metric of micro-batches adds up to the batch's: a sum, or a max for "*_max"."""
  return jnp.maximum if name.endswith("_max") else jnp.add


def make_train_step(
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  loss_fn: Callable,
  state_sharding=None,
  max_update_ratio: float = 0.0,
):
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

  `batch` leaves are [M, micro_batch, ...]; M micro-batches are scanned and their gradients
  summed. `max_update_ratio` 0 turns the exploding-update guard off."""

  def grads_of(params, micro):
    def f(p):
      return loss_fn(nnx.merge(graphdef, p), micro)

    return jax.value_and_grad(f, has_aux=True)(params)

  def train_step(state: TrainState, batch):
    def body(carry, micro):
      loss_acc, grads_acc, metrics_acc = carry
      (loss, metrics), grads = grads_of(state.params, micro)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      metrics_acc = {k: _combine(k)(metrics_acc[k], v) for k, v in metrics.items()}
      return (loss_acc + loss, grads_acc, metrics_acc), None

    first = jax.tree.map(lambda x: x[0], batch)
    metrics_shape = jax.eval_shape(lambda: grads_of(state.params, first)[0][1])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
    init = (jnp.zeros((), jnp.float32), zeros(state.params), zeros(metrics_shape))
    (loss, grads, metrics), _ = jax.lax.scan(body, init, batch)

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


def make_old_logprobs(graphdef, chunk: int, micro_batch: int, temperature: float = 1.0):
  """Jitted π_old of a TrainBatch's rows under `params`, one micro-batch at a time."""

  @jax.jit
  def old_logprobs(params, tokens, positions):
    def one(xs):
      return loss_lib.logprobs(nnx.merge(graphdef, params), *xs, chunk, temperature)

    split = lambda x: x.reshape((-1, micro_batch) + x.shape[1:])  # noqa: E731
    return jax.lax.map(one, (split(tokens), split(positions))).reshape(tokens.shape)

  return old_logprobs
