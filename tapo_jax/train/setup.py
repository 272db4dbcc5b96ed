"""What every mode builds first from the config: the mesh, the policy model and its tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import transformers

from tapo_jax import sharding
from tapo_jax.models import load_pretrained
from tapo_jax.toy import arith

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_dir(cfg) -> str:
  """The local HF directory of the policy: config.model.path, else the shipped toy checkpoint."""
  return cfg.model.path or str(arith.CHECKPOINT_DIR)


def load_policy(cfg):
  """(mesh from config.mesh, model sharded over it, tokenizer) from the local model directory."""
  mesh = sharding.make_mesh(dict(cfg.mesh))
  path = model_dir(cfg)
  with jax.set_mesh(mesh):
    model = load_pretrained(
      path,
      dtype=DTYPES[cfg.model.dtype],
      param_dtype=DTYPES[cfg.model.param_dtype],
      mesh=mesh,
      remat=cfg.model.remat,
      attention_impl=cfg.model.attention_impl or None,
    )
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  return mesh, model, tokenizer
