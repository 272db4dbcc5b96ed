"""Train state, optimizer and shardings: built sharded, never materialized on one device first."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tapo_jax import sharding


@flax.struct.dataclass
class TrainState:
  """Everything an update changes; donated to and returned by the jitted step."""

  step: jax.Array  # [] int32  optimizer updates applied
  params: nnx.State  # the model's nnx.Param state (master weights)
  opt_state: optax.OptState
  skipped: jax.Array  # [] int32  updates skipped for a non-finite loss or gradient


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


def param_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
  """NamedSharding of every parameter, from its logical axes through the rules table."""
  state = nnx.state(model, nnx.Param)

  def one(v):
    return sharding.named_sharding(mesh, v.get_metadata().get("logical_axes"), v.shape)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _path_key(path) -> tuple:
  keys = (str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return tuple(k for k in keys if k != "value")  # nnx.Variable leaves add a trailing "value"


def tree_shardings_like_params(tree, params_sharding, mesh: Mesh):
  """Shardings for an optimizer-state tree: leaves whose path ends with a parameter's path get
  that parameter's sharding, everything else (counts, scalars) is replicated."""
  by_path = {_path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    key = _path_key(path)
    for n in range(len(key)):
      if key[n:] in by_path and getattr(leaf, "ndim", 0) > 0:
        return by_path[key[n:]]
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


def init_state(
  params: nnx.State, optimizer: optax.GradientTransformation, params_sharding, mesh: Mesh
) -> tuple[TrainState, TrainState]:
  """(state, state_sharding); the optimizer state is created directly in its sharding."""
  opt_abstract = jax.eval_shape(optimizer.init, params)
  opt_sharding = tree_shardings_like_params(opt_abstract, params_sharding, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
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
  state, state_sharding = init_state(params, optimizer, param_shardings(model, mesh), mesh)
  return graphdef, state, state_sharding
