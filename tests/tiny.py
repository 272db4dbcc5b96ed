"""The tests' tiny Qwen models: one table of shapes, named for what they are for, and builders.

A test asks for a shape by name (`tiny.config("tiny")`, `tiny.model("tiny", seed=1)`); a test that
needs one dimension changed says so where it builds it (`tiny.config("hf", num_hidden_layers=1)`).
"""

from __future__ import annotations

SHAPES = {
  # Engines, updates, checkpoints and packed batches: 2 layers, grouped-query attention (4 q-heads
  # on 2 kv-heads), every dimension a multiple of the 8 fake devices' mesh axes.
  "tiny": dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
  ),
  # A packed update against the padded one (tests/test_tapo_batch.py): its 2e-6 tolerance on the
  # params after two Adam steps holds at this size (the "tiny" shape's float noise reaches 3e-6).
  "packed": dict(
    vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
  ),
  # Parity with transformers at 1e-4 (a Qwen2 config; head_dim is hidden_size / heads = 8): a
  # vocabulary that is no power of two, 6 q-heads on 2 kv-heads.
  "hf": dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2,
  ),
  # Losses through the model: the smallest that has every part (vocab 37: no multiple of the
  # vocab chunks the loss tests cut it into).
  "micro": dict(
    vocab_size=37, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=4,
  ),
  # Large enough that an Orbax save takes a while (a save killed midway) and that the fsdp=4
  # shards of every matrix differ from the full shapes.
  "wide": dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
  ),
  # tapo_jax.plan: every per-device number checked by hand (V=64, D=16, F=32, L=2, N=4, K=2, H=4).
  "plan": dict(
    model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=False,
  ),
  # Compiled for TPU: dims that are whole TPU tiles, so the compiled sizes carry no padding.
  "tpu": dict(
    model_type="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=1024,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
    tie_word_embeddings=False,
  ),
}  # fmt: skip


def hf_config(name: str, **changes) -> dict:
  """The shape as config.json keys (what `QwenConfig.from_hf` and transformers read)."""
  return {**SHAPES[name], **changes}


def config(name: str = "tiny", **changes):
  """The shape as a `QwenConfig`."""
  from tapo_jax.models import QwenConfig

  d = hf_config(name, **changes)
  d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])  # transformers' default
  return QwenConfig(**d)


def model(shape="tiny", seed: int = 0, **kwargs):
  """A `Qwen` with random weights from `seed`; `shape` is a name in SHAPES or a `QwenConfig`,
  `kwargs` go to `Qwen` (dtype, remat, attention_impl...)."""
  from flax import nnx

  from tapo_jax.models import Qwen

  return Qwen(config(shape) if isinstance(shape, str) else shape, rngs=nnx.Rngs(seed), **kwargs)
