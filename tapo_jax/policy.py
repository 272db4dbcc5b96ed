"""The policy every mode starts from: the model directory a config names, the meshes, and the
model sharded over the training mesh with its tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tapo_jax import sharding, toy
from tapo_jax.models import load_pretrained


def model_dir(cfg) -> str:
  """The local HF directory of the policy: config.model.path, else the shipped checkpoint of the
  toy domain config.model.toy. `cfg` is a config or a run's recorded config (a dict); ValueError
  when neither names a model."""
  model = cfg.get("model") or {}
  if model.get("path"):
    return model["path"]
  if model.get("toy"):
    return str(toy.checkpoint_dir(model["toy"]))
  raise ValueError("no model: model.path and model.toy are both empty")


def meshes(cfg) -> tuple[Mesh, Mesh]:
  """(training mesh, samplers' devices): one mesh over every device (config.mesh) for both, or,
  with rollout.sampler_devices = N, the first N devices for the samplers (the engines lay them out
  in their decode layout) and config.mesh over the rest."""
  n = int(cfg.rollout.sampler_devices)
  if not n:
    mesh = sharding.make_mesh(dict(cfg.mesh))
    return mesh, mesh
  devices = jax.devices()
  trainer = sharding.make_mesh(dict(cfg.mesh), devices[n:])
  return trainer, sharding.make_mesh({"data": -1}, devices[:n])


def load_policy(cfg):
  """(training mesh, model sharded over it, tokenizer) from the local model directory."""
  import transformers  # here: validate and plan read model_dir without loading transformers

  mesh = meshes(cfg)[0]
  path = model_dir(cfg)
  with jax.set_mesh(mesh):
    model = load_pretrained(
      path,
      dtype=jnp.dtype(cfg.model.dtype),
      param_dtype=jnp.dtype(cfg.model.param_dtype),
      mesh=mesh,
      remat=cfg.model.remat,
      attention_impl=cfg.model.attention_impl or None,
    )
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  return mesh, model, tokenizer
