"""On-policy self-distillation (OPSD; Zhao et al. 2026, arXiv 2601.18734), `algorithm=opsd`.

The student (the policy) samples K responses per query as in GRPO. The teacher is the same policy
without gradient, given a privileged solution in its prompt: a correct response of the same group,
else the problem's reference solution (`teacher`). The loss is a per-token divergence between the
student's and the teacher's next-token distributions on the student's own tokens, over the full
vocabulary, computed in vocabulary chunks (`loss`), on a batch that aligns the two rows by index
(`batch`: packed like GRPO's rows, student row r and teacher row r holding the same sequences).
`Distiller` is what the RL loop calls. Choices and their sources: docs/recipe.md.
"""

from tapo_jax.opsd.batch import OpsdBatch, with_teacher
from tapo_jax.opsd.distiller import Distiller
from tapo_jax.opsd.loss import OpsdConfig, opsd_loss, token_divergence
from tapo_jax.opsd.teacher import TEACHER_TEMPLATE, choose_solutions

__all__ = [
  "TEACHER_TEMPLATE",
  "Distiller",
  "OpsdBatch",
  "OpsdConfig",
  "choose_solutions",
  "opsd_loss",
  "token_divergence",
  "with_teacher",
]
