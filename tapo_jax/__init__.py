"""TAPO: Trajectory-Augmented Policy Optimization for Qwen-family LLMs in JAX."""
