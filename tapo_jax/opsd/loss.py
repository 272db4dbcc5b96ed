"""The OPSD loss: a per-token divergence between the student's and the teacher's next-token
distributions on the student's own tokens, over the full vocabulary, in vocabulary chunks.

Legend: R rows, T / U student / teacher row length, N distilled-token slots, D model, V vocab.
The rows may be padded (one sequence each) or packed (several, told apart by segment ids, the
teacher's rows in the same pairing as the students': tapo_jax/opsd/batch.py); the loss reads both
through the index arrays, so it is the same function of the sequences either way.

Student: the policy on its own rows (prompt, response). Teacher: the same policy under
`stop_gradient` on the teacher's rows (the prompt with the privileged solution, the same
response). With p_S, p_T the two next-token distributions at a response token (both at the
rollout temperature: logits / T, as the OPSD code divides both), the per-token divergence is the
generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1) that the OPSD code uses:

  D_β = β KL(p_T || M) + (1 - β) KL(p_S || M),  M = β p_T + (1 - β) p_S
  β = 0: KL(p_T || p_S) (forward), β = 1: KL(p_S || p_T) (reverse), β = 0.5 (OPSD's scripts): JSD

L = Σ_tokens distill_scale · D_β  (token-mean over the step's distilled tokens)
  + opsd.grpo_coef · L_GRPO  (optional; the OPSD paper adds none).

No [R, T, V] array: both final hidden states are gathered at the distilled tokens ([R, N, D]) and
the vocabulary is scanned `chunk` entries at a time through the LM head, twice (the log-normalizers
first, then the divergence: the mixture M needs normalized probabilities), each chunk body
rematerialized in the backward pass as in `models.logprobs.token_logprobs_and_entropy`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tapo_jax.models import logprobs as logprobs_lib
from tapo_jax.opsd.batch import OpsdBatch
from tapo_jax.tapo import loss as loss_lib

NEG = -1e30  # a logit no chunk column beats (columns already seen by an earlier chunk)


@dataclasses.dataclass(frozen=True)
class OpsdConfig:
  """Exactly the keys the OPSD loss reads (a hashable jit static argument)."""

  loss: loss_lib.LossConfig  # the GRPO term's, and vocab_chunk / temperature
  beta: float = 0.5
  grpo_coef: float = 0.0

  @classmethod
  def from_config(cls, cfg) -> OpsdConfig:
    return cls(
      loss=loss_lib.LossConfig.from_config(cfg),
      beta=float(cfg.opsd.beta),
      grpo_coef=float(cfg.opsd.grpo_coef),
    )


def token_divergence(
  hs_BND: jax.Array,
  head_s_DV: jax.Array,
  ht_BND: jax.Array,
  head_t_DV: jax.Array,
  targets_BN: jax.Array,
  beta: float,
  chunk: int,
) -> dict[str, jax.Array]:
  """Per-token D_β(p_S, p_T) [B, N] f32 (differentiable in the student's hidden and head only)
  and, without gradient, top-1 agreement and both log-probabilities of `targets`, all [B, N]."""
  ht_BND, head_t_DV = jax.lax.stop_gradient((ht_BND, head_t_DV))
  d, v = head_s_DV.shape
  chunk = int(min(chunk, v))
  n_chunks = -(-v // chunk)
  shape = targets_BN.shape

  def logits(i):
    lo = i * chunk
    start = jnp.minimum(lo, v - chunk)  # the last chunk is shifted back to stay in bounds
    ws = jax.lax.dynamic_slice_in_dim(head_s_DV, start, chunk, axis=1)
    wt = jax.lax.dynamic_slice_in_dim(head_t_DV, start, chunk, axis=1)
    zs = jnp.einsum("bnd,dc->bnc", hs_BND, ws, preferred_element_type=jnp.float32)
    zt = jnp.einsum("bnd,dc->bnc", ht_BND, wt, preferred_element_type=jnp.float32)
    col = start + jnp.arange(chunk)
    return zs, zt, col, col >= lo  # new: not seen by an earlier chunk

  def online(m, s, z, new):
    """One chunk of an online logsumexp (running max m, sum s of exp(z - m))."""
    z = jnp.where(new, z, NEG)
    m_new = jnp.maximum(m, jax.lax.stop_gradient(z.max(axis=-1)))
    return m_new, s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(axis=-1)

  def best(top, arg, z, col, new):
    z = jax.lax.stop_gradient(jnp.where(new, z, NEG))
    c_top = z.max(axis=-1)
    c_arg = col[jnp.argmax(z, axis=-1)]
    better = c_top > top  # ties keep the earlier (lower) id, like argmax
    return jnp.where(better, c_top, top), jnp.where(better, c_arg, arg)

  @jax.checkpoint
  def normalizers(carry, i):
    ms, ss, mt, st, top_s, arg_s, top_t, arg_t, tgt_s, tgt_t = carry
    zs, zt, col, new = logits(i)
    ms, ss = online(ms, ss, zs, new)
    mt, st = online(mt, st, zt, new)
    top_s, arg_s = best(top_s, arg_s, zs, col, new)
    top_t, arg_t = best(top_t, arg_t, zt, col, new)
    hit = new & (col == targets_BN[..., None])
    tgt_s = tgt_s + jax.lax.stop_gradient(jnp.where(hit, zs, 0.0).sum(axis=-1))
    tgt_t = tgt_t + jnp.where(hit, zt, 0.0).sum(axis=-1)
    return (ms, ss, mt, st, top_s, arg_s, top_t, arg_t, tgt_s, tgt_t), None

  zeros = jnp.zeros(shape, jnp.float32)
  low = jnp.full(shape, NEG, jnp.float32)
  no_id = jnp.zeros(shape, jnp.int32)
  init = (low, zeros, low, zeros, low, no_id, low, no_id, zeros, zeros)
  (ms, ss, mt, st, _, arg_s, _, arg_t, tgt_s, tgt_t), _ = jax.lax.scan(
    normalizers, init, jnp.arange(n_chunks)
  )
  lse_s, lse_t = ms + jnp.log(ss), mt + jnp.log(st)

  @jax.checkpoint
  def divergence(acc, i):
    zs, zt, _, new = logits(i)
    ls, lt = zs - lse_s[..., None], zt - lse_t[..., None]
    if beta == 0.0:
      term = jnp.exp(lt) * (lt - ls)
    elif beta == 1.0:
      term = jnp.exp(ls) * (ls - lt)
    else:
      lm = jnp.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
      term = beta * jnp.exp(lt) * (lt - lm) + (1.0 - beta) * jnp.exp(ls) * (ls - lm)
    return acc + jnp.where(new, term, 0.0).sum(axis=-1), None

  div, _ = jax.lax.scan(divergence, zeros, jnp.arange(n_chunks))
  return {
    "divergence": div,
    "agree": (arg_s == arg_t).astype(jnp.float32),
    "student_logprob": tgt_s - jax.lax.stop_gradient(lse_s),
    "teacher_logprob": tgt_t - lse_t,
  }


def gather_rows(hidden_RTD: jax.Array, index_RN: jax.Array) -> jax.Array:
  """hidden[r, index[r, n]] -> [R, N, D]."""
  return jnp.take_along_axis(hidden_RTD, index_RN[..., None], axis=1)


def distillation(
  hidden_s_RTD: jax.Array,
  head_s_DV: jax.Array,
  hidden_t_RUD: jax.Array,
  head_t_DV: jax.Array,
  batch: OpsdBatch,
  cfg: OpsdConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The divergence term of a (micro-)batch from both forwards' final hidden states, and its
  metrics (token means over the step's distilled tokens; additive over micro-batches)."""
  hs = gather_rows(hidden_s_RTD, batch.student_index)
  ht = gather_rows(hidden_t_RUD, batch.teacher_index)
  out = token_divergence(
    hs, head_s_DV, ht, head_t_DV, batch.targets, cfg.beta, cfg.loss.vocab_chunk
  )
  weight = batch.distill_scale * batch.distill_mask
  loss = jnp.sum(out["divergence"] * weight)
  w = jax.lax.stop_gradient(weight)
  gap = out["teacher_logprob"] - out["student_logprob"]
  metrics = {
    "opsd/divergence": jax.lax.stop_gradient(loss),  # per token
    "opsd/agreement": jnp.sum(out["agree"] * w),  # teacher and student top-1 tokens equal
    "opsd/logprob_gap": jnp.sum(gap * w),  # log p_T(y) - log p_S(y) on the sampled tokens
    "opsd/divergence_max": jnp.max(
      jnp.where(batch.distill_mask, jax.lax.stop_gradient(out["divergence"]), 0.0)
    ),
  }
  return loss, metrics


def frozen(model):
  """`model` with every parameter under stop_gradient: the teacher."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def opsd_loss(model, batch: OpsdBatch, cfg: OpsdConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of a prepared (micro-)batch: the teacher's forward runs on stop-gradient
  params, so it keeps no activations for the backward pass and gets no gradient."""
  temp = cfg.loss.temperature
  teacher = frozen(model)
  hidden = model.hidden(batch.tokens, batch.positions, batch.segment_ids)
  hidden_t = teacher.hidden(
    batch.teacher_tokens, batch.teacher_positions, batch.teacher_segment_ids
  )
  head, head_t = model.lm_head(), teacher.lm_head()
  if temp != 1.0:
    head, head_t = head / temp, head_t / temp
  loss, metrics = distillation(hidden, head, hidden_t, head_t, batch, cfg)
  if cfg.grpo_coef:
    lp, ent = logprobs_lib.sequence_logprobs(
      hidden, head, batch.tokens, cfg.loss.vocab_chunk, batch.segment_ids
    )
    l_grpo, grpo_metrics = loss_lib.policy_loss(lp, ent, batch, cfg.loss)
    loss = loss + cfg.grpo_coef * l_grpo
    metrics.update(grpo_metrics)
  return loss, metrics
