"""The rule-based construction: cut y⁻ at its first step that differs from y⁺ (no generation).

Legend: T tokens per row, C construction rows, V vocab.

y⁻ and y⁺ are split into steps at separator tokens (every vocabulary entry whose text holds a
newline), compared ignoring whitespace-only tokens; the trajectory is y⁻ up to and including its
first step that differs from y⁺, the diagnosis template, then y⁺ from the start of that same step.
The differing step of y⁻ is kept on purpose: the diagnosis ("Wait, this step is wrong") refers to
it. Everything runs on device, in one jitted call. Every construction ends in y⁺'s answer, so
G_ref has no variance: train them with tapo.ref_baseline = "orig" (see tapo.advantages).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tapo_jax.tapo import dcs
from tapo_jax.tapo.batch import Rollouts
from tapo_jax.tapo.construct import (
  TokenTables,
  body_ends,
  constructed_rows,
  inserted_tokens,
  learner_tokens,
  pair_rows,
)
from tapo_jax.tapo.splice import splice


def diagnosis_tokens(tokenizer, template: str) -> tuple[jax.Array, jax.Array]:
  """(diagnosis ids [W], joiner id): the newline token put before the diagnosis when y⁻'s cut
  does not end a line (-1 when "\\n" is not one token)."""
  diag = tokenizer.encode(template, add_special_tokens=False)
  nl = tokenizer.encode("\n", add_special_tokens=False)
  return jnp.asarray(diag, jnp.int32).reshape(-1), jnp.int32(nl[0] if len(nl) == 1 else -1)


def _content(tokens_T, start, end, ignore_V):
  """Tokens of [start, end) that are not ignored, compacted to the front: (ids, at, count)."""
  t = jnp.arange(tokens_T.shape[0], dtype=jnp.int32)
  keep = (t >= start) & (t < end) & ~ignore_V[tokens_T]
  rank = jnp.cumsum(keep) - 1
  at = jnp.zeros_like(t).at[jnp.where(keep, rank, t.shape[0])].set(t, mode="drop")
  return tokens_T[at], at, keep.sum()


def _divergence_cut(neg_T, neg_start, neg_end, pos_T, pos_start, pos_end, tables: TokenTables):
  """One pair: (end of y⁻'s first differing step, start of that step in y⁺, ok) in row coords."""
  c_neg, at_neg, n_neg = _content(neg_T, neg_start, neg_end, tables.is_space)
  c_pos, at_pos, n_pos = _content(pos_T, pos_start, pos_end, tables.is_space)
  t = jnp.arange(neg_T.shape[0], dtype=jnp.int32)
  n_common = jnp.minimum(n_neg, n_pos)
  differ = (t < n_common) & (c_neg != c_pos)
  d = jnp.where(differ.any(), jnp.argmax(differ), n_common)  # first differing content index
  ok = d < n_pos  # y⁺ has something to continue with (false when identical)
  d_neg = jnp.where(d < n_neg, at_neg[jnp.minimum(d, t.shape[0] - 1)], neg_end)
  d_pos = jnp.where(ok, at_pos[jnp.minimum(d, t.shape[0] - 1)], pos_end)
  sep_after = tables.is_sep[neg_T] & (t >= d_neg) & (t < neg_end)
  neg_cut = jnp.where(sep_after.any(), jnp.argmax(sep_after) + 1, neg_end)
  sep_before = tables.is_sep[pos_T] & (t >= pos_start) & (t < d_pos)
  last = jnp.max(jnp.where(sep_before, t, -1))
  pos_from = jnp.where(last >= 0, last + 1, pos_start)
  return neg_cut.astype(jnp.int32), pos_from.astype(jnp.int32), ok


@functools.partial(jax.jit, static_argnames=("k",))
def divergence_rows(
  batch: Rollouts,
  cands: dcs.Candidates,
  diagnosis_ids: jax.Array,
  joiner_id: jax.Array,
  tables: TokenTables,
  *,
  k: int,
) -> tuple[Rollouts, jax.Array]:
  """The C divergence constructions (rewards unset) and their anchored-prefix lengths [C]."""
  neg, pos, group, valid = pair_rows(batch, cands, k)
  body = body_ends(batch, tables.is_eos)
  ends = batch.prompt_lens + batch.response_lens
  plen = batch.prompt_lens
  cut = jax.vmap(functools.partial(_divergence_cut, tables=tables))
  neg_cut, pos_from, ok = cut(
    batch.tokens[neg], plen[neg], body[neg], batch.tokens[pos], plen[pos], body[pos]
  )
  ok &= valid
  last = jnp.take_along_axis(batch.tokens[neg], jnp.maximum(neg_cut - 1, 0)[:, None], 1)[:, 0]
  join = (neg_cut > plen[neg]) & ~tables.is_sep[last] & (joiner_id >= 0)
  c = neg.shape[0]
  zeros = jnp.zeros((c,), jnp.int32)
  sp = splice(
    (
      learner_tokens(batch, neg),
      inserted_tokens(jnp.maximum(joiner_id, 0).reshape(1, 1)),
      inserted_tokens(diagnosis_ids[None]),
      inserted_tokens(batch.tokens[pos]),  # y⁺'s tokens in a new context: no sampler logprob
    ),
    (zeros, zeros, zeros, pos_from),
    (neg_cut, join.astype(jnp.int32), zeros + diagnosis_ids.shape[0], ends[pos]),
    out_len=batch.tokens.shape[1],
  )
  rows = constructed_rows(sp, plen[neg], group, ok)
  rows = rows.replace(truncated=rows.truncated | (ok & batch.truncated[pos]))  # y⁺ had no end
  return rows, jnp.where(ok, neg_cut - plen[neg], 0)
