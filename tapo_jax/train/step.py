"""The one jitted update: gradient accumulation over micro-batches, clipping, AdamW, NaN skip.

`loss_fn(model, micro_batch) -> (loss, metrics)` must be *additive* over micro-batches: the batch
carries its global normalizers, so the sum of the micro-batch losses is the full-batch loss (and
the gradient of the sum is the full-batch gradient, whatever the micro-batch count).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tapo_jax.train.state import TrainState


def split_micro_batches(batch, micro_batch: int):
  """[R, ...] leaves -> [R / micro_batch, micro_batch, ...] (R must be divisible)."""

  def one(x):
    r = x.shape[0]
    if r % micro_batch:
      raise ValueError(f"batch of {r} rows is not divisible by micro_batch={micro_batch}")
    return x.reshape((r // micro_batch, micro_batch) + x.shape[1:])

  return jax.tree.map(one, batch)


def make_train_step(
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  loss_fn: Callable,
  state_sharding=None,
  batch_sharding=None,
):
  """Returns the jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

  `batch` leaves are [M, micro_batch, ...]; M micro-batches are scanned and their gradients
  summed. A non-finite loss or gradient norm leaves params and optimizer state unchanged and
  increments `state.skipped`.
  """

  def grads_of(params, micro):
    def f(p):
      return loss_fn(nnx.merge(graphdef, p), micro)

    return jax.value_and_grad(f, has_aux=True)(params)

  def train_step(state: TrainState, batch):
    def body(carry, micro):
      loss_acc, grads_acc, metrics_acc = carry
      (loss, metrics), grads = grads_of(state.params, micro)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
      return (loss_acc + loss, grads_acc, metrics_acc), None

    first = jax.tree.map(lambda x: x[0], batch)
    metrics_shape = jax.eval_shape(lambda: grads_of(state.params, first)[0][1])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
    init = (jnp.zeros((), jnp.float32), zeros(state.params), zeros(metrics_shape))
    (loss, grads, metrics), _ = jax.lax.scan(body, init, batch)

    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(
      step=state.step + ok.astype(jnp.int32),
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.int32))
    return new_state, metrics

  shardings = {}
  if state_sharding is not None:
    shardings = dict(
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None)
    )
  return jax.jit(train_step, donate_argnums=0, **shardings)
