"""The TAPO / GRPO loss: chunked logprobs, PPO-clip with OTS, DAE, additive over micro-batches.

Legend: R rows, T tokens, D model, V vocab, C vocabulary chunk.

Alignment: logprobs and entropies are token-aligned like the sampler's, lp[:, t] =
log p(tokens[t] | tokens[<t]) (predicted from hidden[:, t-1]), H[:, t] the entropy of that same
distribution, and lp = H = 0 at the first token of every sequence (column 0, and in packed rows
every segment start: `segment_ids`).

Layout: the loss reads a `TrainBatch`, whose fields are all per token, so it is the same function
on prepare_batch's padded rows and on packed rows (several sequences per row). The one
per-sequence quantity, seq-mask's geometric mean, is a segment sum (`batch.segment_sum`).

`prepare_batch` runs once over the whole step's rows (rewards -> advantages, masks, per-row loss
scales) and returns a `TrainBatch`; `tapo_loss` on any micro-batch of it then returns that
micro-batch's share, so the sum over micro-batches is the full-batch loss (and the metrics sum to
full-batch means):
  L = L_orig + λ · L_ref,  each aggregated over its own rows (token-mean by default),
  per token: ρ_t · w_t · max(-A r_t, -A clip(r_t, 1-ε_low, 1+ε_high)),  r_t = π_θ(y_t) / π_old(y_t),
  w_t = clamp(exp(sg(log π_θ(y_t) + H_t)), ots_min, ots_max) on constructed rows (OTS), else 1.
All policy probabilities are taken at the rollout temperature (logits / T), the distribution the
sampler drew from.

Rollout correction (loss.rollout_is) weighs the gap between the sampler and π_old: the sampler's
own logprobs (decode path: KV cache, its dtype, top-p/top-k truncation) against the trainer's
forward, u_t = π_old(y_t) / π_sampler(y_t), on the tokens the learner sampled in this context —
every response token of an original and the anchored prefix of a construction. Inserted tokens
of a construction (a diagnosis, y⁺'s steps, the policy's rewrite) were never sampled here: they
are off-policy by design, get ρ_t = 1 and are left to OTS.
  off        ρ_t = 1 (the ratios are still measured: rollout_is/* metrics)
  token-tis  ρ_t = sg(min(u_t, C))                      truncated importance sampling, C = cap
  seq-mask   ρ_t = 1 if the row's geometric-mean u lies in [lo, hi] (over its sampled tokens),
             else 0 for the whole row (a construction whose anchored prefix left the band too)
Both jitted pieces read a `LossConfig`: a small frozen, hashable view of the keys they use.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tapo_jax.tapo import advantages as adv_lib
from tapo_jax.tapo.batch import Rollouts, TrainBatch, segment_sum


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Exactly the config keys `prepare_batch` and `tapo_loss` read (a jit static argument)."""

  algorithm: str = "tapo"  # grpo ignores constructed rows
  max_new_tokens: int = 1024  # rollout.max_new_tokens: overlong penalty, token-sum-norm
  eps_low: float = 0.2
  eps_high: float = 0.28
  adv_eps: float = 1e-6
  aggregation: str = "token-mean"
  vocab_chunk: int = 4096
  filter_zero_variance: bool = True
  mask_truncated: bool = False
  overlong_penalty: float = 0.0
  overlong_buffer: int = 256
  ref_scope: str = "batch"
  ref_baseline: str = "group"
  keep_failed: bool = True
  lam: float = 1.0
  ots: bool = True
  ots_min: float = 0.01
  ots_max: float = 10.0
  temperature: float = 1.0  # rollout.temperature: π at the distribution sampled from
  rollout_is: str = "off"  # off | token-tis | seq-mask
  rollout_is_cap: float = 2.0  # C of token-tis
  rollout_is_band: tuple[float, float] = (0.5, 2.0)  # [lo, hi] of seq-mask

  @classmethod
  def from_config(cls, cfg) -> LossConfig:
    """From a base_config() tree (validated by config.check_enums)."""
    lc, tc = cfg.loss, cfg.tapo
    return cls(
      algorithm=cfg.algorithm,
      max_new_tokens=int(cfg.rollout.max_new_tokens),
      eps_low=float(lc.eps_low),
      eps_high=float(lc.eps_high),
      adv_eps=float(lc.adv_eps),
      aggregation=lc.aggregation,
      vocab_chunk=int(lc.vocab_chunk),
      filter_zero_variance=bool(lc.filter_zero_variance),
      mask_truncated=bool(lc.mask_truncated),
      overlong_penalty=float(lc.overlong_penalty),
      overlong_buffer=int(lc.overlong_buffer),
      ref_scope=tc.ref_scope,
      ref_baseline=tc.ref_baseline,
      keep_failed=bool(tc.keep_failed),
      lam=float(tc.lam),
      ots=bool(tc.ots),
      ots_min=float(tc.ots_min),
      ots_max=float(tc.ots_max),
      temperature=float(cfg.rollout.temperature) or 1.0,
      rollout_is=lc.rollout_is,
      rollout_is_cap=float(lc.rollout_is_cap),
      rollout_is_band=tuple(float(x) for x in lc.rollout_is_band),
    )


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


@functools.partial(jax.jit, static_argnames=("cfg",))
def prepare_batch(batch: Rollouts, cfg: LossConfig) -> tuple[TrainBatch, dict[str, jax.Array]]:
  """Whole step: penalties -> DAE advantages -> filtered loss mask -> per-row loss scales.

  grpo ignores constructed rows. The overlong penalty applies to originals only (constructions
  are not bounded by max_new_tokens). Zero-variance groups (originals' and G_ref alike) and, with
  mask_truncated, truncated rows keep their place in the statistics but leave the loss.
  `old_logprobs` is left at 0: the loop fills it with the step's starting params. The TrainBatch
  is in the padded layout: one sequence per row (segment id 1 on its tokens, 0 on padding), each
  sequence's values on all T tokens of its row.
  """
  constructed = batch.is_constructed
  rows = batch.valid & (~constructed if cfg.algorithm == "grpo" else True)
  rows = adv_lib.included_rows(batch.rewards, constructed, rows, cfg.keep_failed)
  penalty = adv_lib.overlong_penalty(
    batch.response_lens, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
  )
  rewards = batch.rewards + jnp.where(constructed, 0.0, penalty)
  advantages = adv_lib.decoupled_advantages(
    rewards, batch.group_ids, constructed, rows, cfg.ref_scope, cfg.adv_eps,
    baseline=cfg.ref_baseline,
  )  # fmt: skip
  groups = adv_lib.dae_groups(batch.group_ids, constructed, cfg.ref_scope, cfg.ref_baseline)
  zero_var = adv_lib.zero_variance_rows(rewards, groups, rows)
  if cfg.ref_baseline == "orig":  # constructions: no signal exactly when r equals the baseline
    zero_var = jnp.where(constructed, rows & (advantages == 0.0), zero_var)
  trained = rows
  if cfg.filter_zero_variance:
    trained = trained & ~zero_var
  if cfg.mask_truncated:
    trained = trained & ~batch.truncated
  loss_mask = batch.loss_mask & trained[:, None]
  n_tok = loss_mask.sum(axis=1).astype(jnp.float32)

  def total(x, part):
    return jnp.maximum(jnp.sum(jnp.where(part, x, 0.0)), 1.0)

  tokens_in = jnp.where(constructed, total(n_tok, constructed), total(n_tok, ~constructed))
  has_tok = (n_tok > 0).astype(jnp.float32)
  seqs_in = jnp.where(constructed, total(has_tok, constructed), total(has_tok, ~constructed))
  if cfg.aggregation == "token-mean":
    scale = 1.0 / tokens_in
  elif cfg.aggregation == "seq-mean-token-mean":
    scale = 1.0 / (seqs_in * jnp.maximum(n_tok, 1.0))
  else:  # seq-mean-token-sum-norm
    scale = jnp.full(n_tok.shape, 1.0 / cfg.max_new_tokens) / seqs_in
  scale = scale * has_tok
  sampled = loss_mask & batch.from_learner
  n_sampled = sampled.sum(axis=1).astype(jnp.float32)
  is_in = jnp.where(constructed, total(n_sampled, constructed), total(n_sampled, ~constructed))
  ref_rows = rows & constructed
  per_token = lambda x: jnp.broadcast_to(x[:, None], batch.tokens.shape)  # noqa: E731
  t = jnp.arange(batch.tokens.shape[1])[None]
  real = t < (batch.prompt_lens + batch.response_lens)[:, None]
  metrics = {
    "loss/rows_trained": trained.sum().astype(jnp.float32),
    "loss/zero_variance_rows": zero_var.sum().astype(jnp.float32),
    "tapo/ref_rows": ref_rows.sum().astype(jnp.float32),
    **adv_lib.ref_stats(advantages, ref_rows),
  }
  train = TrainBatch(
    tokens=batch.tokens,
    positions=batch.positions,
    segment_ids=real.astype(jnp.int32),
    loss_mask=loss_mask,
    advantages=per_token(advantages),
    loss_scale=per_token(scale),
    token_scale=per_token(1.0 / tokens_in),
    is_constructed=per_token(constructed),
    old_logprobs=jnp.zeros(batch.tokens.shape, jnp.float32),
    sampler_logprobs=jnp.where(sampled, batch.sampler_logprobs, 0.0),
    sampled=sampled,
    is_scale=per_token(1.0 / is_in),
  )
  return train, metrics


def ots_weights(logprobs: jax.Array, entropy: jax.Array, lo: float, hi: float) -> jax.Array:
  """OOD token suppression: clamp(exp(log π(y_t) + H_t), lo, hi), no gradient."""
  s = jax.lax.stop_gradient(logprobs + entropy)
  return jnp.clip(jnp.exp(jnp.minimum(s, 80.0)), lo, hi)


def rollout_correction(
  batch: TrainBatch, cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(ρ [R, T], no gradient: see the module docstring; metrics of u = π_old / π_sampler on the
  sampled tokens, originals and constructed prefixes apart)."""
  sampled = batch.sampled & batch.loss_mask
  log_u = jnp.where(sampled, batch.old_logprobs - batch.sampler_logprobs, 0.0)
  u = jnp.exp(jnp.minimum(log_u, 80.0))
  rho = jnp.ones_like(u)
  lo, hi = cfg.rollout_is_band
  n = segment_sum(sampled.astype(jnp.float32), batch.segment_ids)  # the sequence's, per token
  geo = jnp.exp(segment_sum(log_u, batch.segment_ids) / jnp.maximum(n, 1.0))
  seq_out = (n > 0) & ((geo < lo) | (geo > hi))
  if cfg.rollout_is == "token-tis":
    rho = jnp.where(sampled, jnp.minimum(u, cfg.rollout_is_cap), 1.0)
  elif cfg.rollout_is == "seq-mask":
    rho = jnp.where(seq_out, 0.0, rho)
  constructed = batch.is_constructed
  mean = batch.is_scale * sampled  # sums to 1 over each part's sampled tokens (step)
  metrics = {}
  for part, where in (("orig", mean * ~constructed), ("ref", mean * constructed)):
    metrics[f"rollout_is/{part}_ratio_mean"] = jnp.sum(u * where)
    metrics[f"rollout_is/{part}_ratio_max"] = jnp.max(jnp.where(where > 0, u, 0.0))
    metrics[f"rollout_is/{part}_capped_frac"] = jnp.sum((u > cfg.rollout_is_cap) * where)
    metrics[f"rollout_is/{part}_masked_frac"] = jnp.sum(seq_out * where)
  return jax.lax.stop_gradient(rho), metrics


def policy_loss(
  logprobs_RT: jax.Array, entropy_RT: jax.Array, batch: TrainBatch, cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The summed, scaled PPO-clip (+ OTS, + rollout correction) loss of `batch` (a micro-batch)
  and its metrics (additive over micro-batches; names ending in _max combine by max)."""
  mask = batch.loss_mask
  constructed = batch.is_constructed
  log_ratio = jnp.where(mask, logprobs_RT - batch.old_logprobs, 0.0)
  ratio = jnp.exp(log_ratio)
  a = batch.advantages
  pg_unclipped = -a * ratio
  pg_clipped = -a * jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  pg = jnp.maximum(pg_unclipped, pg_clipped)
  w = jnp.ones_like(pg)
  if cfg.ots and cfg.algorithm == "tapo":
    w = jnp.where(constructed, ots_weights(logprobs_RT, entropy_RT, cfg.ots_min, cfg.ots_max), 1.0)
  rho, is_metrics = rollout_correction(batch, cfg)
  per_token = rho * w * pg
  scale = batch.loss_scale * mask
  l_orig = jnp.sum(per_token * scale * ~constructed)
  l_ref = jnp.sum(per_token * scale * constructed)
  loss = l_orig + cfg.lam * l_ref if cfg.algorithm == "tapo" else l_orig

  mean = batch.token_scale * mask  # sums to 1 over each part's tokens (whole step)
  orig, ref = mean * ~constructed, mean * constructed
  clipped = (pg_clipped > pg_unclipped).astype(jnp.float32)
  ent = jax.lax.stop_gradient(entropy_RT)
  metrics = {
    "loss/orig": l_orig,
    "loss/ref": l_ref,  # before λ
    "loss/clip_frac_orig": jnp.sum(clipped * orig),
    "loss/clip_frac_ref": jnp.sum(clipped * ref),
    "loss/entropy_orig": jnp.sum(ent * orig),
    "loss/entropy_ref": jnp.sum(ent * ref),
    "tapo/ots_weight_mean": jnp.sum(jax.lax.stop_gradient(w) * ref),
    **is_metrics,
  }
  return loss, metrics


def tapo_loss(model, batch: TrainBatch, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of a prepared (micro-)batch, padded or packed, under `model` (anything with
  .hidden(tokens, positions, segment_ids) and .lm_head())."""
  lp, ent = logprobs_and_entropy(
    model, batch.tokens, batch.positions, batch.segment_ids, cfg.vocab_chunk, cfg.temperature
  )
  return policy_loss(lp, ent, batch, cfg)


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
