"""The teacher's side of OPSD: which privileged solution each row gets, and the teacher's prompt.

Legend: Q queries, K samples per query, R = Q·K rows (prompt-major, as `pack_rollouts` lays them).

A row's privileged solution (`choose_solutions`, opsd.solution_source):
  group      a correct rollout of the row's own group other than the row itself (one drawn at
             random per row), else the problem's reference solution (Problem.solution), else none
  reference  the problem's reference solution only (the OPSD paper's teacher), else none
A row with none gets no teacher and no distillation loss (its divergence would be exactly zero
with the student's own prompt: nothing to learn, only compute to spend).

The teacher's user message is `opsd.teacher_template` filled with the problem and the solution,
then wrapped in `data.prompt_template` like a student prompt, so teacher and student end on the
same answer-format instruction whatever the dataset's template is. The solution is cut to
`opsd.max_solution_tokens` tokens (and further when the teacher row would not fit its width).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from tapo_jax.data.prompts import format_prompt
from tapo_jax.data.text import decode_responses

# The OPSD paper's teacher context (its data collator) in our words: the problem, a reference
# solution, then the instruction to reason it out anew; data.prompt_template adds the format line.
TEACHER_TEMPLATE = (
  "{problem}\n\n"
  "Here is a correct reference solution to this problem:\n{solution}\n\n"
  "Now that you have read the reference solution and understood why each of its steps holds, "
  "solve the problem above yourself, step by step, and arrive at the same final answer."
)
SOURCES = ("group", "reference")
NONE, REFERENCE = -2, -1  # choose_solutions codes besides a row index


def template_fields(template: str) -> list[str]:
  """The {fields} of a teacher template; ValueError unless they are {problem} and {solution}."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f"{e}; write literal braces as {{{{ and }}}}") from None
  bad = [f for f in fields if f not in ("problem", "solution")]
  if bad:
    raise ValueError(f"unknown field {{{bad[0]}}}: the fields are {{problem}} and {{solution}}")
  if "solution" not in fields:
    raise ValueError("no {solution} field: the teacher would see nothing the student does not")
  return fields


SOLUTION_SOURCES = ("group", "reference")  # opsd.solution_source, read by choose_solutions


def choose_solutions(
  rewards: np.ndarray, k: int, has_reference: Sequence[bool], source: str, seed: Sequence[int]
) -> np.ndarray:
  """[R] int: each row's privileged solution, a row index (a correct rollout of its group, never
  itself), REFERENCE or NONE. Deterministic in `seed` (the same on every process)."""
  rng = np.random.default_rng(list(seed))
  correct = np.asarray(rewards) > 0.5
  out = np.full(correct.shape[0], NONE, np.int64)
  for i in range(correct.shape[0]):
    q = i // k
    if source == "group":
      others = [j for j in range(q * k, (q + 1) * k) if j != i and correct[j]]
      if others:
        out[i] = others[int(rng.integers(len(others)))]
        continue
    if has_reference[q]:
      out[i] = REFERENCE
  return out


class TeacherPrompts:
  """Renders and tokenizes teacher prompts (one tokenizer, template and budget per run)."""

  def __init__(
    self,
    tokenizer: Any,
    template: str,
    prompt_template: str,
    use_chat_template: bool,
    max_solution_tokens: int,
    eos_ids: Sequence[int],
  ):
    template_fields(template)
    self.tokenizer, self.template, self.prompt_template = tokenizer, template, prompt_template
    self.chat, self.max_solution, self.eos = use_chat_template, max_solution_tokens, eos_ids

  def encode(self, problem: str, solution: str) -> list[int]:
    """The teacher prompt's token ids (chat template and generation header included)."""
    text = self.template.format(problem=problem, solution=solution)
    return list(format_prompt(text, self.prompt_template, self.tokenizer, self.chat))

  def overhead(self) -> int:
    """Tokens of the prompt around an empty problem and solution (template, chat markup)."""
    return len(self.encode("", ""))

  def _text(self, ids: Sequence[int], n: int) -> str:
    """The text of the first `n` of `ids` (a partial character at the cut is dropped)."""
    text = decode_responses(self.tokenizer, [list(ids)[: max(n, 0)]], self.eos)[0]
    return text.rstrip("\ufffd")

  def build(
    self,
    problems: Sequence[Any],
    responses: Sequence[Sequence[int]],
    choice: np.ndarray,
    room: Sequence[int],
    k: int,
  ) -> tuple[list[list[int] | None], dict[str, float]]:
    """Each row's teacher prompt ids (None: no privileged solution) and their host metrics.

    `responses` are the rows' response ids (EOS stripped), `room[i]` the most prompt tokens row
    i's teacher row can hold next to its response. Rows sharing a query and a solution share a
    prompt. A solution is cut to opsd.max_solution_tokens, and further until the prompt fits its
    room; a row whose prompt cannot fit even with an empty solution gets none."""
    cache: dict[tuple[int, int, int], list[int]] = {}
    references: dict[int, list[int]] = {}  # query -> its reference solution's ids
    prompts: list[list[int] | None] = []
    cut = dropped = 0
    for i, c in enumerate(choice):
      q = i // k
      if c == NONE:
        prompts.append(None)
        continue
      if c == REFERENCE:
        if q not in references:
          references[q] = self.tokenizer.encode(problems[q].solution, add_special_tokens=False)
        sol_ids = references[q]
      else:
        sol_ids = responses[c]
      budget = min(self.max_solution, len(sol_ids))
      ids = None
      for _ in range(4):  # re-rendering after a cut may move a few tokens across the seam
        key = (q, int(c), budget)
        if key not in cache:
          whole = c == REFERENCE and budget == len(sol_ids)
          text = problems[q].solution if whole else self._text(sol_ids, budget)
          cache[key] = self.encode(problems[q].problem, text)
        ids = cache[key]
        over = len(ids) - room[i]
        if over <= 0 or budget == 0:
          break
        budget = max(budget - over, 0)
      if len(ids) > room[i]:
        dropped += 1
        prompts.append(None)
        continue
      cut += budget < len(sol_ids)
      prompts.append(ids)
    has = np.array([p is not None for p in prompts], bool)
    from_group = has & (choice >= 0)
    from_reference = has & (choice == REFERENCE)
    metrics = {
      "opsd/rows_privileged": float(has.sum()),
      "opsd/rows_from_group": float(from_group.sum()),
      "opsd/rows_from_reference": float(from_reference.sum()),
      "opsd/rows_without_solution": float((~has).sum()),
      "opsd/solutions_cut": float(cut),
      "opsd/solutions_dropped": float(dropped),  # did not fit the teacher row at all
      "opsd/teacher_prompt_len_mean": float(np.mean([len(p) for p in prompts if p is not None]))
      if has.any()
      else 0.0,
    }
    return prompts, metrics
