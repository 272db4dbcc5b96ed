"""The two batches of a TAPO step: `Rollouts` (what happened) and `TrainBatch` (what to train on),
and the packing of a TrainBatch's sequences into rows of a fixed width.

Legend: R rows, T tokens per row, Q queries, K samples per query; N sequences, n minibatches,
M micro-batches per minibatch, m rows per micro-batch, W the packed row width.

A Rollouts row is (prompt, response, padding), right-padded to T. Original rows of query q have
group id q; constructed rows have group id Q + q (q = the query they were built from) and
`is_constructed`. `from_learner` marks the tokens the learner sampled in exactly this context,
i.e. those whose `sampler_logprobs` are valid (the anchored prefix of a construction, not its
inserted part). `tapo.loss.prepare_batch` turns Rollouts into a TrainBatch (advantages, filtered
loss mask, loss scales) in the same padded layout, one sequence per row.

A TrainBatch holds everything per token, so the loss never asks which row a token is in: a row may
hold one sequence (prepare_batch's padded layout) or several (packed), told apart by
`segment_ids` (1, 2, ... in a row, 0 on padding), each with its own `positions` 0..len-1.
Packing (`pack_rows`, first-fit decreasing) puts the sequences that have a loss token into rows
of width W, several per row; a `Layout` records where each one went (packed row, first column)
and `pack` gathers every field into [n, M, m, W]. Attention is masked by segment
(tapo_jax.models.attention), logprobs restart at each segment start, and per-sequence reductions
go through `segment_sum`, so every loss term and metric is what the padded layout gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Rollouts:
  """Trajectories in one padded layout; constructed rows have their own group ids."""

  tokens: jax.Array  # [R, T] int32  prompt then response, right-padded
  positions: jax.Array  # [R, T] int32  0..len-1, 0 on padding
  loss_mask: jax.Array  # [R, T] bool   response tokens only
  sampler_logprobs: jax.Array  # [R, T] f32  log p(tokens[t] | tokens[<t]) from the sampler; 0 else
  from_learner: jax.Array  # [R, T] bool   sampler_logprobs valid (sampled in this very context)
  prompt_lens: jax.Array  # [R] int32
  response_lens: jax.Array  # [R] int32  response tokens, EOS included
  truncated: jax.Array  # [R] bool   response hit max_new_tokens / the row length without EOS
  rewards: jax.Array  # [R] f32    verifier reward
  group_ids: jax.Array  # [R] int32  originals: query index q; constructions: Q + q
  is_constructed: jax.Array  # [R] bool
  valid: jax.Array  # [R] bool   False on rows that only pad the batch to a fixed size

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


@flax.struct.dataclass
class TrainBatch:
  """What the update reads, per token (a sequence's values on each of its tokens), normalizers of
  the whole step folded in. Leading dims may be [R] or [n, M, m] rows; the last is T (or W)."""

  tokens: jax.Array  # [R, T] int32
  positions: jax.Array  # [R, T] int32  0..len-1 within the token's sequence, 0 on padding
  segment_ids: jax.Array  # [R, T] int32  1, 2, ... per sequence of the row, 0 on padding
  loss_mask: jax.Array  # [R, T] bool  response tokens of the sequences that are trained
  advantages: jax.Array  # [R, T] f32  the sequence's advantage
  loss_scale: jax.Array  # [R, T] f32  per-token weight of its sequence in L_orig / L_ref (step)
  token_scale: jax.Array  # [R, T] f32  1 / loss tokens of its part (token means in metrics)
  is_constructed: jax.Array  # [R, T] bool
  old_logprobs: jax.Array  # [R, T] f32  π_old, token-aligned (the params the step started with)
  sampler_logprobs: jax.Array  # [R, T] f32  the sampler's, under the distribution it sampled
  sampled: jax.Array  # [R, T] bool  sampler_logprobs valid: sampled by the learner in this context
  is_scale: jax.Array  # [R, T] f32  1 / sampled loss tokens of its part (rollout-IS metrics)

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


def segment_sum(x_RT: jax.Array, segment_ids_RT: jax.Array) -> jax.Array:
  """[R, T]: on each token, the sum of `x` over the tokens of its row that share its segment id
  (a per-sequence total, broadcast back to the sequence's tokens)."""
  r, t = x_RT.shape[-2:]
  rows = jnp.broadcast_to(jnp.arange(r)[:, None], (r, t))
  seg = jnp.clip(segment_ids_RT, 0, t - 1)  # at most T segments in a row of T tokens
  totals = jnp.zeros((r, t), x_RT.dtype).at[rows, seg].add(x_RT)
  return totals[rows, seg]


def pack_rollouts(
  prompts: Sequence[Sequence[int]],
  responses: Sequence[Sequence[int]],
  logprobs: Sequence[Sequence[float]] | None,
  *,
  samples_per_prompt: int,
  max_len: int,
  eos_ids: Sequence[int] = (),
  max_new_tokens: int | None = None,
  rewards: Sequence[float] | None = None,
) -> Rollouts:
  """Host lists (responses prompt-major, K per prompt) -> a padded `Rollouts` on device.

  A response that does not end in an EOS id and has `max_new_tokens` tokens is `truncated`; so is
  one cut to fit `max_len` (prompts longer than `max_len` raise).
  """
  k = samples_per_prompt
  if len(responses) != len(prompts) * k:
    raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x {k} samples")
  r = len(responses)
  tokens = np.zeros((r, max_len), np.int32)
  lps = np.zeros((r, max_len), np.float32)
  prompt_lens = np.zeros(r, np.int32)
  resp_lens = np.zeros(r, np.int32)
  truncated = np.zeros(r, bool)
  eos = set(eos_ids)
  for i, resp in enumerate(responses):
    prompt = list(prompts[i // k])
    if len(prompt) > max_len:
      raise ValueError(f"prompt of {len(prompt)} tokens is longer than max_len={max_len}")
    resp = list(resp)
    ended = bool(resp) and resp[-1] in eos
    hit_limit = max_new_tokens is not None and len(resp) >= max_new_tokens and not ended
    room = max_len - len(prompt)
    truncated[i] = hit_limit or len(resp) > room
    resp = resp[:room]
    p, n = len(prompt), len(resp)
    tokens[i, :p] = prompt
    tokens[i, p : p + n] = resp
    if logprobs is not None:
      lps[i, p : p + n] = np.asarray(logprobs[i], np.float32)[:n]
    prompt_lens[i], resp_lens[i] = p, n
  t = np.arange(max_len)[None]
  lengths = (prompt_lens + resp_lens)[:, None]
  in_resp = (t >= prompt_lens[:, None]) & (t < lengths)
  return Rollouts(
    tokens=jnp.asarray(tokens),
    positions=jnp.asarray(np.where(t < lengths, t, 0).astype(np.int32)),
    loss_mask=jnp.asarray(in_resp),
    sampler_logprobs=jnp.asarray(lps),
    from_learner=jnp.asarray(in_resp & (logprobs is not None)),
    prompt_lens=jnp.asarray(prompt_lens),
    response_lens=jnp.asarray(resp_lens),
    truncated=jnp.asarray(truncated),
    rewards=jnp.asarray(np.zeros(r, np.float32) if rewards is None else np.asarray(rewards)),
    group_ids=jnp.asarray(np.arange(r, dtype=np.int32) // k),
    is_constructed=jnp.zeros(r, bool),
    valid=jnp.ones(r, bool),
  )


def concat_rollouts(a: Rollouts, b: Rollouts) -> Rollouts:
  """Rows of `a` then rows of `b` (same T)."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def take_rows(batch, rows):
  """The rows `rows` (an index array) of every leaf, gathered on the host as numpy arrays: the
  row count varies from step to step, and a device gather would compile once per count."""
  rows = np.asarray(rows)
  return jax.tree.map(lambda x: np.asarray(x)[rows], batch)


def pad_rows(batch: Rollouts, multiple: int) -> Rollouts:
  """Appends invalid all-padding rows until the row count is a multiple of `multiple`."""
  extra = -batch.num_rows % multiple
  if not extra:
    return batch
  return jax.tree.map(lambda x: jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)]),
                      batch)  # fmt: skip


def response_ids(batch: Rollouts, eos_ids: Sequence[int] = ()) -> list[list[int]]:
  """Each row's response token ids on the host, trailing EOS ids removed."""
  tokens, plens, rlens = jax.device_get((batch.tokens, batch.prompt_lens, batch.response_lens))
  eos = set(eos_ids)
  out = []
  for row, p, n in zip(tokens, plens, rlens, strict=True):
    ids = row[p : p + n].tolist()
    while ids and ids[-1] in eos:
      ids.pop()
    out.append(ids)
  return out


# ---- packing -----------------------------------------------------------------------------------


def pack_rows(lengths, width) -> tuple[np.ndarray, np.ndarray, int]:
  """First-fit decreasing: (row [N], start column [N], rows used) placing sequences of `lengths`
  (each <= width) into rows of `width` tokens; ties keep the input order, so the result is a
  function of the lengths and their order alone.

  Pairs (algorithm=opsd: a student row and a teacher row per sequence): `lengths` [N, D] and
  `width` D ints place item i in row[i] of each of D row sets at start[i, d] (start is [N, D]),
  a row taking an item only where all D of its parts fit; items are taken in decreasing order of
  their largest part relative to its width (for D = 1, decreasing length)."""
  lengths = np.asarray(lengths, np.int64)
  one = lengths.ndim == 1
  if one:
    lengths = lengths[:, None]
  width = np.broadcast_to(np.asarray(width, np.int64), lengths.shape[1:])
  over = lengths > width
  if over.any():
    i, d = np.argwhere(over)[0]
    raise ValueError(f"a sequence of {lengths[i, d]} tokens does not fit a row of {width[d]}")
  row = np.zeros(lengths.shape[0], np.int64)
  start = np.zeros(lengths.shape, np.int64)
  free = np.zeros((0, lengths.shape[1]), np.int64)  # tokens left in each open row
  for i in np.argsort(-(lengths / width).max(axis=1, initial=0.0), kind="stable"):
    fits = np.flatnonzero((free >= lengths[i]).all(axis=1))
    if fits.size:
      r = fits[0]
    else:
      r, free = free.shape[0], np.concatenate([free, width[None]])
    row[i], start[i] = r, width - free[r]
    free[r] -= lengths[i]
  return row, start[:, 0] if one else start, int(free.shape[0])


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each packed sequence lies (host arrays): the batch is [n, M, m, W], its rows numbered
  flat (minibatch-major), sequence i at row[i], columns start[i] .. start[i] + length[i] - 1."""

  source: np.ndarray  # [P] int  the sequence's row in the padded batch it is gathered from
  row: np.ndarray  # [P] int  its packed row in 0 .. n·M·m - 1
  start: np.ndarray  # [P] int  its first column
  length: np.ndarray  # [P] int  its tokens (prompt + response)
  shape: tuple[int, int, int, int]  # (n, M, m, W)

  def index(self, first: np.ndarray) -> np.ndarray:
    """[n, M, m, W] int64: each slot's flat index into a source array whose sequence i starts at
    flat index first[i] (its tokens contiguous there); -1 on padding."""
    n, mm, m, w = self.shape
    idx = np.full(n * mm * m * w, -1, np.int64)
    offsets = np.arange(w)
    for f, r, c, ln in zip(first, self.row, self.start, self.length):
      idx[r * w + c : r * w + c + ln] = f + offsets[:ln]
    return idx.reshape(self.shape)

  def segment_ids(self) -> np.ndarray:
    """[n, M, m, W] int32: 1, 2, ... in column order within each row, 0 on padding."""
    n, mm, m, w = self.shape
    seg = np.zeros((n * mm * m, w), np.int32)
    order = np.lexsort((self.start, self.row))
    count = np.zeros(n * mm * m, np.int32)
    for i in order:
      count[self.row[i]] += 1
      seg[self.row[i], self.start[i] : self.start[i] + self.length[i]] = count[self.row[i]]
    return seg.reshape(self.shape)

  def locate(self, source: int) -> tuple[int, int]:
    """(packed row, first column) of the sequence gathered from padded row `source`: its token at
    position p is at column first + p of that row (rows numbered flat over [n, M, m])."""
    (i,) = np.flatnonzero(self.source == source)
    return int(self.row[i]), int(self.start[i])

  def micro_batches_used(self) -> int:
    """Micro-batches holding at least one sequence (the others are skipped by the update)."""
    m = self.shape[2]
    return int(np.unique(self.row // m).size)

  def tokens(self) -> tuple[int, int]:
    """(real tokens, processed tokens: every slot of the micro-batches used)."""
    return int(self.length.sum()), self.micro_batches_used() * self.shape[2] * self.shape[3]


def pack(batch, layout: Layout):
  """Every [R, T] leaf of `batch` (host arrays) gathered into the layout's [n, M, m, W] (zeros on
  padding); `segment_ids` is the layout's. Raises ValueError when a loss token of a packed
  sequence lies beyond its length (it would silently leave the loss)."""
  idx = layout.index(layout.source * batch.tokens.shape[1])
  flat_idx, pad = np.maximum(idx, 0), idx < 0

  def one(x):
    x = np.asarray(x)
    out = x.reshape(-1)[flat_idx]
    return np.where(pad, np.zeros((), x.dtype), out)

  out = jax.tree.map(one, batch)
  if out.loss_mask.sum() != np.asarray(batch.loss_mask)[layout.source].sum():
    raise ValueError("a loss token lies beyond its sequence's length (prompt + response)")
  return out.replace(segment_ids=layout.segment_ids())


def unpack(packed: np.ndarray, layout: Layout, rows: int, width: int) -> np.ndarray:
  """The inverse of `pack` for one leaf: [n, M, m, W] host array -> [rows, width], each packed
  sequence's tokens back in its source row (zeros where no packed sequence lies)."""
  idx = layout.index(layout.source * width).reshape(-1)
  packed = np.asarray(packed).reshape(-1)
  out = np.zeros(rows * width, packed.dtype)
  out[idx[idx >= 0]] = packed[idx >= 0]
  return out.reshape(rows, width)
