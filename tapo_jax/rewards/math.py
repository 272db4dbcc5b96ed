r"""Exact equivalence of a final answer to a gold answer: `is_equivalent`, `grade`.

Numbers are exact (0.25 == 1/4, 0.333 != 1/3, 6.28 != 2\pi); there is no tolerance, no percent
rescaling without a percent sign, and no last-number fallback. A high-precision numeric value is
only used to reject quickly; equality is always decided symbolically.

Longer than most modules on purpose: the equivalence rules (second readings, named left-hand
sides, relations, sets, matrices) decide rewards together and are read best side by side.

Second readings. A percent mark (`28\%`, `28 pct`, `28 percent`, `28 percentage`, on the gold or
the answer) reads the value both as 0.28 and as 28; without one, 28 and 0.28 differ; with one on
both sides the scale is fixed (0.01\% is not 1 pct). A degree mark
reads 30^\circ as 30 and as pi/6. A lone number in a base reads 101_2 as 5 and as its digit
string 101 (golds that omit the base). An approximation chain `a \approx b` counts as the value a
only when the literal b is a rounded or cut to its last digit (2\pi \approx 6.28: yes;
42 \approx 43: no answer).

Named left-hand sides. One side of an equation *names* a quantity when it is a variable or a
tuple of them (x, (x, y), a_1), a function value (f(x), f(2), P(A), f^{-1}(3), f'(0)), a product
of letters (AB, xy; in an answer, only letters the gold does not use), the absolute value of a
letter or product (|z|, |AB|), a ratio of letters (A:B) or an angle (\angle ABC). A number factor
makes it an equation instead (5x = 5 asserts x = 1, not 5). The rule:
  - gold names, answer is a bare value: compare the gold's value (f(x) = 1 vs 1: equal);
  - answer names, gold is a bare value: compare the answer's value (f(2) = 3 vs 3: equal);
  - both name: the same name (|AB| = AB = BA, \angle ABC = \angle CBA; |z| is not z) and equal
    values (f(2) = 3 vs g(2) = 3, x = 5 vs y = 5: not equal);
  - a list of distinct names (AB = 4, CD = 5): matched name by name against named values in any
    order, value by value in the gold's order against bare values (4, 5; not 5, 4).
Equations without a name on either side (y = 2x + 1 vs 2x - y + 1 = 0) are equal when lhs - rhs
agree up to a constant factor. Inequalities compare real solution sets whatever the variable is
called (0 < f(x) < 1 vs (0, 1); x^2 < 4 vs -2 < x < 2; 1 <= |z| <= 3/2 is a union of two
intervals of z, not [1, 3/2]).

Units. A unit word dropped at the end of a value (5 \text{ cm}, 12 dollars, \$12) is kept
beside it: the same unit, or a unit on one side only, compares the values (5 vs 5 cm: equal);
different units do not (5 km vs 5 cm, \$5 vs 5 cents). A scale word (hundred, thousand, million,
billion, trillion) must be the same on both sides: 2 million is neither 2 nor 2000000.

Golds that are a float nan / inf or the text nan, inf, infinity (what a JSON NaN / Infinity
becomes) match nothing.

Bounds. Parsing is screened (screen.py) and a proof that a difference is zero runs sympy's
unbounded steps (simplify, minimal_polynomial) only on small inputs (screen.small_for_proof), so
the known blow-up classes (nested powers of sums, expansions of 65^3 terms, sums of many nested
radicals) finish in well under a second in-process. This is screening, not a limit: in-process
`grade()` has no hard time or memory bound. VerifierPool (pool.py) is the bounded path: a
per-item SIGKILL timeout and an address-space limit per worker.
"""

import functools
import math
import random
import re

import sympy

from tapo_jax.rewards.extract import extract_answer
from tapo_jax.rewards.intervals import to_set
from tapo_jax.rewards.lex import ParseError
from tapo_jax.rewards.parse import MAX_CHARS, normalize_text, parse
from tapo_jax.rewards.screen import MAX_EXPANDED_TERMS, expanded_terms, small_for_proof
from tapo_jax.rewards.units import units_agree
from tapo_jax.rewards.values import Choice, Parsed, Rel, Seq, Text

# Thousands separators as lex.py reads them: 7,425,000 | 14{,}916 | 11,\! 111 | 1 000 | 1\;000.
_SEPARATORS = r"(?:,|(?:\{,\}|,\\!)[ \t]*|(?:\\[,;:! ]|~|[ \t])+)"
_PLAIN_INT = re.compile(r"([+-]?)([1-9]\d{0,2}(?:" + _SEPARATORS + r"\d{3})+|\d{1,400})(?:\.0*)?")
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
  """Exact (symbolic) proof that d == 0; False when no method proves it.

  The cheap rewrites run on anything expanded_terms lets through; sympy.simplify and
  minimal_polynomial, whose cost grows without bound with the number of radicals (a sum of six
  denested square roots ran for minutes), only on expressions inside small_for_proof().
  """
  steps = (sympy.expand, lambda e: sympy.cancel(sympy.together(e)), sympy.radsimp)
  for step in steps:
    if step(d) == 0:
      return True
  if any(p.exp == sympy.S.Half and p.base.is_Add for p in d.atoms(sympy.Pow)):
    if sympy.expand(sympy.sqrtdenest(d)) == 0:  # \sqrt{5 + 2\sqrt6} = \sqrt2 + \sqrt3
      return True
  if not small_for_proof(d):
    return False
  if sympy.simplify(d) == 0:
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
  if expanded_terms(d) > MAX_EXPANDED_TERMS:  # a proof would have to expand it: not verifiable
    return False
  return _is_zero(d)


def _is_symbol_list(v) -> bool:
  """x, f(2), ∠A (symbols, see parse.py), or a tuple / list / ratio of them: (x, y), A:B."""
  if isinstance(v, sympy.Symbol):
    return True
  return isinstance(v, Seq) and all(isinstance(x, sympy.Symbol) for x in v.items)


def _is_product_name(v, gold_symbols: set) -> bool:
  """AB, xy: a product of symbols (no number factor) foreign to the gold's own symbols."""
  if not isinstance(v, sympy.Mul) or v.free_symbols <= gold_symbols:
    return False
  return all(isinstance(f, sympy.Symbol) for f in v.args)


def _is_name(v, gold_symbols: set) -> bool:
  """A left-hand side naming a quantity: x, (x, y), f(2), A:B, AB, |AB|, |z| (module docstring)."""
  if _is_symbol_list(v) or _is_product_name(v, gold_symbols):
    return True
  if isinstance(v, sympy.Abs):
    inner = v.args[0]
    return isinstance(inner, sympy.Symbol) or _is_product_name(inner, gold_symbols)
  return False


def _name_key(v):
  """Names compare by this: |AB| is the segment AB (= BA); |z| stays the modulus of z."""
  if isinstance(v, sympy.Abs) and _is_points(v.args[0]):
    return v.args[0]
  return v


def _is_points(v) -> bool:
  return isinstance(v, sympy.Mul) and all(
    isinstance(f, sympy.Symbol) and len(f.name) == 1 and f.name.isupper() for f in v.args
  )


def _approximates(exact, literal, ulp) -> bool:
  r"""Whether `literal` is `exact` rounded or cut to its last place: 2\pi \approx 6.28 or 6.283
  (not 6.29), \pi \approx 3.1416 or 3.1415, 42 \approx 42.0 (not 43)."""
  if ulp is None or not isinstance(exact, sympy.Expr) or exact.free_symbols:
    return False
  if not (isinstance(literal, sympy.Expr) and literal.is_Rational):
    return False
  d = _numeric(exact - literal)
  v = _numeric(exact)
  if d is None or v is None or abs(d.imag) > _NONZERO or abs(v.imag) > _NONZERO:
    return False
  unit = float(ulp)
  rounded = abs(d.real) <= unit / 2
  cut = 0 <= d.real * (1 if v.real >= 0 else -1) < unit  # digits dropped toward zero
  return rounded or cut


def _rel_value(rel: Rel, gold_symbols: set):
  r"""The value an equation chain asserts (x = 2 + 3 = 5 -> 5), or None if its parts disagree."""
  ops = list(rel.ops)
  parts = list(rel.parts)
  if "~" in ops:  # 2\pi \approx 6.28: the exact part counts if the decimal after it is its value
    ulps = list(rel.ulps) + [None] * len(ops)
    for k, op in enumerate(ops):
      if op == "~" and not _approximates(parts[k], parts[k + 1], ulps[k]):
        return None  # 42 \approx 43 is no answer of 42
    parts, ops = parts[: ops.index("~") + 1], ops[: ops.index("~")]
  if any(op != "=" for op in ops):
    return None
  # Names at either end (x =, f(2) =, (x, y) =, AB =) are dropped; the rest must all be equal.
  # A name has no numeric factor: 5x = 5 asserts x = 1, not 5.
  while len(parts) > 1 and _is_name(parts[0], gold_symbols):
    parts.pop(0)
  while len(parts) > 1 and _is_name(parts[-1], gold_symbols):  # 3 = f(2) reads like f(2) = 3
    parts.pop()
  if any(not _equal(parts[0], p, gold_symbols) for p in parts[1:]):
    return None
  return parts[0]


def _set_pieces(s: sympy.Set) -> list | None:
  """A union of intervals and points as (start, end, left_open, right_open) in increasing order."""
  if isinstance(s, sympy.Union):
    parts = []
    for arg in s.args:
      sub = _set_pieces(arg)
      if sub is None:
        return None
      parts += sub
  elif isinstance(s, sympy.Interval):
    parts = [(s.start, s.end, bool(s.left_open), bool(s.right_open))]
  elif isinstance(s, sympy.FiniteSet):
    parts = [(p, p, False, False) for p in s.args]
  else:
    return [] if s == sympy.S.EmptySet else None
  if len(parts) < 2:
    return parts
  keys = [(_numeric(a), _numeric(b)) for a, b, _, _ in parts]
  if any(v is None or abs(v.imag) > _NONZERO for k in keys for v in k):
    return None
  order = sorted(range(len(parts)), key=lambda i: (keys[i][0].real, keys[i][1].real))
  return [parts[i] for i in order]


def _sets_equal(s: sympy.Set, t: sympy.Set) -> bool:
  """Exact equality of intervals, unions and finite sets (endpoints compared symbolically)."""
  if s == t:
    return True
  if isinstance(s, sympy.FiniteSet) and isinstance(t, sympy.FiniteSet):
    return _unordered_equal(list(s.args), list(t.args), set())
  ps, pt = _set_pieces(s), _set_pieces(t)
  if ps is None or pt is None or len(ps) != len(pt):
    return False
  return all(
    a[2:] == b[2:] and _endpoints_equal(a[0], b[0]) and _endpoints_equal(a[1], b[1])
    for a, b in zip(ps, pt, strict=True)
  )


def _endpoints_equal(a, b) -> bool:
  if a.has(sympy.oo, -sympy.oo) or b.has(sympy.oo, -sympy.oo):
    return a == b
  return scalars_equal(a, b)


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
  if g.kind == "ratio":  # 3:4 is matched by 3:4 (and A:B = 3:4), item by item
    a = _rel_value(a, gold_symbols) if isinstance(a, Rel) else a
    return (
      isinstance(a, Seq)
      and a.kind == "ratio"
      and len(a.items) == len(g.items)
      and all(_equal(x, y, gold_symbols) for x, y in zip(g.items, a.items, strict=True))
    )
  by_name = _named_list_equal(g, a, gold_symbols)
  if by_name is not None:
    return by_name
  if g.kind in ("paren", "bracket") and len(g.items) == 2 and _is_set_like(a):
    try:  # (3, \infty) read as an interval
      return _sets_equal(to_set(g), to_set(a))
    except ParseError:
      return False
  if g.kind not in ("paren", "bracket") and all(
    isinstance(x, Rel) and x.ops[0] != "=" for x in g.items
  ):  # x < 1 or x > 2; x >= 0 and x <= 1
    try:
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
  if max(expanded_terms(dg), expanded_terms(da)) > MAX_EXPANDED_TERMS:
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
  gold_named = _named_value(g)
  if isinstance(a, Rel) and len(a.ops) == 1 and a.ops[0] == "=":
    if all(isinstance(x, sympy.Expr) for x in g.parts + a.parts) and _lines_equal(g, a):
      return True
    answer_named = _named_value(a)
    if gold_named and answer_named:  # both name a quantity: the same one, the same value
      (gn, gv), (an, av) = gold_named, answer_named
      return _name_key(gn) == _name_key(an) and _equal(gv, av, gold_symbols)
  if gold_named:  # x = 5 accepts 5; y = 2x + 1 accepts 2x + 1; f(2) = 3 accepts 3
    name, value = gold_named
    return _equal(value, a, gold_symbols - _free_symbols(name))
  return False


def _named_value(v):
  """(name, value) of an equation `name = value` or `value = name` (module docstring), else None."""
  if not (isinstance(v, Rel) and v.ops == ("=",)):
    return None
  for name, value in (v.parts, v.parts[::-1]):
    if _is_name(name, set()) and not (_free_symbols(name) & _free_symbols(value)):
      return name, value
  return None


def _named_list_equal(g: Seq, a, gold_symbols: set) -> bool | None:
  """AB = 4, CD = 5: by name against named values, in order against bare ones; None if g is
  not a list of distinct names."""
  named = [_named_value(x) for x in g.items]
  if any(n is None for n in named):
    return None
  named = [(_name_key(k), v) for k, v in named]
  if len({k for k, _ in named}) != len(named):
    return None
  if not (isinstance(a, Seq) and a.kind in ("list", "and") and len(a.items) == len(g.items)):
    return False
  answers = [_named_value(x) for x in a.items]
  if all(n is not None for n in answers):
    by_name = {_name_key(k): v for k, v in answers}
    return len(by_name) == len(answers) and all(
      k in by_name and _equal(v, by_name[k], gold_symbols) for k, v in named
    )
  return all(_equal(x, y, gold_symbols) for x, y in zip(g.items, a.items, strict=True))


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
  if isinstance(v, Rel):  # \angle A = 30^\circ: the numbers scale, the names stay
    parts = tuple(p * factor if isinstance(p, sympy.Expr) and p.is_number else p for p in v.parts)
    return Rel(parts, v.ops, v.ulps)
  if isinstance(v, sympy.Expr):
    return v * factor
  if isinstance(v, Seq) and all(isinstance(x, sympy.Expr) for x in v.items):
    return Seq(v.kind, tuple(x * factor for x in v.items))
  return None


def _readings(p: Parsed) -> list:
  """The values an answer may denote, each with its kind: 25\\% is 1/4 or 25; 30^\\circ is 30
  or pi/6; 101_2 is 5 or 101."""
  values = [("value", p.value)]
  if p.percent:
    values.append(("percent", _scaled(p.value, 100)))
  if p.degree:
    values.append(("degree", _scaled(p.value, sympy.pi / 180)))
  if p.digits is not None:
    values.append(("digits", p.digits))
  return [(kind, v) for kind, v in values if v is not None]


def _reading_pairs(g: Parsed, a: Parsed):
  """The (gold, answer) value pairs to compare. A percent mark on both sides fixes the scale:
  0.01\\% and 1 pct are 1/10000 and 1/100, so the second readings are not crossed with the
  first (a mark on one side only still reads both ways)."""
  both = g.percent and a.percent
  for gk, gv in _readings(g):
    for ak, av in _readings(a):
      if both and ("percent" in (gk, ak)) and gk != ak:
        continue
      yield gv, av


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


# What a JSON NaN / Infinity (or a float one) becomes as text: no gold, so nothing matches it.
_NON_FINITE_GOLDS = {s + w for s in ("", "+", "-") for w in ("nan", "inf", "infinity")}


def is_non_finite_gold(gold) -> bool:
  """A gold that is a float nan / inf or the text nan, inf, infinity (any case and sign)."""
  if isinstance(gold, float):
    return not math.isfinite(gold)
  return isinstance(gold, str) and gold.strip().lower() in _NON_FINITE_GOLDS


def is_equivalent(gold: str, answer: str | None) -> bool:
  """Whether `answer` (extracted model text) is exactly equivalent to `gold`."""
  if answer is None or gold is None or not str(answer).strip() or is_non_finite_gold(gold):
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
    if not units_agree(g.units, a.units):
      return False
    gold_symbols = _free_symbols(g.value)
    return any(_equal(gv, av, gold_symbols) for gv, av in _reading_pairs(g, a))
  except Exception:  # the reward never raises: whatever cannot be verified is wrong
    return False


def grade(response: str, gold: str, extract: str = "boxed") -> float:
  """1.0 if the final answer in `response` (extract: "boxed" | "answer_line", see extract.py) is
  equivalent to `gold`, else 0.0. In-process: screened, but without a hard time or memory limit
  (VerifierPool is the bounded path; see the module docstring)."""
  return 1.0 if is_equivalent(gold, extract_answer(response, extract)) else 0.0
