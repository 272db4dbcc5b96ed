"""The TAPO / GRPO loss: PPO-clip with OTS, DAE, additive over micro-batches, on the chunked,
token-aligned logprobs of tapo_jax/models/logprobs.py.

Legend: R rows, T tokens.

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

from tapo_jax.models.logprobs import logprobs_and_entropy
from tapo_jax.tapo import advantages as adv_lib
from tapo_jax.tapo.batch import Rollouts, TrainBatch, segment_sum

ROLLOUT_IS = ("off", "token-tis", "seq-mask")  # loss.rollout_is
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # loss.aggregation


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
    """From a base_config() tree (validated by validate.check_enums)."""
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
