"""The OPSD batch: the student's rows (a TrainBatch) and the teacher's own rows, aligned by index,
padded (`with_teacher`, one sequence per row) or packed (`layout` + `pack`, several per row).

Legend: R rows, T student row length, U teacher row length, N distilled-token slots per row;
n minibatches, M micro-batches per minibatch, m rows per micro-batch, W = tapo.max_len.

The same response token sits at different columns in the two rows (the teacher's prompt holds the
privileged solution), so the loss never assumes a layout: for each distilled token n of row r the
batch says which column of the student's row predicts it (`student_index`, the hidden state
before the token), which column of the teacher's row does (`teacher_index`), and which token it
is (`targets`). The loss gathers both final hidden states at those columns and compares the two
next-token distributions there.

Packing (what the RL loop trains on, as GRPO/TAPO's packed rows): each sequence is a pair, its
student part (prompt + response, ≤ W) and its teacher part (teacher prompt + the same response,
≤ U), and the pairs are packed first-fit decreasing into *paired rows* (`tapo.batch.pack_rows` on
[P, 2] lengths): student row r (W wide) and teacher row r (U wide) hold the same sequences, each
part at its own column, a row taking a pair only when both parts fit. A micro-batch's student
and teacher rows hold the same sequences and are split over the data axes together, so a token's
two hidden states lie on one device and the loss's gathers stay row-local. A row fills up to
whichever side binds first: as densely as GRPO's rows when U / W is the teacher / student length
ratio (configs/qwen7b_opsd.py: 1.7 for ~2), less where the teacher binds early (the smoke toy: 1.2
for ~1.9; a larger opsd.max_len balances it). The distilled slots of packed row r are those of its
sequences, in turn, their columns shifted by each part's start: N = W in the packed form (a row's
distilled tokens are distinct student columns). Sequences with
no distilled token (and, with opsd.grpo_coef > 0, no loss token) are left out, as GRPO leaves out
sequences without a loss token.

`distill_scale` is each distilled token's weight in the divergence term, normalized over the whole
step's distilled tokens (token-mean, as the OPSD code's loss), so micro-batch losses sum to the
full-batch loss like every other term; `minibatches.packed_minibatches` scales it with
`loss_scale`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from tapo_jax import minibatches
from tapo_jax.tapo import batch as tapo_batch
from tapo_jax.tapo.batch import Layout, Rollouts, TrainBatch


@flax.struct.dataclass
class OpsdBatch(TrainBatch):
  """A TrainBatch (the GRPO term reads it when opsd.grpo_coef > 0) plus the teacher's side."""

  teacher_tokens: jax.Array  # [R, U] int32  teacher prompt then the row's own response, padded
  teacher_positions: jax.Array  # [R, U] int32  0..len-1, 0 on padding
  teacher_segment_ids: jax.Array  # [R, U] int32  1, 2, ... per sequence of the row, 0 on padding
  student_index: jax.Array  # [R, N] int32  student column whose hidden state predicts token n
  teacher_index: jax.Array  # [R, N] int32  teacher column whose hidden state predicts token n
  targets: jax.Array  # [R, N] int32  the response token n itself
  distill_mask: jax.Array  # [R, N] bool  a distilled token (the row has a privileged solution)
  distill_scale: jax.Array  # [R, N] f32  the token's weight in the divergence term (whole step)


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
  t_segments = np.zeros((r, width), np.int32)
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
    t_segments[i, : tp + n] = 1
    s_index[i, :n] = np.arange(p - 1, p + n - 1)
    t_index[i, :n] = np.arange(tp - 1, tp + n - 1)
    targets[i, :n] = response
    mask[i, :n] = True
  n_tok = mask.sum(axis=1).astype(np.float32)
  scale = np.where(mask, 1.0 / max(float(n_tok.sum()), 1.0), 0.0).astype(np.float32)
  fields = {f.name: np.asarray(getattr(train, f.name)) for f in dataclasses.fields(TrainBatch)}
  batch = OpsdBatch(
    **fields,
    teacher_tokens=t_tokens,
    teacher_positions=t_positions,
    teacher_segment_ids=t_segments,
    student_index=s_index,
    teacher_index=t_index,
    targets=targets,
    distill_mask=mask,
    distill_scale=scale,
  )
  return batch, {"opsd/distill_tokens": float(n_tok.sum())}


@dataclasses.dataclass(frozen=True)
class PairLayout:
  """Where each packed sequence's student and teacher parts lie: two Layouts with the same
  sources and rows ([n, M, m, W] and [n, M, m, U])."""

  student: Layout
  teacher: Layout

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return self.student.shape

  def micro_batches_used(self) -> int:
    return self.student.micro_batches_used()

  def tokens(self) -> tuple[int, int]:
    """(real tokens, processed tokens) of both forwards: the student's and the teacher's."""
    (a, b), (c, d) = self.student.tokens(), self.teacher.tokens()
    return a + c, b + d


def layout(
  batch: OpsdBatch, key, *, n: int, m: int, num_micro: int, with_loss_tokens: bool
) -> PairLayout:
  """The step's paired layout of the padded `batch` ([n, M = num_micro, m, W] student rows of
  its T, [n, M, m, U] teacher rows of its U): `minibatches.layout_minibatches` on [student,
  teacher] lengths, over the sequences with a distilled token (or, `with_loss_tokens`: the GRPO
  term runs, a loss token)."""
  trained = np.asarray(batch.distill_mask).any(axis=1)
  if with_loss_tokens:
    trained |= np.asarray(batch.loss_mask).any(axis=1)
  seg_s, seg_t = np.asarray(batch.segment_ids), np.asarray(batch.teacher_segment_ids)
  lengths = np.stack([seg_s.sum(axis=1), seg_t.sum(axis=1)], axis=1)
  constructed = np.asarray(batch.is_constructed)[:, 0]
  widths = (seg_s.shape[1], seg_t.shape[1])
  student, teacher = minibatches.layout_minibatches(
    lengths, trained, constructed, key, n, m, widths, num_micro
  )
  return PairLayout(student, teacher)


def pack(batch: OpsdBatch, layout: PairLayout) -> OpsdBatch:
  """The padded `batch` (host arrays) gathered into `layout`: the TrainBatch fields as
  `tapo.batch.pack` gathers them, the teacher's rows by the teacher layout, and each packed row's
  distilled slots (N = W) those of its sequences in turn, their columns shifted to the parts'
  starts (zeros past the row's last distilled token)."""
  s, t = layout.student, layout.teacher
  train = tapo_batch.pack(
    TrainBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(TrainBatch)}), s
  )
  u = np.asarray(batch.teacher_tokens).shape[1]
  idx = t.index(t.source * u)
  flat, pad = np.maximum(idx, 0), idx < 0

  def teacher(x):
    x = np.asarray(x)
    return np.where(pad, np.zeros((), x.dtype), x.reshape(-1)[flat])

  n, mm, m, w = s.shape
  rows = n * mm * m
  s_index, t_index, targets = (np.zeros((rows, w), np.int32) for _ in range(3))
  mask, scale = np.zeros((rows, w), bool), np.zeros((rows, w), np.float32)
  src_mask = np.asarray(batch.distill_mask)
  src_s, src_t = np.asarray(batch.student_index), np.asarray(batch.teacher_index)
  src_targets, src_scale = np.asarray(batch.targets), np.asarray(batch.distill_scale)
  fill = np.zeros(rows, np.int64)
  for src, r, cs, ct in zip(s.source, s.row, s.start, t.start, strict=True):
    sel = np.flatnonzero(src_mask[src])
    lo, hi = fill[r], fill[r] + sel.size  # never past W: the slots are distinct student columns
    s_index[r, lo:hi] = cs + src_s[src, sel]
    t_index[r, lo:hi] = ct + src_t[src, sel]
    targets[r, lo:hi] = src_targets[src, sel]
    scale[r, lo:hi] = src_scale[src, sel]
    mask[r, lo:hi] = True
    fill[r] = hi
  shape = (n, mm, m, w)
  return OpsdBatch(
    **{f.name: getattr(train, f.name) for f in dataclasses.fields(TrainBatch)},
    teacher_tokens=teacher(batch.teacher_tokens),
    teacher_positions=teacher(batch.teacher_positions),
    teacher_segment_ids=t.segment_ids(),
    student_index=s_index.reshape(shape),
    teacher_index=t_index.reshape(shape),
    targets=targets.reshape(shape),
    distill_mask=mask.reshape(shape),
    distill_scale=scale.reshape(shape),
  )
