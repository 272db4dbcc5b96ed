"""TAPO's method core: DCS, constructions, the splicer, DAE and the loss (see docs in each)."""

from tapo_jax.tapo.advantages import decoupled_advantages, overlong_penalty
from tapo_jax.tapo.batch import Rollouts, concat_rollouts, pack_rollouts, response_ids
from tapo_jax.tapo.construct import (
  SYNTHESIS_TEMPLATE,
  TokenTables,
  common_prefix_len,
  parse_construction,
  token_tables,
)
from tapo_jax.tapo.dcs import Candidates, select_candidates
from tapo_jax.tapo.loss import (
  policy_loss,
  prepare_batch,
  sequence_logprobs,
  tapo_loss,
  token_logprobs_and_entropy,
)
from tapo_jax.tapo.splice import Spliced, splice

__all__ = [
  "SYNTHESIS_TEMPLATE",
  "Candidates",
  "Rollouts",
  "Spliced",
  "TokenTables",
  "common_prefix_len",
  "concat_rollouts",
  "decoupled_advantages",
  "overlong_penalty",
  "pack_rollouts",
  "parse_construction",
  "policy_loss",
  "prepare_batch",
  "response_ids",
  "select_candidates",
  "sequence_logprobs",
  "splice",
  "tapo_loss",
  "token_logprobs_and_entropy",
  "token_tables",
]
