"""Pure evaluation metrics over graded samples: avg@k, pass@k, maj@k, lengths, DSR and ERR.

`correct[i][j]` is whether problem i's sample j is right; every problem has n >= k samples and
the @k metrics read the first k of them (pass@k uses all n, the unbiased estimator).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

Equiv = Callable[[str, str], bool]


@dataclasses.dataclass(frozen=True)
class ProblemResult:
  """One problem's graded samples (the unit `summarize` reads and evaluate writes as JSONL)."""

  id: str
  gold: str
  responses: list[str]  # decoded response texts
  answers: list[str | None]  # extracted final answers (None: no answer found)
  correct: list[bool]
  lengths: list[int]  # response tokens, EOS included when emitted
  truncated: list[bool]  # stopped by max_new_tokens
  # tapo_jax/eval/reflection.py (None: not annotated): the first pass graded right, and the final
  # verdict of a response that writes a correction line after a wrong first pass (None: it does not)
  first_pass: list[bool] | None = None
  fixed: list[bool | None] | None = None


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no big binomials (Chen et al. 2021).
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check_k(correct: Sequence[Sequence[bool]], k: int | None) -> int:
  if not correct:
    raise ValueError("no problems")
  n_min = min(len(row) for row in correct)
  k = n_min if k is None else k
  if not 1 <= k <= n_min:
    raise ValueError(f"k={k} but some problem has only {n_min} samples")
  return k


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
  """pass@k averaged over problems, each estimated from all of its samples."""
  _check_k(correct, k)
  return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def avg_at_k(correct: Sequence[Sequence[bool]], k: int | None = None) -> float:
  """Mean accuracy of the first k samples of each problem, averaged over problems."""
  k = _check_k(correct, k)
  return sum(sum(map(bool, row[:k])) / k for row in correct) / len(correct)


_SPACES = re.compile(r"\s+|\\[,!;: ]|\\left|\\right|\$")


def canonical(answer: str) -> str:
  """A light normal form for voting: no spaces, $, \\left/\\right or trailing period; dfrac=frac."""
  s = _SPACES.sub("", answer)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  return s.rstrip(".")


def majority(answers: Sequence[str | None], equiv: Equiv | None = None) -> int | None:
  """Index of the first sample of the most voted answer; None answers don't vote.

  Answers are grouped by `canonical`, then canonical groups are merged when `equiv` says their
  first answers are equal. Ties go to the answer seen first.
  """
  reps: list[int] = []  # first sample index of each cluster, in order of first appearance
  votes: list[int] = []
  by_key: dict[str, int] = {}  # canonical string -> cluster
  for i, a in enumerate(answers):
    if a is None:
      continue
    key = canonical(a)
    cluster = by_key.get(key)
    if cluster is None and equiv is not None:
      cluster = next((c for c, r in enumerate(reps) if equiv(answers[r], a)), None)
    if cluster is None:
      cluster = len(reps)
      reps.append(i)
      votes.append(0)
    by_key.setdefault(key, cluster)
    votes[cluster] += 1
  if not reps:
    return None
  best = max(range(len(reps)), key=lambda c: (votes[c], -reps[c]))
  return reps[best]


def maj_at_k(
  answers: Sequence[Sequence[str | None]],
  correct: Sequence[Sequence[bool]],
  k: int | None = None,
  equiv: Equiv | None = None,
) -> float:
  """Share of problems whose majority answer among the first k samples is correct.

  The winning answer is graded by the verdict of its first sample; no answer at all is wrong.
  """
  k = _check_k(correct, k)
  hits = 0
  for ans, cor in zip(answers, correct, strict=True):
    winner = majority(list(ans[:k]), equiv)
    hits += winner is not None and bool(cor[winner])
  return hits / len(correct)


def reflection_pattern(markers: Sequence[str]) -> re.Pattern[str]:
  """Case-insensitive regex for any marker, not preceded by a letter ("wait" skips "await")."""
  alternatives = "|".join(re.escape(m) for m in markers if m)
  return re.compile(rf"(?<![a-z])(?:{alternatives})" if alternatives else r"(?!)", re.IGNORECASE)


def has_reflection(text: str, markers: Sequence[str]) -> bool:
  """Whether `text` contains a reflection marker (case-insensitive)."""
  return reflection_pattern(markers).search(text) is not None


def _ratio(num: int, den: int) -> float:
  return num / den if den else float("nan")


def dsr(correct: Sequence[bool], reflected: Sequence[bool]) -> float:
  """Direct success rate: #(correct, no marker) / #(no marker); NaN when every response reflects."""
  plain = [c for c, r in zip(correct, reflected, strict=True) if not r]
  return _ratio(sum(map(bool, plain)), len(plain))


def err(correct: Sequence[bool], reflected: Sequence[bool]) -> float:
  """Effective reflection rate: #(correct, with marker) / #(with marker); NaN when none reflects."""
  refl = [c for c, r in zip(correct, reflected, strict=True) if r]
  return _ratio(sum(map(bool, refl)), len(refl))


def summarize(
  results: Sequence[ProblemResult],
  *,
  k: int | None = None,
  pass_ks: Sequence[int] = (1,),
  markers: Sequence[str] = (),
  equiv: Equiv | None = None,
) -> dict[str, float]:
  """The summary of evaluate(): avg@k, pass@k for each of pass_ks, maj@k, lengths, DSR/ERR.

  Length, truncation, DSR and ERR are over all responses (every problem's n samples).
  """
  correct = [r.correct for r in results]
  k = _check_k(correct, k)
  flat_correct = [c for r in results for c in r.correct]
  pattern = reflection_pattern(markers)
  reflected = [pattern.search(t) is not None for r in results for t in r.responses]
  lengths = [n for r in results for n in r.lengths]
  truncated = [t for r in results for t in r.truncated]
  out = {f"avg@{k}": avg_at_k(correct, k)}
  out.update({f"pass@{pk}": mean_pass_at_k(correct, pk) for pk in pass_ks})
  out[f"maj@{k}"] = maj_at_k([r.answers for r in results], correct, k, equiv)
  out["mean_len"] = sum(lengths) / len(lengths)
  out["trunc_rate"] = sum(map(bool, truncated)) / len(truncated)
  out["reflect_rate"] = sum(reflected) / len(reflected)
  out["dsr"] = dsr(flat_correct, reflected)
  out["err"] = err(flat_correct, reflected)
  out["n_problems"] = len(results)
  out["n_responses"] = len(flat_correct)
  return out
