"""The `chain` domain's teacher: wrong solutions, and the constructions TAPO's policy should write.

A cold-start example (what the toy model is fine-tuned to do before RL) is a synthesis prompt

  SYNTHESIS_TEMPLATE with {query} = the problem, {incorrect} = y⁻, {correct} = y⁺

answered by

  <analysis>Step i is wrong: <y⁻'s line i></analysis><reconstruction>y⁻'s lines 1..i verbatim
  Wait, <what went wrong at line i>
  y⁺'s lines i..end</reconstruction>

where line i is the first line on which y⁻ and y⁺ differ (a correct solution has one line per
step, so that is y⁻'s first wrong step). The diagnosis names the fault by comparing the two lines:
the previous result copied wrongly, an operand or operator that is not the problem's, or a wrong
result. Everything the teacher writes is a copy of pieces of the prompt, so a small model can
learn it; nothing needs arithmetic beyond what y⁺ already holds. The analysis quotes the wrong
line, which tells the reconstruction where to stop copying y⁻ by content rather than by counting.

`corrupt` makes y⁻ from a problem by one step error of the kinds a character-level model makes
(ERROR_WEIGHTS; measured on the model's own wrong samples, see docs/toy.md), continued correctly
from the wrong value, sometimes with a later second error.
"""

from __future__ import annotations

import random

from tapo_jax.toy import chain

# Kept short on purpose: every character is a token of a model with a 768-token context.
SYNTHESIS_TEMPLATE = "Fix the wrong solution.\n{query}\nWrong:\n{incorrect}\nRight:\n{correct}"
TAGS = ("<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>")

# Share of each first-error kind in the teacher's y⁻ (see `corrupt`).
ERROR_WEIGHTS = {
  "digit": 0.35, "result": 0.2, "carry": 0.1, "prev": 0.15, "operand": 0.15, "answer": 0.05,
}  # fmt: skip
SECOND_ERROR = 0.2  # chance that a later step holds another error


# ------------------------------------------------------------------------------ constructions


def first_difference(neg: str, pos: str) -> int | None:
  """Index of the first line where `neg` and `pos` differ (ignoring spaces at the ends); a
  `neg` that stops at a line end before `pos` does differs at its end; None when `neg` is `pos`
  or `pos` followed by more lines."""
  neg_lines, pos_lines = neg.split("\n"), pos.split("\n")
  for i, (n, p) in enumerate(zip(neg_lines, pos_lines)):
    if n.strip() != p.strip():
      return i
  return len(neg_lines) if len(neg_lines) < len(pos_lines) else None


def diagnosis(neg_line: str | None, pos_line: str, index: int) -> str:
  """The "Wait, ..." line: what is wrong with `neg_line` given the right `pos_line`."""
  if neg_line is None:
    return "Wait, the solution is not finished."
  n, p = chain.parse_step(neg_line), chain.parse_step(pos_line)
  if n is not None and p is not None:
    if n.a != p.a:
      where = "the problem starts with" if index == 0 else "the last result was"
      return f"Wait, {where} {p.a}, not {n.a}."
    if (n.op, n.b) != (p.op, p.b):
      return f"Wait, the problem says {p.op}{p.b}, not {n.op}{n.b}."
    return f"Wait, {n.a}{n.op}{n.b} is not {n.c}."
  if p is None and pos_line.startswith("\\boxed"):
    return "Wait, the answer is the last result."
  return "Wait, this step is wrong."


def reconstruction(neg: str, pos: str) -> tuple[str, str] | None:
  """(analysis, reconstruction) for y⁻ = `neg`, y⁺ = `pos`; None when `neg` has no wrong line."""
  i = first_difference(neg, pos)
  if i is None:
    return None
  neg_lines, pos_lines = neg.split("\n"), pos.split("\n")
  kept = neg_lines[: i + 1]  # verbatim, the wrong line included
  wrong = neg_lines[i] if i < len(neg_lines) else None
  body = kept + [diagnosis(wrong, pos_lines[i], i)] + pos_lines[i:]
  analysis = f"Step {i + 1} is missing." if wrong is None else f"Step {i + 1} is wrong: {wrong}"
  return analysis, "\n".join(body)


def construction(neg: str, pos: str) -> str | None:
  """The full answer to a synthesis prompt, in the format `synthesis.parse_construction` reads."""
  parts = reconstruction(neg, pos)
  if parts is None:
    return None
  analysis, recon = parts
  return f"{TAGS[0]}{analysis}{TAGS[1]}{TAGS[2]}{recon}{TAGS[3]}"


def synthesis_prompt(query: str, neg: str, pos: str, template: str = SYNTHESIS_TEMPLATE) -> str:
  """The synthesis prompt's text (before the chat template), as the RL loop splices it."""
  return template.format(query=query, incorrect=neg, correct=pos)


# ---------------------------------------------------------------------------------- wrong y⁻


def _change_digit(rng: random.Random, value: int) -> int:
  """`value` with one digit replaced by another (no new leading zero)."""
  digits = list(str(abs(value)))
  i = rng.randrange(len(digits))
  options = [
    d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)
  ]
  digits[i] = rng.choice(options)
  return int("".join(digits)) * (-1 if value < 0 else 1)


def _near_miss(rng: random.Random, value: int) -> int:
  """`value` with its last two digits redrawn: a result that is close but wrong."""
  out = value - value % 100 + rng.randrange(100)
  return out if out != value else value + 1


def _carry_slip(rng: random.Random, value: int) -> int:
  """`value` off by a power of ten above the units: a carry or borrow lost or added."""
  k = rng.randint(1, max(1, len(str(abs(value))) - 1))
  out = value + rng.choice((-1, 1)) * 10**k
  return out if out >= 0 else value + 10**k


def _wrong_step(rng: random.Random, kind: str, step: chain.Step, earlier: list[int]) -> chain.Step:
  """`step` with one error of `kind`; `earlier` are the values before it (start, results)."""
  if kind == "digit":
    return chain.Step(step.a, step.op, step.b, _change_digit(rng, step.c))
  if kind == "result":
    return chain.Step(step.a, step.op, step.b, _near_miss(rng, step.c))
  if kind == "carry":
    return chain.Step(step.a, step.op, step.b, _carry_slip(rng, step.c))
  if kind == "prev":  # an older result, or the last one miscopied
    stale = [v for v in earlier[:-1] if v != step.a]
    a = rng.choice(stale) if stale and rng.random() < 0.5 else _change_digit(rng, step.a)
    return chain.Step(a, step.op, step.b, chain.apply(a, step.op, step.b))
  if kind == "operand":
    b = _change_digit(rng, step.b)
    b = b if b >= 2 else step.b + 1
    return chain.Step(step.a, step.op, b, chain.apply(step.a, step.op, b))
  raise ValueError(f"unknown error kind {kind!r}")


def corrupt(problem: chain.ChainProblem, rng: random.Random, kind: str | None = None) -> str:
  """A wrong solution of `problem`: one error of `kind` (drawn from ERROR_WEIGHTS when None) at a
  random step, later steps computed from the wrong value (sometimes with another error)."""
  kind = kind or rng.choices(list(ERROR_WEIGHTS), list(ERROR_WEIGHTS.values()))[0]
  steps = list(problem.steps)
  if kind == "answer":
    final = _change_digit(rng, steps[-1].c)
    return "\n".join([s.text for s in steps] + [chain.boxed(final)])
  at = rng.randrange(len(steps))
  values = [steps[0].a] + [s.c for s in steps]
  out = steps[:at]
  wrong = _wrong_step(rng, kind, steps[at], values[: at + 1])
  if wrong == steps[at]:  # a slip that changed nothing (rare): force a result digit error
    wrong = _wrong_step(rng, "digit", steps[at], values[: at + 1])
  out.append(wrong)
  for s in steps[at + 1 :]:
    a = out[-1].c
    step = chain.Step(a, s.op, s.b, chain.apply(a, s.op, s.b))
    if rng.random() < SECOND_ERROR:
      step = chain.Step(a, s.op, s.b, _change_digit(rng, step.c))
    out.append(step)
  text = chain.solution_text(out)
  if out[-1].c == steps[-1].c:  # the errors cancelled out: spoil the answer instead
    return corrupt(problem, rng, "answer")
  return text


def scramble(problem: chain.ChainProblem, rng: random.Random) -> chain.ChainProblem:
  """`problem` with a random result (0..99) on every line, each next line starting from it: a
  solution whose digits no arithmetic predicts, so that a construction of it can only be copied
  (the query's operators and operands are kept)."""
  steps, a = [], problem.steps[0].a
  for s in problem.steps:
    steps.append(chain.Step(a, s.op, s.b, rng.randint(0, 99)))
    a = steps[-1].c
  return chain.ChainProblem(problem.problem, str(a), chain.solution_text(steps), tuple(steps))


# ------------------------------------------------------------------------------ cold-start data


def cold_start_rows(
  n: int,
  synth_share: float,
  seed: int = 0,
  spec: chain.Spec = chain.SPEC,
  scrambled_share: float = 0.0,
  copy_share: float = 0.0,
) -> list[dict[str, str]]:
  """`n` SFT rows {prompt, response} of training problems: a `synth_share` of synthesis examples
  (y⁻ from `corrupt`, y⁺ the worked solution; a `scrambled_share` of them of a `scramble`d
  solution, to be copied), the rest worked solutions; a `copy_share` of all rows are instead
  "Copy:" + a scrambled solution, answered by that solution."""
  rng = random.Random(f"cold-start-{seed}")
  rows = []
  for p in chain.make_split("train", n, seed=seed, spec=spec):
    if copy_share and rng.random() < copy_share:
      s = scramble(p, rng).solution
      rows.append({"prompt": f"Copy:\n{s}", "response": s})
      continue
    if rng.random() < synth_share:
      if scrambled_share and rng.random() < scrambled_share:
        p = scramble(p, rng)
      neg = corrupt(p, rng)
      rows.append(
        {
          "prompt": synthesis_prompt(p.problem, neg, p.solution),
          "response": construction(neg, p.solution),
        }
      )
    else:
      rows.append({"prompt": p.problem, "response": p.solution})
  return rows
