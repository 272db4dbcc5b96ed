"""Language-model logprobs: token-aligned log p and entropy of given tokens under a model,
computed over the vocabulary in chunks, so no [B, T, V] array is ever live.

Legend: B (or R) rows, T tokens, D model, V vocab.

Alignment: logprobs and entropies are token-aligned like the sampler's, lp[:, t] =
log p(tokens[t] | tokens[<t]) (predicted from hidden[:, t-1]), H[:, t] the entropy of that same
distribution, and lp = H = 0 at the first token of every sequence (column 0, and in packed rows
every segment start: `segment_ids`). Used by the TAPO / GRPO loss, OPSD's, SFT and π_old.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs_and_entropy(
  hidden_BTD: jax.Array, lm_head_DV: jax.Array, targets_BT: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  """(log p(targets[b,t] | hidden[b,t]), entropy of that distribution), both [B, T] f32.

  The vocabulary is scanned `chunk` entries at a time with an online logsumexp; the chunk body is
  rematerialized in the backward pass, so no [B, T, V] array is ever live (forward or backward).
  """
  d, v = lm_head_DV.shape
  chunk = int(min(chunk, v))
  n_chunks = -(-v // chunk)
  b, t = targets_BT.shape

  @jax.checkpoint
  def body(carry, i):
    m, s, ent_acc, tgt = carry
    lo = i * chunk
    start = jnp.minimum(lo, v - chunk)  # the last chunk is shifted back to stay in bounds
    w = jax.lax.dynamic_slice_in_dim(lm_head_DV, start, chunk, axis=1)
    logits = jnp.einsum("btd,dc->btc", hidden_BTD, w, preferred_element_type=jnp.float32)
    col = start + jnp.arange(chunk)
    new = col >= lo  # columns not already seen by an earlier chunk
    seen = jnp.where(new, logits, -1e30)
    m_new = jnp.maximum(m, jax.lax.stop_gradient(seen.max(axis=-1)))
    e = jnp.exp(seen - m_new[..., None])  # 0 on columns already seen
    decay = jnp.exp(m - m_new)
    s = s * decay + e.sum(axis=-1)
    ent_acc = ent_acc * decay + (e * logits).sum(axis=-1)
    hit = new & (col == targets_BT[..., None])
    tgt = tgt + jnp.where(hit, logits, 0.0).sum(axis=-1)
    return (m_new, s, ent_acc, tgt), None

  zeros = jnp.zeros((b, t), jnp.float32)
  init = (jnp.full((b, t), -1e30, jnp.float32), zeros, zeros, zeros)
  (m, s, ent_acc, tgt), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
  lse = m + jnp.log(s)
  return tgt - lse, lse - ent_acc / s


def sequence_logprobs(
  hidden_BTD: jax.Array,
  lm_head_DV: jax.Array,
  tokens_BT: jax.Array,
  chunk: int,
  segment_ids_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Token-aligned (logprobs, entropies) [B, T] of `tokens` under the model's hidden states; 0 at
  column 0 and, given segment ids, at each segment's first token (it has no context) and on
  padding (segment 0)."""
  lp, ent = token_logprobs_and_entropy(hidden_BTD[:, :-1], lm_head_DV, tokens_BT[:, 1:], chunk)
  if segment_ids_BT is not None:  # token t continues token t - 1's sequence
    cont = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, 1:] > 0)
    lp, ent = jnp.where(cont, lp, 0.0), jnp.where(cont, ent, 0.0)
  pad = jnp.zeros((tokens_BT.shape[0], 1), jnp.float32)
  return jnp.concatenate([pad, lp], axis=1), jnp.concatenate([pad, ent], axis=1)


def logprobs_and_entropy(
  model, tokens, positions, segment_ids, chunk: int, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """[R, T] token-aligned (logprobs, entropies) of `tokens` under `model` at `temperature`, on
  padded or packed rows (segment_ids None: one sequence per row)."""
  head = model.lm_head() if temperature == 1.0 else model.lm_head() / temperature
  hidden = model.hidden(tokens, positions, segment_ids)
  return sequence_logprobs(hidden, head, tokens, chunk, segment_ids)


def logprobs(model, tokens, positions, chunk: int, temperature: float = 1.0, segment_ids=None):
  """[R, T] token-aligned logprobs of `tokens` under `model` at `temperature` (π_old)."""
  return logprobs_and_entropy(model, tokens, positions, segment_ids, chunk, temperature)[0]
