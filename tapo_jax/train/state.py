"""The train state and optimizer: built sharded, never materialized on one device first (the
policy they start from: tapo_jax/policy.py)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tapo_jax import sharding


@flax.struct.dataclass
class TrainState:
  """Everything an update changes; donated to and returned by the jitted step."""

  step: jax.Array  # [] int32  optimizer updates applied
  params: nnx.State  # the model's nnx.Param state (master weights)
  opt_state: optax.OptState
  skipped: jax.Array  # [] int32  updates skipped for a non-finite loss, gradient or update


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to 10% of the peak, after global-norm clipping."""
  warmup = max(0, min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0)))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0 if warmup else optim_cfg.lr,
    peak_value=optim_cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=0.1 * optim_cfg.lr,
  )
  chain = [optax.adamw(schedule, optim_cfg.b1, optim_cfg.b2, weight_decay=optim_cfg.weight_decay)]
  if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(optim_cfg.grad_clip))
  return optax.chain(*chain)


def init_state(
  params: nnx.State, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, TrainState]:
  """(state, state_sharding) for params already placed on `mesh`; the optimizer state is
  created directly in its sharding."""
  params_sharding = sharding.param_shardings(params, mesh)
  opt_sharding = sharding.opt_shardings(optimizer, params, params_sharding, mesh)
  replicated = sharding.replicated(mesh)
  state_sharding = TrainState(
    step=replicated, params=params_sharding, opt_state=opt_sharding, skipped=replicated
  )
  opt_state = jax.jit(optimizer.init, out_shardings=opt_sharding)(params)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # noqa: E731 (no aliasing)
  state = TrainState(step=zero(), params=params, opt_state=opt_state, skipped=zero())
  return state, state_sharding


def create(model: nnx.Module, mesh: Mesh, optimizer: optax.GradientTransformation):
  """(graphdef, state, state_sharding) for `model`, whose params are already placed on `mesh`."""
  graphdef, params = nnx.split(model, nnx.Param)
  state, state_sharding = init_state(params, optimizer, mesh)
  return graphdef, state, state_sharding
