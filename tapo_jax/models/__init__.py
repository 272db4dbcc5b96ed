"""Qwen-family models and Hugging Face checkpoint I/O."""

from tapo_jax.models.kv_cache import KVCache
from tapo_jax.models.qwen import Qwen, QwenConfig, count_params, param_logical_axes
from tapo_jax.models.weights import CheckpointError, load_config, load_pretrained, save_pretrained

__all__ = [
  "CheckpointError",
  "KVCache",
  "Qwen",
  "QwenConfig",
  "count_params",
  "load_config",
  "load_pretrained",
  "param_logical_axes",
  "save_pretrained",
]
