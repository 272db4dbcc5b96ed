"""Hugging Face checkpoints in and out: config.json + safetensors <-> a `Qwen` module.

`load_pretrained(path)` reads a local HF directory (config.json and either `model.safetensors` or
`model.safetensors.index.json` with its shards) tensor by tensor straight into device arrays,
sharded over `mesh` by each param's `logical_axes` when one is given; no full host copy of the
model is ever built. Every key and shape is checked against the architecture (from the file
headers) before any tensor is read, so a bad checkpoint fails with one `CheckpointError` naming
the file and the tensor, never as a partial load.

`save_pretrained(model, path)` writes config.json and HF-layout safetensors (sharded with an index
above `max_shard_size`) that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads.

Tokenizers need nothing here: `transformers.AutoTokenizer.from_pretrained(path)` loads from the
same local directory (save_pretrained keeps any tokenizer files already in it).

Layout (ours <- HF): q/k/v [D, N, H] <- [N*H, D]; o [N, H, D] <- [D, N*H]; q/k/v bias [N, H] <-
[N*H]; mlp [in, out] <- [out, in]; lm_head [D, V] <- [V, D]; embeddings and norm scales as is.
Tied embeddings: there is no lm_head param; a `lm_head.weight` in a tied checkpoint is ignored
(transformers ignores it too), as are the `rotary_emb.inv_freq` buffers some exports carry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from tapo_jax import sharding
from tapo_jax.models.qwen import Qwen, QwenConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.(original_)?inv_freq$")


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


# --- layout ---------------------------------------------------------------------------------------


def hf_layout(cfg: QwenConfig) -> dict[tuple, tuple[str, str]]:
  """Our param path -> (HF tensor name, layout kind), in HF's order."""
  out = {("embed_tokens",): ("model.embed_tokens.weight", "copy")}
  for i in range(cfg.num_hidden_layers):
    hf = f"model.layers.{i}."
    ours = ("layers", i)
    for n in ("q", "k", "v"):
      out[ours + ("self_attn", f"{n}_proj")] = (f"{hf}self_attn.{n}_proj.weight", "in_heads")
    if cfg.qkv_bias:
      for n in ("q", "k", "v"):
        out[ours + ("self_attn", f"{n}_bias")] = (f"{hf}self_attn.{n}_proj.bias", "bias")
    out[ours + ("self_attn", "o_proj")] = (f"{hf}self_attn.o_proj.weight", "out_heads")
    if cfg.qk_norm:
      for n in ("q", "k"):
        out[ours + ("self_attn", f"{n}_norm", "scale")] = (f"{hf}self_attn.{n}_norm.weight", "copy")
    for n in ("gate", "up", "down"):
      out[ours + ("mlp", f"{n}_proj")] = (f"{hf}mlp.{n}_proj.weight", "linear")
    for n in ("input_layernorm", "post_attention_layernorm"):
      out[ours + (n, "scale")] = (f"{hf}{n}.weight", "copy")
  out[("norm", "scale")] = ("model.norm.weight", "copy")
  if not cfg.tie_word_embeddings:
    out[("lm_head_kernel",)] = ("lm_head.weight", "linear")
  return out


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "copy":
    return tuple(shape)
  if kind == "linear":
    return tuple(reversed(shape))
  if kind == "in_heads":  # [D, N, H] -> [N*H, D]
    return (shape[1] * shape[2], shape[0])
  if kind == "out_heads":  # [N, H, D] -> [D, N*H]
    return (shape[2], shape[0] * shape[1])
  if kind == "bias":  # [N, H] -> [N*H]
    return (math.prod(shape),)
  raise AssertionError(kind)


def _from_hf(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind == "copy":
    return w
  if kind in ("linear", "in_heads", "out_heads"):
    return np.ascontiguousarray(w.T).reshape(shape)
  return w.reshape(shape)  # bias


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return w
  if kind == "linear":
    return np.ascontiguousarray(w.T)
  if kind == "in_heads":
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
  if kind == "out_heads":
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
  return w.reshape(-1)  # bias


# --- reading --------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> QwenConfig:
  """The QwenConfig of a local HF directory; CheckpointError if it is missing or unsupported."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: checkpoint directory does not exist")
  config_path = path / CONFIG_NAME
  if not config_path.is_file():
    raise CheckpointError(f"{config_path}: missing (expected a Hugging Face config.json)")
  try:
    d = json.loads(config_path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{config_path}: cannot read JSON: {e}") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{config_path}: expected a JSON object")
  try:
    return QwenConfig.from_hf(d, source=str(config_path))
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(str(e) if str(config_path) in str(e) else f"{config_path}: {e}") from e


def _weight_map(path: Path) -> tuple[dict[str, Path], Path]:
  """(HF tensor name -> the safetensors file holding it, the file listing them); headers only."""
  single, index = path / WEIGHTS_NAME, path / INDEX_NAME
  if single.is_file():
    try:
      with safe_open(str(single), framework="numpy") as f:
        return {k: single for k in f.keys()}, single
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise CheckpointError(f"{single}: not a readable safetensors file: {e}") from e
  if not index.is_file():
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index}: cannot read weight_map: {e}") from e
  out = {}
  for key, name in weight_map.items():
    shard = path / name
    if not shard.is_file():
      raise CheckpointError(f"{index}: tensor {key!r} is mapped to missing shard file {shard}")
    out[key] = shard
  for shard in sorted(set(out.values())):
    try:
      with safe_open(str(shard), framework="numpy") as f:
        present = set(f.keys())
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{shard}: not a readable safetensors file: {e}") from e
    for key in sorted(k for k, s in out.items() if s == shard and k not in present):
      raise CheckpointError(f"{shard}: missing tensor {key!r} (listed in {index})")
  return out, index


class _Reader:
  """Open safetensors handles, one per file, read tensor by tensor."""

  def __init__(self, stack: contextlib.ExitStack):
    self._stack, self._handles = stack, {}

  def _open(self, file: Path, framework: str = "numpy"):
    if (file, framework) not in self._handles:
      self._handles[file, framework] = self._stack.enter_context(
        safe_open(str(file), framework=framework)
      )
    return self._handles[file, framework]

  def header(self, file: Path, key: str) -> tuple[tuple[int, ...], str]:
    s = self._open(file).get_slice(key)
    return tuple(s.get_shape()), s.get_dtype()

  def get(self, file: Path, key: str) -> np.ndarray:
    try:
      return self._open(file).get_tensor(key)
    except (TypeError, ValueError, KeyError):  # older safetensors: no bfloat16 in numpy
      return np.asarray(self._open(file, "flax").get_tensor(key))


def _check(where: Path, files: Mapping[str, Path], layout, abstract: Mapping, reader: _Reader):
  """Every expected tensor present with the right shape, nothing unexpected; raises otherwise."""
  expected = {hf for hf, _ in layout.values()}
  for key in files:
    if key in expected or _IGNORED.search(key):
      continue
    if key == "lm_head.weight":  # tied: transformers ignores a stored lm_head as well
      continue
    raise CheckpointError(f"{files[key]}: unexpected tensor {key!r} for this config")
  for our_path, (key, kind) in layout.items():
    if key not in files:
      raise CheckpointError(f"{where}: missing tensor {key!r}")
    shape, dtype = reader.header(files[key], key)
    want = _hf_shape(kind, abstract[our_path].shape)
    if shape != want:
      raise CheckpointError(f"{files[key]}: tensor {key!r} has shape {shape}, expected {want}")
    if dtype not in _FLOAT_DTYPES:
      raise CheckpointError(f"{files[key]}: tensor {key!r} has dtype {dtype}, expected a float")


def load_pretrained(
  path: str | os.PathLike,
  *,
  dtype=jnp.float32,
  param_dtype=None,
  mesh: jax.sharding.Mesh | None = None,
  remat: bool = False,
  attention_impl: str | None = None,
) -> Qwen:
  """A Qwen with the weights of a local HF directory, sharded over `mesh` when given.

  `dtype` is the compute dtype; `param_dtype` (stored weights) defaults to float32 when `dtype`
  is float32 and to `dtype` otherwise, whatever the checkpoint's own dtype.
  """
  path = Path(path)
  cfg = load_config(path)
  dtype = jnp.dtype(dtype)
  param_dtype = jnp.dtype(param_dtype or (jnp.float32 if dtype == jnp.float32 else dtype))
  model = nnx.eval_shape(
    lambda: Qwen(
      cfg,
      dtype=dtype,
      param_dtype=param_dtype,
      remat=remat,
      attention_impl=attention_impl or None,
      rngs=nnx.Rngs(0),
    )
  )
  graphdef, state = nnx.split(model)
  variables = dict(nnx.to_flat_state(state))
  layout = hf_layout(cfg)
  if set(variables) != set(layout):  # the architecture and the table disagree: a bug here
    raise AssertionError(f"params without an HF name: {sorted(set(variables) ^ set(layout))}")
  abstract = {p: v.get_value() for p, v in variables.items()}
  if mesh is not None:
    placement = dict(nnx.to_flat_state(sharding.param_shardings(state, mesh)))
  files, listing = _weight_map(path)
  with contextlib.ExitStack() as stack:
    reader = _Reader(stack)
    _check(listing, files, layout, abstract, reader)
    for our_path, (key, kind) in layout.items():
      shape = abstract[our_path].shape
      w = _from_hf(kind, reader.get(files[key], key), shape).astype(param_dtype)
      var = variables[our_path]
      if mesh is None:
        var.set_value(jax.device_put(w))
      else:
        var.set_value(jax.device_put(w, placement[our_path].get_value()))
      del w
  return nnx.merge(graphdef, state)


# --- writing --------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
  """Bytes from 20_000, "20KB" (10^3) or "20KiB" (2^10); up to TB/TiB."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MiB'")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _install(tmp: Path, path: Path) -> None:
  """Moves the files written in `tmp` to `path`; keeps unrelated files already there."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp and safetensors create private files
  for p in tmp.iterdir():
    os.chmod(p, 0o666 & ~umask)
  if not path.exists() or (path.is_dir() and not any(path.iterdir())):
    os.replace(tmp, path)
    return
  if not path.is_dir():
    raise FileExistsError(f"{path}: exists and is not a directory")
  new = {p.name for p in tmp.iterdir()}
  for name in sorted(new - {CONFIG_NAME}):
    os.replace(tmp / name, path / name)
  for p in path.iterdir():  # stale weights of an earlier save with other sharding
    is_weights = p.name == INDEX_NAME or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", p.name)
    if is_weights and p.name not in new:
      p.unlink()
  os.replace(tmp / CONFIG_NAME, path / CONFIG_NAME)  # last: the directory is complete


def save_pretrained(model: Qwen, path: str | os.PathLike, *, max_shard_size="5GB") -> None:
  """Writes config.json + HF-layout safetensors (in the param dtype) under `path`.

  Everything is written to a temporary directory beside `path` first, so a failure leaves no
  half-written checkpoint; other files in an existing `path` (a tokenizer) are kept. Weights
  above `max_shard_size` are split into `model-0000i-of-0000n.safetensors` with an index.
  In multi-process runs every process must call this; process 0 writes.
  """
  from safetensors.numpy import save_file

  path = Path(path)
  cfg = model.cfg
  layout = hf_layout(cfg)
  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  limit = parse_size(max_shard_size)
  shards, size = [[]], 0  # our paths, greedily packed in HF order
  for our_path in layout:
    nbytes = variables[our_path].get_value().nbytes
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(our_path)
    size += nbytes
  names = (
    [WEIGHTS_NAME]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  writer = jax.process_index() == 0
  dtypes = {str(np.dtype(v.get_value().dtype)) for v in variables.values()}
  if writer:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
  try:
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
      tensors = {}
      for our_path in shard:
        key, kind = layout[our_path]
        tensors[key] = _to_hf(kind, _host(variables[our_path].get_value()))
        weight_map[key] = name
        total += tensors[key].nbytes
      if writer:
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
      del tensors
    if writer:
      if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
      config = cfg.to_hf()
      config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
      (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
      _install(tmp, path)
  finally:
    if writer:
      shutil.rmtree(tmp, ignore_errors=True)
