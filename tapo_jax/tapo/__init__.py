"""TAPO's method core: DCS, the constructions, the splicer, DAE and the loss (see each module)."""

from tapo_jax.tapo.advantages import decoupled_advantages, overlong_penalty
from tapo_jax.tapo.batch import (
  Layout,
  Rollouts,
  TrainBatch,
  concat_rollouts,
  pack,
  pack_rollouts,
  pack_rows,
  pad_rows,
  response_ids,
  segment_sum,
  take_rows,
)
from tapo_jax.tapo.construct import TokenTables, select, token_tables
from tapo_jax.tapo.dcs import Candidates, select_candidates
from tapo_jax.tapo.divergence import diagnosis_tokens, divergence_rows
from tapo_jax.tapo.loss import (
  LossConfig,
  policy_loss,
  prepare_batch,
  tapo_loss,
)
from tapo_jax.tapo.splice import Spliced, splice
from tapo_jax.tapo.synthesis import (
  SYNTHESIS_TEMPLATE,
  anchor,
  anchor_text,
  anchored_rows,
  encode_template,
  parse_construction,
  synthesis_prompts,
)

__all__ = [
  "SYNTHESIS_TEMPLATE",
  "Candidates",
  "Layout",
  "LossConfig",
  "Rollouts",
  "Spliced",
  "TokenTables",
  "TrainBatch",
  "anchor",
  "anchored_rows",
  "anchor_text",
  "concat_rollouts",
  "decoupled_advantages",
  "diagnosis_tokens",
  "divergence_rows",
  "encode_template",
  "overlong_penalty",
  "pack",
  "pack_rollouts",
  "pack_rows",
  "pad_rows",
  "parse_construction",
  "policy_loss",
  "prepare_batch",
  "response_ids",
  "select",
  "segment_sum",
  "select_candidates",
  "splice",
  "synthesis_prompts",
  "take_rows",
  "tapo_loss",
  "token_tables",
]
