r"""Screened sympy constructors: sizes are checked before sympy evaluates anything.

Every sympy value the parser builds goes through these (or is an exact literal), so an answer
like 9^{9^{9^9}}, (10^{100})! or (1+\sqrt2)^{10^5} is refused in microseconds instead of
exhausting time or memory. A power of a sum is bounded by its exponent after sympy folds nested
powers ((((\sqrt2-1)^{64})^{64})^{64} is (\sqrt2-1)^{262144}: refused), and `expanded_terms`
estimates how large expand() would make an expression before math.py asks sympy to prove it zero.
"""

import math

import sympy

from tapo_jax.rewards.lex import MAX_EXPONENT, ParseError

MAX_BITS = 100_000  # bits of a rational produced by a power
MAX_SMALL_EXPONENT = 64  # |exponent| of a power of a sum (its expansion grows fast)
MAX_FACTORIAL = 1000
MAX_BINOM = 10_000
MAX_ROOT = 1000  # index of a root, denominator of a rational exponent
MAX_EXPANDED_TERMS = 5000  # estimated terms of expand(): more is not proved equal
MAX_PROOF_OPS = 40  # sympy.count_ops of a difference that simplify / minimal_polynomial may see
MAX_PROOF_DEGREE = 32  # bound on its algebraic degree (minimal_polynomial of 6 roots: minutes)


def scalar(v) -> sympy.Expr:
  """v itself if it is a scalar expression (not a matrix, set, tuple ...)."""
  if isinstance(v, sympy.MatrixBase) or not isinstance(v, sympy.Expr):
    raise ParseError("expected a scalar")
  return v


def _bits(r: sympy.Rational) -> int:
  return max(int(r.p).bit_length(), int(r.q).bit_length(), 1)


def power(b, e):
  """b ** e, refusing anything whose size or expansion could blow up."""
  b, e = scalar(b), scalar(e)
  if e.is_Rational:
    p, q = abs(int(e.p)), int(e.q)
    if q > MAX_ROOT:
      raise ParseError("root index too large")
    if b.is_Rational:
      if b == 0 and e < 0:
        raise ParseError("division by zero")
      if b not in (0, 1, -1) and _bits(b) * p > MAX_BITS:
        raise ParseError("power too large")
    elif b.is_Add:
      if p > MAX_SMALL_EXPONENT:
        raise ParseError("power of a sum too large")
    elif p > MAX_EXPONENT:
      raise ParseError("exponent too large")
    if b.is_Pow and b.exp.is_Rational and b.base.is_Rational:  # (2^(1/2))^e folds exactly
      if _bits(b.base) * abs(int(b.exp.p)) * p > MAX_BITS:
        raise ParseError("power too large")
  elif e.is_number:
    if e.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
      raise ParseError("infinite exponent")
    magnitude = abs(sympy.N(e, 15))
    if not magnitude.is_Number or magnitude > MAX_EXPONENT:
      raise ParseError("exponent too large")
  elif b.is_Rational and b not in (0, 1, -1) and _bits(b) > MAX_BITS // 10:
    raise ParseError("base too large")
  result = sympy.Pow(b, e)
  for f in sympy.Mul.make_args(result):  # sympy folds (s^64)^64 into s^4096
    if f.is_Pow and f.base.is_Add and f.exp.is_Rational and abs(int(f.exp.p)) > MAX_SMALL_EXPONENT:
      raise ParseError("power of a sum too large")
  return result


def small_for_proof(d) -> bool:
  """Whether d is small enough for sympy.simplify and minimal_polynomial (see MAX_PROOF_*).

  The degree bound multiplies the index of every distinct root and 2n for the lcm n of the
  denominators of trigonometric values at rational multiples of pi (cos(k pi/n) lies in the
  2n-th cyclotomic field, of degree <= 2n).
  """
  degree, trig = 1, 1
  for p in d.atoms(sympy.Pow):
    if p.exp.is_Rational and not p.exp.is_Integer:
      degree *= int(p.exp.q)
  for f in d.atoms(sympy.sin, sympy.cos, sympy.tan, sympy.cot, sympy.sec, sympy.csc):
    k = f.args[0] / sympy.pi
    if k.is_Rational:
      trig = math.lcm(trig, int(k.q))
  degree *= 2 * trig if trig > 1 else 1
  return degree <= MAX_PROOF_DEGREE and sympy.count_ops(d) <= MAX_PROOF_OPS


def expanded_terms(e, cap: int = MAX_EXPANDED_TERMS) -> int:
  """An upper estimate of len(expand(e).args), or cap + 1 when it is larger than cap.

  Sums add, products multiply, an integer power n of a t-term sum has C(n + t - 1, t - 1)
  monomials; radicals and functions count as one term each.
  """
  if isinstance(e, sympy.Add):
    return min(cap + 1, sum(expanded_terms(a, cap) for a in e.args))
  if isinstance(e, sympy.Mul):
    n = 1
    for a in e.args:
      n = min(cap + 1, n * expanded_terms(a, cap))
    return n
  if isinstance(e, sympy.Pow) and e.exp.is_Integer:
    t, n = expanded_terms(e.base, cap), abs(int(e.exp))
    if t == 1 or n <= 1:
      return t
    if t > cap or n > cap:
      return cap + 1
    return min(cap + 1, math.comb(n + t - 1, t - 1))
  return 1


def factorial(n):
  """n! for an integer 0 <= n <= MAX_FACTORIAL."""
  n = scalar(n)
  if not (n.is_Integer and 0 <= n <= MAX_FACTORIAL):
    raise ParseError("factorial argument out of range")
  return sympy.factorial(n)


def binomial(n, k):
  """C(n, k) for integers, n <= MAX_BINOM."""
  n, k = scalar(n), scalar(k)
  if not (n.is_Integer and k.is_Integer and 0 <= n <= MAX_BINOM):
    raise ParseError("binomial argument out of range")
  return sympy.binomial(n, k)


def root(x, n):
  """The n-th root; the real one for a negative rational and odd n."""
  x, n = scalar(x), scalar(n)
  if not (n.is_Integer and 2 <= n <= MAX_ROOT):
    raise ParseError("bad root index")
  if x.is_Rational and x < 0 and n % 2 == 1:
    return -power(-x, sympy.Rational(1, int(n)))
  return power(x, sympy.Rational(1, int(n)))


def mul(a, b):
  """a * b for scalars and matrices."""
  if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
    if a.shape[1] != b.shape[0]:
      raise ParseError("matrix shapes")
    return sympy.ImmutableMatrix(a * b)
  if isinstance(a, sympy.MatrixBase) or isinstance(b, sympy.MatrixBase):
    scalar(b if isinstance(a, sympy.MatrixBase) else a)
    return sympy.ImmutableMatrix(a * b)
  return sympy.Mul(scalar(a), scalar(b))


def div(a, b):
  """a / b; b a nonzero scalar."""
  b = scalar(b)
  if b == 0:
    raise ParseError("division by zero")
  if isinstance(a, sympy.MatrixBase):
    return sympy.ImmutableMatrix(a / b)
  return sympy.Mul(scalar(a), power(b, sympy.Integer(-1)))


def add(a, b):
  """a + b for scalars and same-shape matrices."""
  if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
    if a.shape != b.shape:
      raise ParseError("matrix shapes")
    return sympy.ImmutableMatrix(a + b)
  return sympy.Add(scalar(a), scalar(b))


def apply_function(name: str, arg, base=None):
  """sin, log_b, exp ... applied to a scalar."""
  arg = scalar(arg)
  if name in ("log", "ln"):
    if arg == 0:
      raise ParseError("log of zero")
    if base is not None:
      base = scalar(base)
      if base in (0, 1):
        raise ParseError("bad log base")
      return sympy.log(arg, base)
    return sympy.log(arg) if name == "ln" else sympy.log(arg, 10)
  if name == "exp":
    return power(sympy.E, arg)
  if name == "det":
    raise ParseError("det")
  table = {
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "cot": sympy.cot,
    "sec": sympy.sec,
    "csc": sympy.csc,
    "arcsin": sympy.asin,
    "arccos": sympy.acos,
    "arctan": sympy.atan,
    "arcsec": sympy.asec,
    "arccsc": sympy.acsc,
    "arccot": sympy.acot,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "tanh": sympy.tanh,
  }
  return table[name](arg)


INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan", "sec": "arcsec", "csc": "arccsc"}


def interval(a, b, left_open: bool, right_open: bool) -> sympy.Set:
  """An interval written as (a, b], [a, b) ...; reversed, empty or non-real ones are refused."""
  a, b = scalar(a), scalar(b)
  if a.is_extended_real is False or b.is_extended_real is False or (b - a).is_nonpositive:
    raise ParseError("not an interval")
  try:
    return sympy.Interval(a, b, left_open, right_open)
  except (ValueError, TypeError) as e:
    raise ParseError("not an interval") from e
