"""The two batches of a TAPO step: `Rollouts` (what happened) and `TrainBatch` (what to train on).

Legend: R rows, T tokens per row, Q queries, K samples per query.

A row is (prompt, response, padding), right-padded to T. Original rows of query q have group id q;
constructed rows have group id Q + q (q = the query they were built from) and `is_constructed`.
`from_learner` marks the tokens the learner sampled in exactly this context, i.e. those whose
`sampler_logprobs` are valid (the anchored prefix of a construction, not its inserted part).
`tapo.loss.prepare_batch` turns Rollouts into a TrainBatch (advantages, filtered loss mask, loss
scales); both have fixed shapes and no optional fields.
"""

from __future__ import annotations

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
  """What the update reads: one row per trajectory, normalizers of the whole step folded in."""

  tokens: jax.Array  # [R, T] int32
  positions: jax.Array  # [R, T] int32
  loss_mask: jax.Array  # [R, T] bool  response tokens of the rows that are trained
  advantages: jax.Array  # [R] f32
  loss_scale: jax.Array  # [R] f32  per-token weight of the row in L_orig / L_ref (whole step)
  token_scale: jax.Array  # [R] f32  1 / loss tokens of the row's part (token means in metrics)
  is_constructed: jax.Array  # [R] bool
  old_logprobs: jax.Array  # [R, T] f32  π_old, token-aligned (the params the step started with)
  sampler_logprobs: jax.Array  # [R, T] f32  the sampler's, under the distribution it sampled
  sampled: jax.Array  # [R, T] bool  sampler_logprobs valid: sampled by the learner in this context
  is_scale: jax.Array  # [R] f32  1 / sampled loss tokens of the row's part (rollout-IS metrics)

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


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
