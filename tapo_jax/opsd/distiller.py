"""What the RL loop calls for algorithm=opsd: set-up checks, the step's teacher rows, the loss.

Everything else of the step is GRPO's: the same rollouts, grading, `prepare_batch` (whose
advantages and masks only the optional GRPO term reads), packed minibatches (the student's and
the teacher's rows paired: `layout`, `minibatches`; micro-batches of the student's token budget,
each with its teacher rows beside it), π_old, update, eval and checkpoint. The teacher is the
current policy, so a checkpoint holds nothing more than GRPO's and a resumed run rebuilds the same
teacher rows (the solution draw is seeded by (seed, step)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from tapo_jax import metrics as metrics_lib
from tapo_jax import minibatches, sharding
from tapo_jax.data import DataError, Problem
from tapo_jax.opsd import batch as batch_lib
from tapo_jax.opsd import loss as loss_lib
from tapo_jax.opsd import teacher as teacher_lib
from tapo_jax.tapo import batch as rollouts_lib


def max_solution_tokens(cfg) -> int:
  """opsd.max_solution_tokens, or its default (0): rollout.max_new_tokens."""
  return int(cfg.opsd.max_solution_tokens) or int(cfg.rollout.max_new_tokens)


# The teacher template's tokens when no tokenizer is at hand (the planner, `bench aot`): the
# built-in template is ~70 Qwen tokens, chat markup ~20 more.
OVERHEAD_ESTIMATE = 128


def teacher_width(cfg, overhead: int, max_positions: int | None = None) -> int:
  """U, the teacher rows' width: opsd.max_len, or template (`overhead` tokens) + problem +
  solution + response rounded up to a multiple of 64, within the model's positions (a longer
  solution is cut to fit)."""
  need = overhead + cfg.data.max_prompt_tokens + max_solution_tokens(cfg)
  need += int(cfg.rollout.max_new_tokens)
  return int(cfg.opsd.max_len) or min(64 * math.ceil(need / 64), max_positions or need)


class Distiller:
  """The OPSD side of one run (host state: the tokenizer, the template, the row widths)."""

  def __init__(
    self,
    cfg,
    tokenizer,
    eos_ids: Sequence[int],
    problems: Sequence[Problem],
    max_positions: int | None = None,
  ):
    self.cfg, self.k = cfg, cfg.rollout.n
    self.prompts = teacher_lib.TeacherPrompts(
      tokenizer,
      cfg.opsd.teacher_template or teacher_lib.TEACHER_TEMPLATE,
      cfg.data.prompt_template,
      cfg.data.use_chat_template,
      max_solution_tokens(cfg),
      eos_ids,
    )
    overhead = self.prompts.overhead()
    self.slots = int(cfg.rollout.max_new_tokens)  # a response never has more tokens
    self.width = teacher_width(cfg, overhead, max_positions)
    least = overhead + cfg.data.max_prompt_tokens + self.slots  # an empty solution
    if self.width < least:
      raise DataError(
        f"config.opsd: teacher rows of {self.width} tokens (opsd.max_len={cfg.opsd.max_len}, the "
        f"model's max_position_embeddings={max_positions}) cannot hold the teacher's template "
        f"({overhead} tokens) + data.max_prompt_tokens + rollout.max_new_tokens = {least}; "
        "shorten opsd.teacher_template or those lengths"
      )
    if cfg.opsd.solution_source == "reference" and not any(p.solution for p in problems):
      raise DataError(
        "config.opsd.solution_source='reference': no training problem has a reference solution "
        "(a `solution` field, docs/data.md); use opsd.solution_source=group"
      )
    self.loss_cfg = loss_lib.OpsdConfig.from_config(cfg)

  def describe(self) -> str:
    c = self.cfg.opsd
    return (
      f"opsd: teacher rows of {self.width} tokens, beta={c.beta}, grpo_coef={c.grpo_coef}, "
      f"solutions from {c.solution_source}, at most {self.prompts.max_solution} tokens"
    )

  @property
  def needs_old_logprobs(self) -> bool:
    """π_old is read by the GRPO term only."""
    return bool(self.cfg.opsd.grpo_coef)

  def loss_fn(self):
    """The train step's `loss_fn(model, micro_batch)`."""
    return functools.partial(loss_lib.opsd_loss, cfg=self.loss_cfg)

  def layout(self, train, key, n: int, m: int, num_micro: int) -> batch_lib.PairLayout:
    """The step's paired layout (`opsd.batch.layout`)."""
    grpo = bool(self.cfg.opsd.grpo_coef)
    return batch_lib.layout(train, key, n=n, m=m, num_micro=num_micro, with_loss_tokens=grpo)

  def minibatches(self, train, layout: batch_lib.PairLayout, mesh) -> list:
    """`train` (the padded OpsdBatch, host arrays) packed into `layout` and put on `mesh`."""
    return minibatches.packed_minibatches(train, layout, mesh, pack=batch_lib.pack)

  def relayout(self, train, parts, layout, old, mesh) -> list:
    """The step's sequences packed anew into `layout` (another epoch's dealing), π_old (when the
    GRPO term reads it) taken from `parts`, laid out by `old`."""
    if self.needs_old_logprobs:
      lp = np.stack([np.asarray(sharding.to_host(p.old_logprobs)) for p in parts])
      t = np.asarray(train.tokens).shape[1]
      train = train.replace(old_logprobs=rollouts_lib.unpack(lp, old.student, train.num_rows, t))
    return self.minibatches(train, layout, mesh)

  def add_teacher(
    self,
    train,
    prep_metrics,
    rollouts: rollouts_lib.Rollouts,
    problems: Sequence[Problem],
    step: int,
  ) -> tuple[batch_lib.OpsdBatch, dict[str, float]]:
    """The step's TrainBatch (host arrays) with each rollout's teacher row and distilled tokens,
    and the step's batch metrics (prepare_batch's only when the GRPO term reads its batch)."""
    rewards = np.asarray(rollouts.rewards)
    choice = teacher_lib.choose_solutions(
      rewards,
      self.k,
      [bool(p.solution) for p in problems],
      self.cfg.opsd.solution_source,
      seed=(self.cfg.seed, step, 0x0D5D),
    )
    responses = rollouts_lib.response_ids(rollouts, self.prompts.eos)
    room = [self.width - int(n) for n in np.asarray(rollouts.response_lens)]
    prompts, metrics = self.prompts.build(problems, responses, choice, room, self.k)
    batch, batch_metrics = batch_lib.with_teacher(
      train, rollouts, prompts, width=self.width, slots=self.slots
    )
    metrics.update(batch_metrics)
    if self.cfg.opsd.grpo_coef:
      metrics.update(metrics_lib.to_host(prep_metrics))
    return batch, metrics
