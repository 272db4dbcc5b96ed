"""The `chain` toy domain: 3-6 mixed + - * steps on numbers below 100, one operation per line.

A problem is an expression evaluated left to right, written with the fewest parentheses that make
standard precedence agree with that order:

  Compute (21-16+26)*3-12.        gold 81
  21-16=5
  5+26=31
  31*3=93
  93-12=81
  \\boxed{81}

With the default SPEC the start a0 is 10..99, a +/- operand 1..99 and a * operand 2..9 (only of a
value 10..49); every intermediate result stays in 0..99 (an op is drawn only when it keeps the
value in range). Other Specs (wider numbers: tapo_jax.build_toy.WIDE) are the same generator.

Why this domain. A byte-level model writes each result digit by digit, so a digit it samples
wrongly, a carry or borrow it loses or a previous result it copies wrongly is a step error that
then propagates to a wrong answer: the errors TAPO's constructions are about, on lines the
`divergence` construction can cut at. A tiny model learns these facts by memorizing them, which
the 0..99 range keeps within reach (docs/toy.md); the per-step error rate compounds over 3-6
steps, which spreads the per-problem pass rates over the range DCS selects.

Splits are disjoint by construction: a problem belongs to the held-out split iff the CRC32 of its
text is 0 mod 8 (`split_of`), whatever seed generated it; `make_split` draws until it has n
problems of the requested split.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import re
import zlib

CHECKPOINT_DIR = pathlib.Path(__file__).parent / "chain"
OPS = ("+", "-", "*")
HELDOUT_MOD = 8  # 1 in 8 of all problems is held out

_LINE = re.compile(r"\A(-?\d+)([+*-])(\d+)=(-?\d+)\Z")


@dataclasses.dataclass(frozen=True)
class Step:
  a: int
  op: str  # one of OPS
  b: int
  c: int

  @property
  def text(self) -> str:
    return f"{self.a}{self.op}{self.b}={self.c}"


@dataclasses.dataclass(frozen=True)
class ChainProblem:
  problem: str  # "Compute (47+385-129)*3+56."
  answer: str  # "965"
  solution: str  # "47+385=432\n...\n\\boxed{965}"
  steps: tuple[Step, ...]


def apply(a: int, op: str, b: int) -> int:
  """The value of `a op b` (op in OPS)."""
  return a + b if op == "+" else a - b if op == "-" else a * b


def parse_step(line: str) -> Step | None:
  """`a op b = c` of one solution line (spaces ignored), or None when the line is not one."""
  m = _LINE.match(line.replace(" ", ""))
  return None if m is None else Step(int(m[1]), m[2], int(m[3]), int(m[4]))


def boxed(value: int | str) -> str:
  return f"\\boxed{{{value}}}"


def solution_text(steps) -> str:
  """One `a op b = c` line per step, then the boxed last result."""
  return "\n".join([s.text for s in steps] + [boxed(steps[-1].c)])


def expression(a0: int, ops_operands) -> str:
  """Left-to-right expression with minimal parentheses: a * wraps a +/- chain before it."""
  expr, low = str(a0), False  # low: the expression's top-level operator is + or -
  for op, b in ops_operands:
    if op == "*":
      expr, low = (f"({expr})" if low else expr) + f"*{b}", False
    else:
      expr, low = expr + f"{op}{b}", True
  return expr


@dataclasses.dataclass(frozen=True)
class Spec:
  """The problem distribution: steps per problem, operand and value ranges."""

  min_steps: int = 3
  max_steps: int = 6
  max_start: int = 99  # the first number is 10..max_start
  min_operand: int = 1  # +/- operands are min_operand..max_operand
  max_operand: int = 99
  max_value: int = 99  # every intermediate result stays in 0..max_value
  max_factor: int = 9  # * operands are 2..max_factor
  max_product_base: int = 49  # only values 10..max_product_base are multiplied


SPEC = Spec()


def _pick(rng: random.Random, acc: int, spec: Spec) -> tuple[str, int]:
  """One feasible (op, operand), every op equally likely among the feasible ones."""
  lo = spec.min_operand
  choices = ["+"] if acc + lo <= spec.max_value else []
  if acc >= lo:
    choices.append("-")
  if 10 <= acc <= min(spec.max_product_base, spec.max_value // 2):
    choices.append("*")
  op = rng.choice(choices)
  if op == "+":
    return op, rng.randint(lo, min(spec.max_operand, spec.max_value - acc))
  if op == "-":
    return op, rng.randint(lo, min(spec.max_operand, acc))
  return op, rng.randint(2, min(spec.max_factor, spec.max_value // acc))


def make_problem(rng: random.Random, spec: Spec = SPEC) -> ChainProblem:
  """One problem of spec.min_steps..spec.max_steps operations."""
  acc = a0 = rng.randint(10, spec.max_start)
  steps = []
  for _ in range(rng.randint(spec.min_steps, spec.max_steps)):
    op, b = _pick(rng, acc, spec)
    c = apply(acc, op, b)
    steps.append(Step(acc, op, b, c))
    acc = c
  expr = expression(a0, [(s.op, s.b) for s in steps])
  return ChainProblem(f"Compute {expr}.", str(acc), solution_text(steps), tuple(steps))


def split_of(problem_text: str) -> str:
  """'heldout' or 'train': a fixed function of the problem text."""
  return "heldout" if zlib.crc32(problem_text.encode()) % HELDOUT_MOD == 0 else "train"


def make_split(split: str, n: int, seed: int = 0, spec: Spec = SPEC) -> list[ChainProblem]:
  """`n` distinct problems of `split` ('train' or 'heldout'), deterministic in `seed`."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  rng = random.Random(f"chain-{split}-{seed}")
  out, seen = [], set()
  while len(out) < n:
    p = make_problem(rng, spec)
    if split_of(p.problem) == split and p.problem not in seen:
      seen.add(p.problem)
      out.append(p)
  return out
