"""Sampling: a JetStream Engine over the Qwen model and a continuous-batching driver."""

from tapo_jax.sampling.driver import Generation, PaddedRollouts, engine_for, generate
from tapo_jax.sampling.engine import TRACES, DecodeState, Prefix, QwenEngine
from tapo_jax.sampling.sample import Sampling, sample, truncate

__all__ = [
  "TRACES",
  "DecodeState",
  "Generation",
  "PaddedRollouts",
  "Prefix",
  "QwenEngine",
  "Sampling",
  "engine_for",
  "generate",
  "sample",
  "truncate",
]
