"""Mesh and the one table from logical axis names to mesh axes.

Parameters and key activations carry logical names ("embed", "heads", ...); `logical_to_spec`
turns a tuple of names into a `PartitionSpec` through RULES, and `constrain` applies it inside jit.
`tree_shardings` is the one place a tree of logical axes becomes NamedShardings: parameters
(`param_shardings`, from each nnx.Param's `logical_axes`), the optimizer state (`opt_shardings`,
through optax's own map over the parameter-shaped parts of the state), the engines' decode state
and the train batch (`batch_shardings`: rows over the data axes). No mesh axis name is used
outside this module.

The samplers have a layout of their own (DECODE_RULES on `decode_mesh`): a decode step reads every
weight once per token, so FSDP's per-layer all-gathers would run on every token (on a pod, 13-64x
the time of reading the weights). The decode mesh is (data, 1, tensor) over the same devices in
the same order: weights split over `tensor` (at most the kv heads, inside one host) and replicated
over `data`; the KV cache's slots split over data and its kv heads over tensor. The trainer's
params reach it by one jitted reshard per RL step (`tapo_jax.sampling.engines`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp"),
  "embed": "fsdp",  # parameters: FSDP shards the model dimension
  "act_embed": None,  # activations: the model dimension stays whole (batch takes fsdp)
  "heads": "tensor",
  "kv_heads": "tensor",
  "mlp": "tensor",
  "vocab": "tensor",
  "seq": None,
  "cache_seq": None,
  "head_dim": None,
  "layers": None,
  "norm": None,
}


# The samplers' table: no FSDP (the decode mesh has fsdp = 1), rows over the replicas.
DECODE_RULES = dict(RULES, batch="data", embed=None)


def mesh_shape(dims: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves {data, fsdp, tensor} sizes (one may be -1) against the device count."""
  unknown = set(dims) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(dims.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh: product of {dict(zip(MESH_AXES, sizes))} is {math.prod(sizes)}, "
      f"but there are {num_devices} devices"
    )
  return tuple(sizes)


def make_mesh(dims: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 fills the remainder."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dims or {"fsdp": -1}, len(devices))
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - odd topologies (or CPU) fall back to a plain reshape
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def decode_tensor(kv_heads: int, num_devices: int, per_host: int, requested: int = 0) -> int:
  """The decode layout's tensor-parallel size: `requested`, or (0) the largest divisor of the kv
  heads that divides the device count and fits inside one host (so the per-token all-reduces of
  a tensor group stay on the host's ICI and every kv head lives on one chip)."""
  if requested:
    if kv_heads % requested or num_devices % requested:
      raise ValueError(
        f"rollout.decode_tensor={requested} must divide the kv heads ({kv_heads}) and the "
        f"sampler's devices ({num_devices})"
      )
    return requested
  return max(t for t in range(1, kv_heads + 1)
             if kv_heads % t == 0 and num_devices % t == 0 and t <= max(per_host, 1))  # fmt: skip


def decode_mesh(devices, tensor: int) -> Mesh:
  """The samplers' (data, 1, tensor) mesh over `devices` (a mesh: its devices in its order, so a
  jitted reshard from it needs no device reordering; tensor groups are runs of `tensor`
  consecutive devices, the trainer's own tensor groups when it has them)."""
  flat = np.asarray(devices.devices if isinstance(devices, Mesh) else devices).reshape(-1)
  if flat.size % tensor:
    raise ValueError(f"decode mesh: {flat.size} devices are not divisible by tensor={tensor}")
  return Mesh(flat.reshape(flat.size // tensor, 1, tensor), MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, rules: Mapping = RULES) -> PartitionSpec:
  """Logical axis names -> PartitionSpec; two dims on one mesh axis is an error."""
  if names is None:
    return PartitionSpec()
  out, used = [], set()
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise KeyError(f"no sharding rule for logical axis {name!r}")
    axes = rules[name]
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    clash = used.intersection(flat)
    if clash:
      raise ValueError(f"logical axes {tuple(names)} map two dims onto mesh axis {sorted(clash)}")
    used.update(flat)
    out.append(axes if not isinstance(axes, tuple) or len(axes) != 1 else axes[0])
  return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (e.g. 2 kv-heads on tensor=4)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    flat = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for a in flat:
      if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
        kept.append(a)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, names, shape, rules: Mapping = RULES) -> NamedSharding:
  """NamedSharding for an array of `shape` whose dims carry logical `names`."""
  return NamedSharding(mesh, fit_spec(logical_to_spec(names, rules), shape, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, against the mesh in context (no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names)
  out = []
  for dim, axes in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
    flat = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in flat)
    out.append(axes if flat and dim % size == 0 else None)
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*out))


def _is_axes(x) -> bool:
  return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree, rules: Mapping = RULES):
  """NamedSharding for every leaf of `shapes_tree` (arrays or ShapeDtypeStructs) from the
  logical-axes tuple at the same place of `axes_tree` (a prefix of it: tuples are leaves)."""
  return jax.tree.map(
    lambda axes, x: named_sharding(mesh, axes, x.shape, rules),
    axes_tree,
    shapes_tree,
    is_leaf=_is_axes,
  )


def param_shardings(params: nnx.State, mesh: Mesh, rules: Mapping = RULES) -> nnx.State:
  """The params' tree (nnx.Variables kept) with each value replaced by its NamedSharding, from
  the `logical_axes` metadata every parameter is created with."""
  axes = jax.tree.map(lambda v: v.replace(v.get_metadata().get("logical_axes")), params,
                      is_leaf=_is_variable)  # fmt: skip
  return tree_shardings(mesh, axes, params, rules)


def opt_shardings(optimizer: optax.GradientTransformation, params, params_sharding, mesh: Mesh):
  """Shardings of `optimizer`'s state: every copy of the parameter tree inside it (moments ...)
  sharded like the parameters, everything else (counts, scalars) replicated."""
  abstract = jax.eval_shape(optimizer.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
    optimizer, lambda _, s: s, abstract, params_sharding, transform_non_params=lambda _: replicated
  )


def batch_shardings(batch, mesh: Mesh, row_axis: int = 0):
  """Rows (dim `row_axis` of every leaf) over the data axes, the rest replicated."""

  def axes(x):
    names = [None] * x.ndim
    names[row_axis] = "batch"
    return tuple(names)

  return tree_shardings(mesh, jax.tree.map(axes, batch), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the rows of a batch are split (the mesh axes "batch" maps to)."""
  axes = RULES["batch"]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def mesh_of(tree) -> Mesh:
  """The mesh the arrays of `tree` live on (a one-device mesh for single-device arrays)."""
  leaf = jax.tree.leaves(tree)[0]
  s = leaf.sharding
  if isinstance(s, NamedSharding):
    return s.mesh
  return make_mesh({}, sorted(s.device_set, key=lambda d: d.id))


def to_host(tree):
  """numpy copies of every array of `tree`, also of global arrays whose shards live on other
  processes (gathered: every process must call this at the same point of the program)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def put_global(tree, shardings):
  """Host arrays (the same on every process) -> global arrays with `shardings`; each process
  places only the shards of its own devices."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings
  )
