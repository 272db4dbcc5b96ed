"""Text helpers below both the samplers and eval: the stop tokens of a tokenizer and the one
decoding of response ids into the text the verifier reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Qwen end-of-turn / end-of-text tokens, stop tokens by default when the vocabulary has them.
_QWEN_STOPS = ("<|im_end|>", "<|endoftext|>")


def default_eos_ids(tokenizer: Any) -> list[int]:
  """The tokenizer's EOS id plus Qwen's <|im_end|> / <|endoftext|> when present."""
  ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
  vocab = tokenizer.get_vocab()
  ids += [vocab[t] for t in _QWEN_STOPS if t in vocab and vocab[t] not in ids]
  return ids


def decode_responses(tokenizer: Any, responses: Sequence[Sequence[int]], eos_ids) -> list[str]:
  """Response texts as the verifier reads them: trailing EOS ids removed, special tokens
  skipped. Originals, constructions and eval samples are all decoded by this one function."""
  eos = set(eos_ids)
  texts = []
  for ids in responses:
    ids = list(ids)
    while ids and ids[-1] in eos:
      ids.pop()
    texts.append(tokenizer.decode(ids, skip_special_tokens=True))
  return texts
