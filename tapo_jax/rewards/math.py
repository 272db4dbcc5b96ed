r"""Exact equivalence of a final answer to a gold answer: `is_equivalent`, `grade`.

Numbers are exact (0.25 == 1/4, 0.333 != 1/3, 6.28 != 2\pi); there is no tolerance, no percent
rescaling without a percent sign, and no last-number fallback. A high-precision numeric value is
only used to reject quickly; equality is always decided symbolically.
"""

import functools
import random
import re

import sympy

from tapo_jax.rewards.extract import extract_answer
from tapo_jax.rewards.parse import (
  MAX_CHARS,
  Choice,
  Parsed,
  ParseError,
  Rel,
  Seq,
  Text,
  normalize_text,
  parse,
  to_set,
)

_SEPARATORS = r"(?:,|\{,\}|,\\!|\\,|\\!|\\ |~)"
_PLAIN_INT = re.compile(r"([+-]?)(\d{1,3}(?:" + _SEPARATORS + r"\d{3})+|\d{1,400})(?:\.0*)?")
_SQUASH = re.compile(r"\\left|\\right|\\displaystyle|\$")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~|\s")
_LOOSE_SPACE = re.compile(r"(?<![0-9A-Za-z]) | (?![0-9A-Za-z])")
_NONZERO = 1e-20  # a numeric value this large at 40 digits is certainly nonzero
_X = sympy.Symbol("_x_")


def plain_int(s: str) -> int | None:
  """The integer a plainly-integer answer spells (7,425,000 | 1\\,000 | 204.0 | 007), else None."""
  s = s.strip().strip("$").strip()
  m = _PLAIN_INT.fullmatch(s) if len(s) <= 500 else None
  if m is None:
    return None
  value = int(re.sub(r"\D", "", m.group(2)))
  return -value if m.group(1) == "-" else value


def fast_equal(gold: str, answer: str) -> bool | None:
  """Integer gold vs plainly-integer answer without sympy; None when either is not a plain int."""
  g = plain_int(gold)
  if g is None:
    return None
  a = plain_int(answer)
  return None if a is None else g == a


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> Parsed | None:
  try:
    return parse(gold)
  except Exception:  # an unsupported gold is compared as text
    return None


def _numeric(e: sympy.Expr) -> complex | None:
  try:
    v = complex(sympy.N(e, 40))
  except (TypeError, ValueError, ArithmeticError):
    return None
  return None if v != v else v  # nan


def _is_zero(d: sympy.Expr) -> bool:
  """Exact (symbolic) proof that d == 0; False when no method proves it."""
  steps = (sympy.expand, lambda e: sympy.cancel(sympy.together(e)), sympy.radsimp, sympy.simplify)
  for step in steps:
    if step(d) == 0:
      return True
  if not d.free_symbols and d.is_algebraic:
    try:
      return sympy.minimal_polynomial(d, _X) == _X
    except (NotImplementedError, ValueError, ArithmeticError):
      return False
  return False


def scalars_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
  """Exact equality of two scalar expressions (numbers, radicals, pi, i, polynomials ...)."""
  if a == b:
    return True
  if (a.is_Rational and b.is_Rational) or a.has(sympy.oo, -sympy.oo) or b.has(sympy.oo, -sympy.oo):
    return False
  d = a - b
  if d == 0:
    return True
  if d.is_Rational:
    return False
  symbols = sorted(d.free_symbols, key=str)
  rng = random.Random(0)
  for _ in range(2 if symbols else 1):
    point = {s: sympy.Rational(rng.randint(-97, 97), rng.randint(1, 13)) for s in symbols}
    v = _numeric(d.subs(point) if point else d)
    if v is not None and abs(v) > _NONZERO:
      return False
  return _is_zero(d)


def _is_symbol_list(v) -> bool:
  if isinstance(v, sympy.Symbol):
    return True
  return isinstance(v, Seq) and all(isinstance(x, sympy.Symbol) for x in v.items)


def _is_name(v, gold_symbols: set) -> bool:
  """A product of symbols foreign to the gold, like P(A) or f(x) (read as products)."""
  if not isinstance(v, sympy.Mul) or v.free_symbols <= gold_symbols:
    return False
  return all(isinstance(f, sympy.Symbol) for f in v.args)


def _rel_value(rel: Rel, gold_symbols: set):
  r"""The value an equation chain asserts (x = 2 + 3 = 5 -> 5), or None if its parts disagree."""
  ops = list(rel.ops)
  parts = list(rel.parts)
  if "~" in ops:  # 2\pi \approx 6.28: only the exact part before the approximation counts
    parts, ops = parts[: ops.index("~") + 1], ops[: ops.index("~")]
  if any(op != "=" for op in ops):
    return None
  # Leading names (x =, P(A) =, (x, y) =) are dropped; what follows must all be equal.
  # A name has no numeric factor: 5x = 5 asserts x = 1, not 5.
  while len(parts) > 1 and (_is_symbol_list(parts[0]) or _is_name(parts[0], gold_symbols)):
    parts.pop(0)
  if any(not _equal(parts[0], p, gold_symbols) for p in parts[1:]):
    return None
  return parts[0]


def _sets_equal(s: sympy.Set, t: sympy.Set) -> bool:
  if s == t:
    return True
  if isinstance(s, sympy.Interval) and isinstance(t, sympy.Interval):
    return (
      s.left_open == t.left_open
      and s.right_open == t.right_open
      and scalars_equal(s.start, t.start)
      and scalars_equal(s.end, t.end)
    )
  if type(s) is type(t) and isinstance(s, sympy.Union) and len(s.args) == len(t.args):
    return all(_sets_equal(x, y) for x, y in zip(s.args, t.args, strict=True))
  if isinstance(s, sympy.FiniteSet) and isinstance(t, sympy.FiniteSet):
    return _unordered_equal(list(s.args), list(t.args), set())
  return False


def _unordered_equal(gs: list, as_: list, gold_symbols: set) -> bool:
  """Set semantics: every gold item is matched by an answer item and vice versa."""
  return all(any(_equal(g, a, gold_symbols) for a in as_) for g in gs) and all(
    any(_equal(g, a, gold_symbols) for g in gs) for a in as_
  )


def _is_vector(m) -> bool:
  return isinstance(m, sympy.MatrixBase) and 1 in m.shape


def _is_set_like(v) -> bool:
  """An interval, a union, or inequalities."""
  if isinstance(v, Rel):
    return any(op not in ("=", "~") for op in v.ops)
  if isinstance(v, Seq):
    return v.kind in ("or", "and", "list") and all(_is_set_like(x) for x in v.items)
  return isinstance(v, sympy.Set)


def _seq_equal(g: Seq, a, gold_symbols: set) -> bool:
  if g.kind in ("paren", "bracket") and len(g.items) == 2 and _is_set_like(a):
    try:  # (3, \infty) read as an interval
      return _sets_equal(to_set(g), to_set(a))
    except ParseError:
      return False
  if isinstance(a, Rel):
    a = _rel_value(a, gold_symbols)
  if g.kind in ("paren", "bracket"):  # ordered
    if _is_vector(a):
      a = Seq(g.kind, tuple(a))
    if not isinstance(a, Seq) or a.kind not in ("paren", "bracket", "list"):
      return False
    if len(a.items) != len(g.items) or (len(g.items) == 2 and a.kind not in (g.kind, "list")):
      return False  # (1, 2) vs [1, 2] could be two different intervals
    return all(_equal(x, y, gold_symbols) for x, y in zip(g.items, a.items, strict=True))
  if all(isinstance(x, Rel) and x.ops[0] != "=" for x in g.items):  # x < 1 or x > 2
    try:
      return _sets_equal(to_set(g), to_set(a))
    except ParseError:
      return False
  if isinstance(a, Seq) and a.kind in ("list", "or", "and", "set", "pm"):
    return _unordered_equal(list(g.items), list(a.items), gold_symbols)
  if isinstance(a, sympy.FiniteSet):
    return _unordered_equal(list(g.items), list(a.args), gold_symbols)
  return False


def _lines_equal(g: Rel, a: Rel) -> bool:
  """Two equations are equal when lhs - rhs agree up to a nonzero constant factor."""
  dg, da = g.parts[0] - g.parts[1], a.parts[0] - a.parts[1]
  if dg == 0 or da == 0 or not (dg.free_symbols and da.free_symbols):
    return False
  symbols = sorted(dg.free_symbols | da.free_symbols, key=str)
  if dg.is_polynomial(*symbols) and da.is_polynomial(*symbols):  # compare coefficient vectors
    pg, pa = sympy.Poly(dg, *symbols), sympy.Poly(da, *symbols)
    if pg.monoms() != pa.monoms():
      return False
    k = pg.coeffs()[0] / pa.coeffs()[0]
    return all(scalars_equal(cg, k * ca) for cg, ca in zip(pg.coeffs(), pa.coeffs(), strict=True))
  ratio = sympy.cancel(sympy.together(dg / da))
  return not ratio.free_symbols and ratio != 0 and bool(ratio.is_finite)


def _rel_equal(g: Rel, a, gold_symbols: set) -> bool:
  if any(op not in ("=", "~") for op in g.ops):  # an inequality: compare solution sets
    try:
      return _sets_equal(to_set(g), to_set(a))
    except ParseError:
      return False
  if len(g.ops) != 1 or g.ops[0] != "=":
    return False
  lhs, rhs = g.parts
  if isinstance(a, Rel) and len(a.ops) == 1 and a.ops[0] == "=":
    if all(isinstance(x, sympy.Expr) for x in g.parts + a.parts) and _lines_equal(g, a):
      return True
    if isinstance(lhs, sympy.Symbol) and isinstance(a.parts[0], sympy.Symbol):
      return lhs == a.parts[0] and _equal(rhs, a.parts[1], gold_symbols)
  if _is_symbol_list(lhs) and not (
    isinstance(rhs, sympy.Basic) and lhs in getattr(rhs, "free_symbols", ())
  ):
    # x = 5 accepts 5; y = 2x + 1 accepts 2x + 1.
    return _equal(rhs, a, gold_symbols - getattr(lhs, "free_symbols", set()))
  return False


def _equal(g, a, gold_symbols: set) -> bool:
  """Equality of parsed values; gold first (its type decides how the answer is read)."""
  if isinstance(g, Text | Choice) or isinstance(a, Text | Choice):
    return g == a
  if isinstance(g, sympy.MatrixBase):
    if isinstance(a, Seq) and a.kind in ("paren", "bracket") and _is_vector(g):
      a = sympy.ImmutableMatrix(g.shape[0], g.shape[1], list(a.items))
    if not isinstance(a, sympy.MatrixBase) or a.shape != g.shape:
      return False
    return all(scalars_equal(x, y) for x, y in zip(g, a, strict=True))
  if isinstance(g, sympy.Set):
    try:
      return _sets_equal(g, to_set(a))
    except ParseError:
      return False
  if isinstance(g, Seq):
    return _seq_equal(g, a, gold_symbols)
  if isinstance(g, Rel):
    return _rel_equal(g, a, gold_symbols)
  if isinstance(a, Rel):
    v = _rel_value(a, gold_symbols)
    return v is not None and _equal(g, v, gold_symbols)
  if isinstance(a, Seq):  # a scalar gold is never matched by several values
    return a.kind == "set" and len(a.items) == 1 and _equal(g, a.items[0], gold_symbols)
  if isinstance(a, sympy.MatrixBase) or not isinstance(a, sympy.Expr):
    return False
  return scalars_equal(g, a)


def _scaled(v, factor):
  if isinstance(v, sympy.MatrixBase):
    return None
  if isinstance(v, sympy.Expr):
    return v * factor
  if isinstance(v, Seq) and all(isinstance(x, sympy.Expr) for x in v.items):
    return Seq(v.kind, tuple(x * factor for x in v.items))
  return None


def _readings(p: Parsed) -> list:
  """The values an answer may denote: 25\\% is 1/4 or 25; 30^\\circ is 30 or pi/6."""
  values = [p.value]
  if p.percent:
    values.append(_scaled(p.value, 100))
  if p.degree:
    values.append(_scaled(p.value, sympy.pi / 180))
  return [v for v in values if v is not None]


def _squash(s: str) -> str:
  """The text without delimiters and spacing, except a space between two letters or digits."""
  s = " ".join(_SPACING.sub(" ", _SQUASH.sub("", s)).split())
  return _LOOSE_SPACE.sub("", s)


def _free_symbols(v) -> set:
  if isinstance(v, Seq):
    return set().union(*(_free_symbols(x) for x in v.items))
  if isinstance(v, Rel):
    return set().union(*(_free_symbols(x) for x in v.parts))
  if isinstance(v, sympy.Basic):
    return set(v.free_symbols)
  return set()


def is_equivalent(gold: str, answer: str | None) -> bool:
  """Whether `answer` (extracted model text) is exactly equivalent to `gold`."""
  if answer is None or gold is None or not str(answer).strip():
    return False
  gold, answer = str(gold), str(answer)
  fast = fast_equal(gold, answer)
  if fast is not None:
    return fast
  if len(answer) > MAX_CHARS:
    return False
  if _squash(gold) == _squash(answer):
    return True
  g = _parse_gold(gold)
  if g is None:  # an unsupported gold: only a textual match counts
    return normalize_text(gold) == normalize_text(answer)
  try:
    a = parse(answer, thousands=not isinstance(g.value, Seq))
    gold_symbols = _free_symbols(g.value)
    return any(
      _equal(gv, av, gold_symbols) for gv in _readings(g) for av in _readings(a) if gv is not None
    )
  except Exception:  # the reward never raises: whatever cannot be verified is wrong
    return False


def grade(response: str, gold: str) -> float:
  """1.0 if the final boxed answer in `response` is equivalent to `gold`, else 0.0."""
  return 1.0 if is_equivalent(gold, extract_answer(response)) else 0.0
