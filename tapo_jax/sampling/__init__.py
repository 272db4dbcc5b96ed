"""Sampling: a JetStream Engine over the Qwen model and a continuous-batching driver."""

from tapo_jax.sampling.driver import Generation, generate, sample_from
from tapo_jax.sampling.engine import DecodeState, Prefix, QwenEngine
from tapo_jax.sampling.sample import Sampling, sample, truncate

__all__ = [
  "DecodeState",
  "Generation",
  "Prefix",
  "QwenEngine",
  "Sampling",
  "generate",
  "sample",
  "sample_from",
  "truncate",
]
