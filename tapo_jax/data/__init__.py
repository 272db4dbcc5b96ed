"""Problems and SFT examples from local files, and the prompts built from them."""

from tapo_jax.data.datasets import (
  LAYOUTS,
  DataError,
  Problem,
  SFTExample,
  detect_layout,
  filter_by_pass_rate,
  last_boxed,
  load_problems,
  load_sft,
  strip_dapo_template,
)
from tapo_jax.data.prompts import (
  DEFAULT_TEMPLATE,
  check_prompt_lengths,
  format_prompt,
  format_prompts,
  render,
  tokenize_sft,
)

__all__ = [
  "DEFAULT_TEMPLATE",
  "LAYOUTS",
  "DataError",
  "Problem",
  "SFTExample",
  "check_prompt_lengths",
  "detect_layout",
  "filter_by_pass_rate",
  "format_prompt",
  "format_prompts",
  "last_boxed",
  "load_problems",
  "load_sft",
  "render",
  "strip_dapo_template",
  "tokenize_sft",
]
