"""Qwen-family models and Hugging Face checkpoint I/O."""

from tapo_jax.models.kv_cache import KVCache
from tapo_jax.models.qwen import Qwen, QwenConfig, count_params, param_logical_axes

__all__ = ["KVCache", "Qwen", "QwenConfig", "count_params", "param_logical_axes"]
