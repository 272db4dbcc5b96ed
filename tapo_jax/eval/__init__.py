"""Evaluation: pure metrics (avg@k, pass@k, maj@k, DSR/ERR) and the sample-grade-summarize loop."""

from tapo_jax.data.text import decode_responses, default_eos_ids
from tapo_jax.eval.evaluate import (
  compute_pass_rates,
  describe_change,
  eval_kwargs,
  evaluate,
  evaluate_sets,
  load_eval_sets,
  sample_and_grade,
  verifier_equiv,
  write_results,
)
from tapo_jax.eval.metrics import (
  ProblemResult,
  avg_at_k,
  canonical,
  dsr,
  err,
  has_reflection,
  maj_at_k,
  majority,
  mean_pass_at_k,
  pass_at_k,
  summarize,
)

__all__ = [
  "ProblemResult",
  "avg_at_k",
  "canonical",
  "compute_pass_rates",
  "decode_responses",
  "describe_change",
  "default_eos_ids",
  "dsr",
  "err",
  "eval_kwargs",
  "evaluate",
  "evaluate_sets",
  "has_reflection",
  "load_eval_sets",
  "maj_at_k",
  "majority",
  "mean_pass_at_k",
  "pass_at_k",
  "sample_and_grade",
  "summarize",
  "verifier_equiv",
  "write_results",
]
