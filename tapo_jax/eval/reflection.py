r"""The paper's two analyses made measurable: first-pass accuracy and the correction-fix rate.

A *correction line* is a response line holding one of `eval.reflection_markers` (tapo_jax/config.py;
matched by `metrics.reflection_pattern`: case-insensitive, not preceded by a letter). The toy's
constructions write their correction as one line `Wait, <what went wrong>` (tapo_jax/toy/teacher.py,
`diagnosis`), which the default marker "wait" matches, so a policy trained on them can learn to
write one in its own answers. The *first pass* of a response is its text before the line holding
the first correction marker; a response with no correction line is its own first pass.

  first-pass accuracy  share of all responses whose first pass, graded by the run's grader
                       against the gold answer, is right. A response with a correction line is
                       right on its first pass only if the text before that line already holds the
                       right final answer (the toy: \boxed{gold} written before the `Wait`).
  correction-fix rate  among responses that write a correction line after a wrong first pass,
                       the share whose final answer is right. "After a wrong first pass": on the
                       chain toy, some line of the first pass is not the gold solution's line at
                       its position (the chain domain has one right line per step: the generator's
                       worked solution, `Problem.solution`, via `solution_lines`); elsewhere (no
                       step reference), the first pass is graded wrong.

Why the final answer and not the flagged step: the final answer is what the reward and the paper's
ERR grade, and a correction that fixes the flagged line but errs again later has not fixed the
solution; the step-level reference decides only *whether* there was something to fix, so a
correction written after a right first pass (a false alarm) is left out of the rate.

Relation to DSR / ERR (metrics.py), over the same responses, with r = reflect_rate:
first_pass >= (1 - r) * DSR, equal when no reflecting response wrote the right answer before its
first correction line; fix_rate = ERR when every reflecting response's first pass is wrong (ERR's
denominator is every reflecting response, fix_rate's only those with a wrong first pass).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from tapo_jax.data.datasets import Problem
from tapo_jax.eval.metrics import ProblemResult, reflection_pattern

StepsFn = Callable[[Problem], "list[str] | None"]  # a problem's gold solution lines, if known


def first_pass(text: str, pattern: re.Pattern[str]) -> str | None:
  """`text` before the line holding the first correction marker; None when there is none."""
  m = pattern.search(text)
  if m is None:
    return None
  return text[: text.rfind("\n", 0, m.start()) + 1].rstrip("\n")


def solution_lines(problem: Problem) -> list[str] | None:
  """The lines of the problem's worked solution (the toys' held-out problems carry the
  generator's, one right line per step); None when it has none."""
  return problem.solution.split("\n") if problem.solution else None


def deviates(text: str, gold_lines: Sequence[str]) -> bool:
  """Whether some line of `text` is not `gold_lines`' line at its position (spaces at the ends
  ignored; a line past the gold's end deviates)."""
  lines = text.split("\n") if text else []
  gold = [g.strip() for g in gold_lines]
  return any(i >= len(gold) or line.strip() != gold[i] for i, line in enumerate(lines))


def annotate(
  results: Sequence[ProblemResult],
  problems: Sequence[Problem],
  grade_fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
  markers: Sequence[str],
  steps_fn: StepsFn | None = None,
) -> list[ProblemResult]:
  """`results` with `first_pass` (first pass graded right) and `fixed` (None: no correction line
  after a wrong first pass; else the final answer's verdict) per response. The first passes of
  reflecting responses are graded in one `grade_fn` call (none when no response reflects)."""
  pattern = reflection_pattern(markers)
  cuts = [[first_pass(t, pattern) for t in r.responses] for r in results]
  todo = [(i, j) for i, row in enumerate(cuts) for j, c in enumerate(row) if c is not None]
  verdicts = {}
  if todo:
    scores = grade_fn([cuts[i][j] for i, j in todo], [results[i].gold for i, _ in todo])
    verdicts = {ij: float(s) > 0.5 for ij, s in zip(todo, scores, strict=True)}
  out = []
  for i, (r, p) in enumerate(zip(results, problems, strict=True)):
    gold_lines = steps_fn(p) if steps_fn is not None else None
    first, fixed = [], []
    for j, correct in enumerate(r.correct):
      cut = cuts[i][j]
      first.append(bool(correct) if cut is None else verdicts[i, j])
      if cut is None:
        fixed.append(None)
        continue
      wrong = deviates(cut, gold_lines) if gold_lines is not None else not verdicts[i, j]
      fixed.append(bool(correct) if wrong else None)
    out.append(dataclasses.replace(r, first_pass=first, fixed=fixed))
  return out


def summarize(results: Sequence[ProblemResult]) -> dict[str, float]:
  """first_pass (over all responses), fix_rate (NaN when no response corrects a wrong first
  pass) and fix_share (the share of all responses in fix_rate's denominator); {} when `results`
  were not annotated."""
  if not results or any(r.first_pass is None or r.fixed is None for r in results):
    return {}
  first = [f for r in results for f in r.first_pass]
  fixed = [f for r in results for f in r.fixed if f is not None]
  return {
    "first_pass": sum(first) / len(first),
    "fix_rate": sum(fixed) / len(fixed) if fixed else float("nan"),
    "fix_share": len(fixed) / len(first),
  }
