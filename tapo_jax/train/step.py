"""The one jitted update and π_old, over minibatches of packed micro-batches
(tapo_jax/minibatches.py splits a step's sequences into them).

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
import optax
from flax import nnx

from tapo_jax.models import logprobs as logprobs_lib
from tapo_jax.train.state import TrainState


def _combine(name: str):
  """How a metric of micro-batches adds up to the batch's: a sum, or a max for "*_max"."""
  return jnp.maximum if name.endswith("_max") else jnp.add


def is_empty(micro) -> jax.Array:
  """A micro-batch with no loss token (a TrainBatch or an SFT batch) and no distilled token (an
  OPSD batch, whose divergence term reads no loss mask): the update skips it."""
  mask = micro["loss_mask"] if isinstance(micro, dict) else micro.loss_mask
  distill = getattr(micro, "distill_mask", None)
  return ~jnp.any(mask) if distill is None else ~(jnp.any(mask) | jnp.any(distill))


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
