"""Problem -> prompt tokens: a str.format template, then the tokenizer's chat template if any.

`check_prompt_lengths` finds an over-long prompt when the data is loaded, not when its batch comes
up. Its pre-check needs no tokenizer call: a token stands for at most L bytes (L = the longest
vocabulary entry, in the byte-level alphabet one character per byte) and a character is at least
one byte, so a user message of C characters has at least ceil(C / L) tokens in any rendering. A
problem whose bound already exceeds the limit fails at once, however large; the rest are tokenized
exactly as the RL loop will.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tapo_jax.data.datasets import DataError, Problem, SFTExample

# Same as config data.prompt_template: str.format syntax, so literal braces are doubled.
DEFAULT_TEMPLATE = (
  "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)


def render(problem: Problem | str, template: str = DEFAULT_TEMPLATE) -> str:
  """The user message: `template` with {problem} filled in."""
  text = problem.problem if isinstance(problem, Problem) else problem
  try:
    return template.format(problem=text)
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(
      f"bad prompt template {template!r} ({e!r}): it takes one field, {{problem}}; "
      "write literal braces as {{ and }}"
    ) from None


def has_chat_template(tokenizer: Any) -> bool:
  """Whether `tokenizer` carries a chat template."""
  return getattr(tokenizer, "chat_template", None) is not None


def _ids(out: Any) -> list[int]:
  # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
  if isinstance(out, Mapping):
    out = out["input_ids"]
  return [int(t) for t in out]


def chat_ids(
  tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation: bool
) -> list[int]:
  """Token ids of `messages` through the chat template (with the assistant header if generation)."""
  out = tokenizer.apply_chat_template(
    [dict(m) for m in messages], add_generation_prompt=generation, tokenize=True, return_dict=False
  )
  return _ids(out)


def format_prompt(
  problem: Problem | str,
  template: str | None = DEFAULT_TEMPLATE,
  tokenizer: Any = None,
  use_chat_template: bool = True,
) -> list[int] | str:
  """Prompt token ids for `problem` (or its text when `tokenizer` is None).

  template=None uses the problem's own chat `messages` (dapo files) when it has them.
  """
  if template is None and isinstance(problem, Problem) and problem.messages:
    messages = [dict(m) for m in problem.messages]
  else:
    messages = [{"role": "user", "content": render(problem, template or DEFAULT_TEMPLATE)}]
  if tokenizer is not None and use_chat_template and has_chat_template(tokenizer):
    return chat_ids(tokenizer, messages, generation=True)
  text = "\n\n".join(m["content"] for m in messages)
  if tokenizer is None:
    return text
  return _ids(tokenizer.encode(text))


def format_prompts(
  problems: Sequence[Problem],
  template: str | None = DEFAULT_TEMPLATE,
  tokenizer: Any = None,
  use_chat_template: bool = True,
  max_prompt_tokens: int | None = None,
) -> list[list[int]]:
  """Prompt ids for every problem; one longer than `max_prompt_tokens` is a DataError."""
  out = []
  for p in problems:
    ids = format_prompt(p, template, tokenizer, use_chat_template)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
      raise DataError(
        f"problem {p.id!r}: prompt has {len(ids)} tokens > max_prompt_tokens={max_prompt_tokens}"
      )
    out.append(ids)
  return out


def longest_token_chars(tokenizer: Any) -> int:
  """The length of the longest vocabulary entry (an upper bound on the bytes one token covers)."""
  return max((len(t) for t in tokenizer.get_vocab()), default=1)


def _where(p: Problem, path: str | None) -> str:
  meta = p.metadata or {}
  source = meta.get("source") or path
  row = meta.get("row")
  place = ": ".join(str(x) for x in (source, row) if x)
  return f"{place}: problem {p.id!r}" if place else f"problem {p.id!r}"


def _user_text(p: Problem, template: str | None) -> str:
  if template is None and p.messages:
    return "".join(m["content"] for m in p.messages)
  return render(p, template or DEFAULT_TEMPLATE)


def check_prompt_lengths(
  problems: Sequence[Problem],
  template: str | None,
  tokenizer: Any,
  max_tokens: int,
  use_chat_template: bool = True,
  path: str | None = None,
  limit_key: str = "data.max_prompt_tokens",
) -> list[list[int]]:
  """The prompt ids of every problem (as format_prompts gives them); the first problem whose
  prompt is longer than `max_tokens` (the config's `limit_key`) raises DataError naming its
  file, row and id."""
  per_token = longest_token_chars(tokenizer)

  def fail(p: Problem, n: int, exact: bool) -> DataError:
    size = "" if exact else "at least "
    return DataError(
      f"{_where(p, path)}: prompt has {size}{n} tokens > {limit_key}={max_tokens}; "
      f"shorten or drop the problem, or raise {limit_key}"
    )

  for p in problems:  # the cheap bound first: nothing is tokenized before every row passes it
    bound = math.ceil(len(_user_text(p, template)) / per_token)
    if bound > max_tokens:
      raise fail(p, bound, exact=False)
  out = []
  for p in problems:
    ids = format_prompt(p, template, tokenizer, use_chat_template)
    if len(ids) > max_tokens:
      raise fail(p, len(ids), exact=True)
    out.append(ids)
  return out


def _eos_ids(tokenizer: Any) -> list[int]:
  eos = getattr(tokenizer, "eos_token_id", None)
  return [] if eos is None else [int(eos)]


def tokenize_sft(
  example: SFTExample, tokenizer: Any, use_chat_template: bool = True
) -> tuple[list[int], list[bool]]:
  """(ids, loss_mask) of context + response; the mask is True on the response tokens only.

  With a chat template the response tokens are the template's rendering of the assistant turn
  (end-of-turn token included); without one they are the encoded response plus EOS.
  """
  if use_chat_template and has_chat_template(tokenizer):
    prompt = chat_ids(tokenizer, example.messages, generation=True)
    full = chat_ids(
      tokenizer,
      [*example.messages, {"role": "assistant", "content": example.response}],
      generation=False,
    )
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
      # Templates that rewrite earlier turns (e.g. strip <think>) break the prefix property.
      full = prompt + _ids(tokenizer.encode(example.response, add_special_tokens=False))
      full += _eos_ids(tokenizer)
  else:
    prompt = _ids(tokenizer.encode("\n\n".join(m["content"] for m in example.messages)))
    full = prompt + _ids(tokenizer.encode(example.response, add_special_tokens=False))
    full += _eos_ids(tokenizer)
  return full, [False] * len(prompt) + [True] * (len(full) - len(prompt))
