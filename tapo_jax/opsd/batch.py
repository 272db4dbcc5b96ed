"""The OPSD batch: the student's rows (a TrainBatch) and the teacher's own rows, aligned by index.

Legend: R rows, T student row length, U teacher row length, N distilled-token slots per row.

The same response token sits at different columns in the two rows (the teacher's prompt holds the
privileged solution), so the loss never assumes a layout: for each distilled token n of row r the
batch says which column of the student's row predicts it (`student_index`, the hidden state
before the token), which column of the teacher's row does (`teacher_index`), and which token it
is (`targets`). The loss gathers both final hidden states at those columns and compares the two
next-token distributions there. Padded rows (today) fill the index arrays row by row; packed rows
(several sequences per row) fill them segment by segment: the loss is the same function.

`distill_scale` is the row's per-token weight in the divergence term, normalized over the whole
step's distilled tokens (token-mean, as the OPSD code's loss), so micro-batch losses sum to the
full-batch loss like every other term; `step.minibatches` scales it with `loss_scale`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from tapo_jax.tapo.batch import Rollouts, TrainBatch


@flax.struct.dataclass
class OpsdBatch(TrainBatch):
  """A TrainBatch (the GRPO term reads it when opsd.grpo_coef > 0) plus the teacher's side."""

  teacher_tokens: jax.Array  # [R, U] int32  teacher prompt then the row's own response, padded
  teacher_positions: jax.Array  # [R, U] int32  0..len-1, 0 on padding
  student_index: jax.Array  # [R, N] int32  student column whose hidden state predicts token n
  teacher_index: jax.Array  # [R, N] int32  teacher column whose hidden state predicts token n
  targets: jax.Array  # [R, N] int32  the response token n itself
  distill_mask: jax.Array  # [R, N] bool  a distilled token (the row has a privileged solution)
  distill_scale: jax.Array  # [R] f32  per-token weight of the row's divergence (whole step)


def with_teacher(
  train: TrainBatch,
  rollouts: Rollouts,
  prompts: Sequence[Sequence[int] | None],
  *,
  width: int,
  slots: int,
) -> tuple[OpsdBatch, dict[str, float]]:
  """`train` (host arrays, R rows: the rollouts then padding rows) with each rollout's teacher
  row `prompts[i] + response_i` (None: not distilled), as an OpsdBatch of numpy arrays.

  Every response token of a row with a prompt is distilled (the first one too: it is predicted
  from the prompt's last column). A teacher row longer than `width` or a response longer than
  `slots` is a ValueError (the caller sizes both)."""
  tokens = np.asarray(train.tokens)
  r = tokens.shape[0]
  plens, rlens = np.asarray(rollouts.prompt_lens), np.asarray(rollouts.response_lens)
  valid = np.asarray(rollouts.valid)
  t_tokens = np.zeros((r, width), np.int32)
  t_positions = np.zeros((r, width), np.int32)
  s_index = np.zeros((r, slots), np.int32)
  t_index = np.zeros((r, slots), np.int32)
  targets = np.zeros((r, slots), np.int32)
  mask = np.zeros((r, slots), bool)
  for i, prompt in enumerate(prompts):
    if prompt is None or not valid[i]:
      continue
    p, n, tp = int(plens[i]), int(rlens[i]), len(prompt)
    if n > slots or tp + n > width:
      raise ValueError(f"row {i}: response {n} > {slots} slots or teacher row {tp + n} > {width}")
    response = tokens[i, p : p + n]
    t_tokens[i, :tp] = prompt
    t_tokens[i, tp : tp + n] = response
    t_positions[i, : tp + n] = np.arange(tp + n)
    s_index[i, :n] = np.arange(p - 1, p + n - 1)
    t_index[i, :n] = np.arange(tp - 1, tp + n - 1)
    targets[i, :n] = response
    mask[i, :n] = True
  n_tok = mask.sum(axis=1).astype(np.float32)
  scale = np.where(n_tok > 0, 1.0 / max(float(n_tok.sum()), 1.0), 0.0).astype(np.float32)
  fields = {f.name: np.asarray(getattr(train, f.name)) for f in dataclasses.fields(TrainBatch)}
  batch = OpsdBatch(
    **fields,
    teacher_tokens=t_tokens,
    teacher_positions=t_positions,
    student_index=s_index,
    teacher_index=t_index,
    targets=targets,
    distill_mask=mask,
    distill_scale=scale,
  )
  return batch, {"opsd/distill_tokens": float(n_tok.sum())}
