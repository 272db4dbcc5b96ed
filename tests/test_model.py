"""The Flax Qwen model against transformers: logits, KV-cache decode, save/load, sharding, sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch
import transformers
from flax import nnx

from tapo_jax.models import Qwen, QwenConfig, count_params, load_pretrained, save_pretrained
from tapo_jax.sharding import make_mesh

# Tiny configs with odd sizes: vocab 97, hidden 48, mlp 80; GQA ratios 3 and 4; Qwen3's head_dim
# 16 differs from hidden / heads = 8; tied and untied embeddings.
TINY = {
  "qwen2_tied_gqa3": dict(
    model_type="qwen2", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True
  ),
  "qwen2_untied_gqa4": dict(
    model_type="qwen2",
    num_attention_heads=4,
    num_key_value_heads=1,
    tie_word_embeddings=False,
    rope_theta=1e6,
  ),
  "qwen3_untied_hd16": dict(
    model_type="qwen3",
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
  ),
}
COMMON = tiny.hf_config("hf")  # each variant sets its own heads
TOL = 1e-4


def hf_config(model_type, **kw):
  cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
  return cls(**kw)


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Random weights, biases and norm scales (HF inits biases to 0 and norms to 1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.2 * noise)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
  """(name, HF directory, torch model, tokens [2, 12], torch logits [2, 12, V])."""
  kw = dict(TINY[request.param])
  cfg = hf_config(kw.pop("model_type"), **{**COMMON, **kw})
  hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  randomize(hf, seed=sorted(TINY).index(request.param))
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path, safe_serialization=True)
  tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 12))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  return request.param, path, hf, tokens, ref


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, positions, cache):
  return nnx.merge(graphdef, state).decode(tokens, positions, cache)


def forward(model, tokens):
  return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens, jnp.int32)))


def test_logits_match_transformers(tiny):
  name, path, _, tokens, ref = tiny
  ours = forward(load_pretrained(path), tokens)
  diff = np.abs(ours - ref).max()
  print(f"{name}: max |ours - transformers| = {diff:.2e}")
  assert np.abs(ref).max() > 1.0  # logits are not trivially small
  assert diff <= TOL


def test_decode_with_cache_matches_full_forward(tiny):
  """Prefill then one token at a time, rows at different positions, vs the full forward."""
  name, path, _, tokens, _ = tiny
  model = load_pretrained(path)
  full = forward(model, tokens)
  graphdef, state = nnx.split(model)
  t_total, lens = tokens.shape[1], (4, 6)  # row 0 runs two positions behind row 1
  prompt = tokens[:, : max(lens)].copy()
  prompt[0, lens[0] :] = 0  # junk beyond row 0's prompt; decoding overwrites those slots
  positions = np.broadcast_to(np.arange(max(lens)), prompt.shape)
  cache = model.init_cache(2, t_total)
  logits, cache = _decode(graphdef, state, jnp.asarray(prompt), jnp.asarray(positions), cache)
  logits = np.asarray(logits)
  diffs = [np.abs(logits[b, : lens[b]] - full[b, : lens[b]]).max() for b in range(2)]
  for step in range(t_total - max(lens)):
    pos = np.array([lens[0] + step, lens[1] + step])
    tok = tokens[np.arange(2), pos]
    logits, cache = _decode(
      graphdef, state, jnp.asarray(tok[:, None]), jnp.asarray(pos[:, None]), cache
    )
    diffs.append(np.abs(np.asarray(logits)[:, 0] - full[np.arange(2), pos]).max())
  print(f"{name}: max |decode - forward| = {max(diffs):.2e}")
  assert max(diffs) <= TOL


def test_save_pretrained_loads_in_transformers(tiny, tmp_path):
  name, path, _, tokens, ref = tiny
  save_pretrained(load_pretrained(path), tmp_path / "out")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "out", attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    again = hf(torch.tensor(tokens)).logits.numpy()
  diff = np.abs(again - ref).max()
  print(f"{name}: max |transformers(saved) - transformers| = {diff:.2e}")
  assert diff <= 1e-6  # the same float32 weights


def test_sharded_load_matches_unsharded(tiny):
  name, path, _, tokens, _ = tiny
  mesh = make_mesh(dict(data=1, fsdp=2, tensor=4))
  model = load_pretrained(path, mesh=mesh)
  layer = model.layers[0]
  assert layer.mlp.gate_proj[...].sharding.spec == jax.P("fsdp", "tensor")
  assert layer.mlp.down_proj[...].sharding.spec == jax.P("tensor", "fsdp")
  q = layer.self_attn.q_proj[...]
  heads = model.cfg.num_attention_heads
  assert q.sharding.spec == jax.P("fsdp", "tensor" if heads % 4 == 0 else None, None)
  shard_shapes = {s.data.shape for s in q.addressable_shards}
  assert shard_shapes == {(24, heads // 4 if heads % 4 == 0 else heads, model.cfg.head_dim)}
  diff = np.abs(forward(model, tokens) - forward(load_pretrained(path), tokens)).max()
  print(f"{name}: max |sharded - unsharded| = {diff:.2e}")
  assert diff <= 1e-5


# Published config.json values of the real models.
REAL = {
  "Qwen2.5-7B": (
    dict(
      model_type="qwen2",
      vocab_size=152064,
      hidden_size=3584,
      intermediate_size=18944,
      num_hidden_layers=28,
      num_attention_heads=28,
      num_key_value_heads=4,
      rope_theta=1e6,
      rms_norm_eps=1e-6,
      max_position_embeddings=131072,
      tie_word_embeddings=False,
    ),
    7_615_616_512,
  ),
  "Qwen3-8B": (
    dict(
      model_type="qwen3",
      vocab_size=151936,
      hidden_size=4096,
      intermediate_size=12288,
      num_hidden_layers=36,
      num_attention_heads=32,
      num_key_value_heads=8,
      head_dim=128,
      rope_theta=1e6,
      rms_norm_eps=1e-6,
      max_position_embeddings=40960,
      tie_word_embeddings=False,
    ),
    8_190_735_360,
  ),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_param_count_matches_transformers(name):
  d, known = REAL[name]
  with torch.device("meta"):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(**d))
  hf_count = sum(p.numel() for p in hf.parameters())
  cfg = QwenConfig.from_hf(d)
  model = nnx.eval_shape(lambda: Qwen(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  assert count_params(model) == hf_count == known
  assert model.lm_head_kernel.shape == (d["hidden_size"], d["vocab_size"])
  logits = nnx.eval_shape(lambda m, t: m(t), model, jax.ShapeDtypeStruct((1, 8), jnp.int32))
  assert logits.shape == (1, 8, d["vocab_size"]) and logits.dtype == jnp.float32
