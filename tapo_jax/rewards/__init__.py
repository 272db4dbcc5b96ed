"""The RL reward: safe, exact answer verification with hard timeouts."""

from tapo_jax.rewards.extract import extract_answer
from tapo_jax.rewards.math import grade, is_equivalent
from tapo_jax.rewards.pool import VerifierPool, grade_batch

__all__ = ["VerifierPool", "extract_answer", "grade", "grade_batch", "is_equivalent"]
