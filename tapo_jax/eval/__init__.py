"""Evaluation: pure metrics (avg@k, pass@k, maj@k, DSR/ERR), first-pass accuracy and the
correction-fix rate (`reflection`), the sample-grade-summarize loop and the eval sets of a config
(`evaluate`); mode = eval is `mode.run`. The text helpers it uses
(decoding, EOS ids) live in tapo_jax/data/text.py, below sampling and eval both."""

from tapo_jax.eval.evaluate import (
  checked_eval_sets,
  compute_pass_rates,
  describe_change,
  eval_kwargs,
  eval_sets,
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
  "describe_change",
  "dsr",
  "err",
  "checked_eval_sets",
  "eval_kwargs",
  "eval_sets",
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
