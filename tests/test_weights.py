"""Checkpoint I/O: every bad input is one CheckpointError naming file and tensor; formats load."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import tiny
import torch
import transformers
from flax import nnx

from tapo_jax.models import CheckpointError, load_pretrained, save_pretrained
from tapo_jax.models.weights import hf_layout, parse_size

CFG = tiny.hf_config("hf")
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def tiny_hf(tie: bool, seed: int = 0) -> torch.nn.Module:
  """A tiny Qwen2 with random weights, biases and norm scales."""
  cfg = transformers.Qwen2Config(**CFG, tie_word_embeddings=tie)
  hf = transformers.AutoModelForCausalLM.from_config(cfg)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.2 * noise)
  return hf


@pytest.fixture(scope="module")
def hf_model():
  return tiny_hf(tie=False)


@pytest.fixture(scope="module")
def good_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  hf_model.save_pretrained(path, safe_serialization=True)
  return path


@pytest.fixture
def ckpt(good_dir, tmp_path):
  """A fresh copy of the good checkpoint to break."""
  return shutil.copytree(good_dir, tmp_path / "ckpt")


def params(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
  pa, pb = params(a), params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype, k
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def rewrite(path, edit):
  """Applies `edit` to the tensor dict of path/model.safetensors."""
  file = path / "model.safetensors"
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def load_error(path) -> str:
  with pytest.raises(CheckpointError) as e:
    load_pretrained(path)
  return str(e.value)


def test_loaded_params_are_the_hf_tensors_in_our_layout(good_dir, hf_model):
  model = load_pretrained(good_dir)
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  attn = model.layers[1].self_attn
  np.testing.assert_array_equal(  # q [N*H, D] -> [D, N, H]: q[d, n, h] = W[n*H + h, d]
    attn.q_proj[...][5, 4, 3], sd[Q_PROJ][4 * 8 + 3, 5]
  )
  np.testing.assert_array_equal(  # o [D, N*H] -> [N, H, D]
    attn.o_proj[...][2, 7, 11], sd["model.layers.1.self_attn.o_proj.weight"][11, 2 * 8 + 7]
  )
  np.testing.assert_array_equal(
    attn.k_bias[...].reshape(-1), sd["model.layers.1.self_attn.k_proj.bias"]
  )
  np.testing.assert_array_equal(model.lm_head(), sd["lm_head.weight"].T)
  np.testing.assert_array_equal(
    model.layers[0].mlp.down_proj[...], sd["model.layers.0.mlp.down_proj.weight"].T
  )


def test_missing_directory(tmp_path):
  msg = load_error(tmp_path / "nope")
  assert str(tmp_path / "nope") in msg and "does not exist" in msg


def test_missing_config(ckpt):
  (ckpt / "config.json").unlink()
  msg = load_error(ckpt)
  assert str(ckpt / "config.json") in msg and "missing" in msg


def test_malformed_config(ckpt):
  (ckpt / "config.json").write_text("{not json")
  assert str(ckpt / "config.json") in load_error(ckpt)


def test_unsupported_model_type(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
  msg = load_error(ckpt)
  assert str(ckpt / "config.json") in msg and "'llama'" in msg


def test_no_weights_file(ckpt):
  (ckpt / "model.safetensors").unlink()
  msg = load_error(ckpt)
  assert str(ckpt) in msg and "model.safetensors" in msg


def test_missing_tensor(ckpt):
  key = "model.layers.1.mlp.up_proj.weight"
  rewrite(ckpt, lambda t: t.pop(key))
  msg = load_error(ckpt)
  assert str(ckpt / "model.safetensors") in msg and repr(key) in msg and "missing" in msg


def test_missing_bias_is_not_silently_zero(ckpt):
  key = "model.layers.0.self_attn.v_proj.bias"
  rewrite(ckpt, lambda t: t.pop(key))
  assert repr(key) in load_error(ckpt)


def test_unexpected_tensor(ckpt):
  key = "model.layers.0.self_attn.o_proj.bias"
  rewrite(ckpt, lambda t: t.update({key: np.zeros(48, np.float32)}))
  msg = load_error(ckpt)
  assert str(ckpt / "model.safetensors") in msg and repr(key) in msg and "unexpected" in msg


def test_extra_layer_is_unexpected(ckpt):
  key = "model.layers.2.input_layernorm.weight"
  rewrite(ckpt, lambda t: t.update({key: np.ones(48, np.float32)}))
  assert repr(key) in load_error(ckpt)


def test_rotary_buffers_are_ignored(ckpt, good_dir):
  rewrite(ckpt, lambda t: t.update({"model.rotary_emb.inv_freq": np.ones(4, np.float32)}))
  assert_same_params(load_pretrained(ckpt), load_pretrained(good_dir))


def test_misshaped_tensor(ckpt):
  rewrite(ckpt, lambda t: t.update({Q_PROJ: np.zeros((40, 48), np.float32)}))
  msg = load_error(ckpt)
  assert str(ckpt / "model.safetensors") in msg and repr(Q_PROJ) in msg
  assert "(40, 48)" in msg and "expected (48, 48)" in msg


def test_misshaped_kv_heads(ckpt):
  key = "model.layers.0.self_attn.k_proj.weight"  # 3 kv heads' worth instead of 2
  rewrite(ckpt, lambda t: t.update({key: np.zeros((24, 48), np.float32)}))
  msg = load_error(ckpt)
  assert repr(key) in msg and "(24, 48)" in msg and "expected (16, 48)" in msg


def test_integer_tensor_is_rejected(ckpt):
  key = "model.norm.weight"
  rewrite(ckpt, lambda t: t.update({key: np.ones(48, np.int32)}))
  msg = load_error(ckpt)
  assert repr(key) in msg and "I32" in msg


@pytest.fixture(scope="module")
def sharded_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("sharded")
  hf_model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
  return path


def test_sharded_index_checkpoint_loads(sharded_dir, good_dir):
  assert len(list(sharded_dir.glob("model-*.safetensors"))) > 2
  assert not (sharded_dir / "model.safetensors").exists()
  assert_same_params(load_pretrained(sharded_dir), load_pretrained(good_dir))


def test_index_points_to_missing_shard(sharded_dir, tmp_path):
  path = shutil.copytree(sharded_dir, tmp_path / "ckpt")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  shard = sorted(set(index["weight_map"].values()))[-1]
  (path / shard).unlink()
  msg = load_error(path)
  assert str(path / "model.safetensors.index.json") in msg and str(path / shard) in msg
  key = next(k for k, v in index["weight_map"].items() if v == shard)
  assert repr(key) in msg


def test_index_entry_absent_from_its_shard(sharded_dir, tmp_path):
  path = shutil.copytree(sharded_dir, tmp_path / "ckpt")
  index_file = path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  index["weight_map"]["model.norm.weight"] = shard = sorted(set(index["weight_map"].values()))[0]
  index_file.write_text(json.dumps(index))
  msg = load_error(path)
  assert str(path / shard) in msg and "'model.norm.weight'" in msg


def test_tensor_missing_from_index(sharded_dir, tmp_path):
  path = shutil.copytree(sharded_dir, tmp_path / "ckpt")
  index_file = path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  del index["weight_map"]["lm_head.weight"]
  index_file.write_text(json.dumps(index))
  msg = load_error(path)
  assert str(index_file) in msg and "'lm_head.weight'" in msg


def test_bf16_checkpoint_loads(hf_model, tmp_path):
  hf_bf16 = tiny_hf(tie=False).to(torch.bfloat16)
  hf_bf16.save_pretrained(tmp_path, safe_serialization=True)
  with safetensors.safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    assert f.get_slice(Q_PROJ).get_dtype() == "BF16"
  want = hf_bf16.state_dict()[Q_PROJ].float().numpy()  # bf16 values, exactly representable
  model = load_pretrained(tmp_path)
  q = model.layers[1].self_attn.q_proj[...]
  assert q.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(q).reshape(48, 48).T, want)
  model = load_pretrained(tmp_path, dtype=jnp.bfloat16)
  q = model.layers[1].self_attn.q_proj[...]
  assert q.dtype == jnp.bfloat16 and model.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(q, np.float32).reshape(48, 48).T, want)
  logits = model(jnp.zeros((1, 3), jnp.int32))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_param_dtype_can_differ_from_compute_dtype(good_dir):
  model = load_pretrained(good_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert model.dtype == jnp.bfloat16 and model.embed_tokens[...].dtype == jnp.float32


def test_tied_checkpoint_with_lm_head_is_accepted(tmp_path):
  hf = tiny_hf(tie=True)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  embed = hf.state_dict()["model.embed_tokens.weight"].numpy()
  rewrite(tmp_path, lambda t: t.update({"lm_head.weight": embed.copy()}))
  model = load_pretrained(tmp_path)
  assert not hasattr(model, "lm_head_kernel")
  np.testing.assert_array_equal(model.lm_head(), embed.T)


def test_save_round_trip_sharded(good_dir, tmp_path):
  model = load_pretrained(good_dir)
  save_pretrained(model, tmp_path / "out", max_shard_size="30KB")
  shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
  assert len(shards) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == {s.name for s in shards}
  assert set(index["weight_map"]) == {k for k, _ in hf_layout(model.cfg).values()}
  assert_same_params(load_pretrained(tmp_path / "out"), model)


def test_save_bf16_params_writes_bf16(good_dir, tmp_path):
  model = load_pretrained(good_dir, dtype=jnp.bfloat16)
  save_pretrained(model, tmp_path / "out")
  with safetensors.safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as f:
    assert f.get_slice(Q_PROJ).get_dtype() == "BF16"
  assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert_same_params(load_pretrained(tmp_path / "out", dtype=jnp.bfloat16), model)
  assert params(model)[("embed_tokens",)].dtype == ml_dtypes.bfloat16


def test_failed_save_leaves_nothing(good_dir, tmp_path, monkeypatch):
  model = load_pretrained(good_dir)
  real_save = safetensors.numpy.save_file
  calls = []

  def failing_save(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:
      raise OSError("disk full")
    real_save(tensors, filename, metadata=metadata)

  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(model, tmp_path / "out", max_shard_size="30KB")
  assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_save_into_existing_dir_keeps_tokenizer_and_drops_stale_shards(good_dir, tmp_path):
  model = load_pretrained(good_dir)
  out = tmp_path / "out"
  save_pretrained(model, out, max_shard_size="30KB")
  (out / "tokenizer.json").write_text("{}")
  save_pretrained(model, out)  # one file now: the old index and shards must go
  assert sorted(p.name for p in out.iterdir()) == [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
  ]
  assert_same_params(load_pretrained(out), model)
  assert [p for p in tmp_path.iterdir() if p.name != "out"] == []  # no temp dir left


def test_save_from_sharded_model(good_dir, tmp_path):
  from tapo_jax.sharding import make_mesh

  model = load_pretrained(good_dir, mesh=make_mesh(dict(data=1, fsdp=2, tensor=4)))
  assert not model.layers[0].mlp.up_proj[...].sharding.is_fully_replicated
  save_pretrained(model, tmp_path / "out")
  assert_same_params(load_pretrained(tmp_path / "out"), load_pretrained(good_dir))
  assert jax.device_count() == 8


def test_parse_size():
  assert parse_size(123) == 123
  assert parse_size("20KB") == 20_000
  assert parse_size("1KiB") == 1024
  assert parse_size("5GB") == 5 * 10**9
  assert parse_size("1.5MiB") == 3 * 2**19
  with pytest.raises(ValueError):
    parse_size("lots")


def test_corrupt_safetensors_file(ckpt):
  (ckpt / "model.safetensors").write_bytes(b"garbage")
  msg = load_error(ckpt)
  assert str(ckpt / "model.safetensors") in msg and "safetensors" in msg


def test_bf16_without_numpy_support_falls_back(tmp_path, monkeypatch):
  """Older safetensors cannot return bfloat16 as numpy; the loader reads those via flax."""
  from tapo_jax.models import weights

  hf = tiny_hf(tie=True).to(torch.bfloat16)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  real_open = weights.safe_open

  class NoBF16:
    def __init__(self, handle):
      self._handle = handle

    def __getattr__(self, name):
      return getattr(self._handle, name)

    def get_tensor(self, key):
      if self._handle.get_slice(key).get_dtype() == "BF16":
        raise TypeError("data type 'bfloat16' not understood")
      return self._handle.get_tensor(key)

  class Open:
    def __init__(self, file, framework):
      self._ctx, self._framework = real_open(file, framework=framework), framework

    def __enter__(self):
      handle = self._ctx.__enter__()
      return NoBF16(handle) if self._framework == "numpy" else handle

    def __exit__(self, *exc):
      return self._ctx.__exit__(*exc)

  monkeypatch.setattr(weights, "safe_open", Open)
  model = load_pretrained(tmp_path)
  want = hf.state_dict()["model.embed_tokens.weight"].float().numpy()
  np.testing.assert_array_equal(model.embed_tokens[...], want)
