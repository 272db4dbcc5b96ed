"""What both micro-reflective constructions share: pairs, per-token sources, the row layout.

Legend: R rollout rows, T tokens per row, Q queries, K samples per query, M = m_max pairs per
query, C = Q*M construction rows (fixed; unused slots are invalid rows), V vocab.

A construction is spliced (tapo.splice) from per-token sources: y⁻'s own tokens with their sampler
logprobs (`learner_tokens`, the anchored prefix), and text the learner did not sample in this
context (`inserted_tokens`: a diagnosis, y⁺'s continuation, the policy's rewrite). The trained
row is the original query prompt followed by the constructed response (`constructed_rows`);
its reward is set by the loop after grading, exactly as for originals. The two constructions
live in `tapo.divergence` (rule-based) and `tapo.synthesis` (the paper's, written by the policy).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tapo_jax.tapo import dcs
from tapo_jax.tapo.batch import Rollouts
from tapo_jax.tapo.splice import Spliced

CONSTRUCTIONS = ("policy", "divergence")  # tapo.construction: tapo.synthesis, tapo.divergence


@flax.struct.dataclass
class TokenTables:
  """Per-vocabulary-entry flags used to find steps and response ends on device."""

  is_sep: jax.Array  # [V] bool  the token's text holds a newline: a step ends after it
  is_space: jax.Array  # [V] bool  the token's text is whitespace only: ignored when comparing
  is_eos: jax.Array  # [V] bool


def token_tables(tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> TokenTables:
  """Scans the vocabulary once (host); ids the tokenizer cannot decode are neither."""
  sep = np.zeros(vocab_size, bool)
  space = np.zeros(vocab_size, bool)
  for i in range(vocab_size):
    try:
      text = tokenizer.decode([i])
    except Exception:  # ids past the tokenizer's vocabulary (padded embeddings)
      continue
    sep[i] = "\n" in text
    space[i] = bool(text) and not text.strip()
  eos = np.zeros(vocab_size, bool)
  eos[list(eos_ids)] = True
  return TokenTables(jnp.asarray(sep), jnp.asarray(space & ~eos), jnp.asarray(eos))


@functools.partial(jax.jit, static_argnames=("k", "n_pos", "n_neg", "m_max"))
def select(originals: Rollouts, key: jax.Array, *, k: int, n_pos: int, n_neg: int, m_max: int):
  """DCS over graded originals (prompt-major, K per query): the [Q, M] candidate pairs."""
  q = originals.num_rows // k
  correct = (originals.rewards > 0.5).reshape(q, k) & originals.valid.reshape(q, k)
  return dcs.select_candidates(correct, key, n_pos, n_neg, m_max)


def pair_rows(batch: Rollouts, cands: dcs.Candidates, k: int):
  """(neg rows, pos rows, group ids of the constructions, valid) flattened to [C]."""
  neg, pos = cands.rows(k)
  q, m = cands.valid.shape
  group = q + jnp.repeat(jnp.arange(q, dtype=jnp.int32), m)
  return neg, pos, group, cands.valid.reshape(-1) & batch.valid[neg] & batch.valid[pos]


def body_ends(batch: Rollouts, is_eos: jax.Array) -> jax.Array:
  """[R] end of each response without a final EOS token."""
  ends = batch.prompt_lens + batch.response_lens
  last = jnp.take_along_axis(batch.tokens, jnp.maximum(ends - 1, 0)[:, None], axis=1)[:, 0]
  drop = (batch.response_lens > 0) & is_eos[last]
  return ends - drop.astype(jnp.int32)


def learner_tokens(batch: Rollouts, rows: jax.Array) -> dict[str, jax.Array]:
  """Splice source: rows' own tokens with their sampler logprobs."""
  return dict(
    tokens=batch.tokens[rows],
    logprobs=batch.sampler_logprobs[rows],
    from_learner=batch.from_learner[rows],
  )


def inserted_tokens(tokens_N_W: jax.Array) -> dict[str, jax.Array]:
  """Splice source: text the learner did not sample here (no sampler logprob)."""
  tokens = jnp.asarray(tokens_N_W, jnp.int32)
  return dict(
    tokens=tokens,
    logprobs=jnp.zeros(tokens.shape, jnp.float32),
    from_learner=jnp.zeros(tokens.shape, bool),
  )


def constructed_rows(
  sp: Spliced, prompt_lens: jax.Array, group_ids: jax.Array, ok: jax.Array
) -> Rollouts:
  """Constructed rows from spliced (prompt + response) rows; rewards set after grading."""
  t = jnp.arange(sp.positions.shape[1])[None]
  resp = (t >= prompt_lens[:, None]) & (t < sp.lengths[:, None]) & ok[:, None]
  return Rollouts(
    tokens=sp.values["tokens"],
    positions=sp.positions,
    loss_mask=resp,
    sampler_logprobs=jnp.where(resp, sp.values["logprobs"], 0.0),
    from_learner=resp & sp.values["from_learner"],
    prompt_lens=prompt_lens,
    response_lens=jnp.where(ok, sp.lengths - prompt_lens, 0),
    truncated=sp.overflow & ok,
    rewards=jnp.zeros(ok.shape, jnp.float32),
    group_ids=group_ids,
    is_constructed=jnp.ones(ok.shape, bool),
    valid=ok,
  )


def construction_metrics(
  cands: dcs.Candidates, rows: Rollouts, prefix_lens: jax.Array
) -> dict[str, float]:
  """Host metrics of graded constructions: attempted, built (`constructions_parsed`: parsed and
  anchored for `policy`), correct, truncated, and the anchored share of each response
  (mean and 10/50/90% quantiles)."""
  valid, rewards, truncated, resp = jax.device_get(
    (rows.valid, rows.rewards, rows.truncated, rows.response_lens)
  )
  frac = (np.asarray(prefix_lens) / np.maximum(resp, 1))[valid]
  quantiles = np.quantile(frac, (0.1, 0.5, 0.9)) if frac.size else np.zeros(3)
  return {
    **{n: float(v) for n, v in dcs.dcs_metrics(cands).items()},
    "tapo/constructions_attempted": float(np.asarray(cands.valid).sum()),
    "tapo/constructions_parsed": float(valid.sum()),
    "tapo/constructions_correct": float((rewards[valid] > 0.5).sum()),
    "tapo/constructions_truncated": float(truncated.sum()),
    "tapo/anchored_fraction": float(frac.mean()) if frac.size else 0.0,
    "tapo/anchored_fraction_p10": float(quantiles[0]),
    "tapo/anchored_fraction_p50": float(quantiles[1]),
    "tapo/anchored_fraction_p90": float(quantiles[2]),
  }
