"""The RL reward: safe, exact answer verification with hard timeouts."""

from tapo_jax.rewards.extract import extract_answer
from tapo_jax.rewards.math import grade, is_equivalent

__all__ = ["extract_answer", "grade", "is_equivalent"]
