"""The sets an answer denotes: intervals, unions, finite sets, and the solution sets of
inequalities in one variable (linear ones exactly, without sympy's solver; non-linear ones only
for small rational functions, so the solver stays on inputs it solves fast)."""

import sympy
import sympy.solvers.inequalities

from tapo_jax.rewards.lex import ParseError
from tapo_jax.rewards.screen import MAX_EXPANDED_TERMS, expanded_terms, interval, scalar
from tapo_jax.rewards.values import Rel, Seq


def to_set(v) -> sympy.Set:
  """The set a value denotes: intervals, unions, inequalities in one variable, {a, b}."""
  if isinstance(v, sympy.Set):
    return v
  if isinstance(v, Seq):
    if v.kind in ("paren", "bracket") and len(v.items) == 2:
      a, b = v.items
      return interval(a, b, v.kind == "paren", v.kind == "paren")
    if v.kind == "set":
      return sympy.FiniteSet(*(scalar(x) for x in v.items))
    if v.kind in ("or", "list", "and") and all(isinstance(x, Rel) for x in v.items):
      sets = [to_set(x) for x in v.items]
      return sympy.Intersection(*sets) if v.kind == "and" else sympy.Union(*sets)
  if isinstance(v, Rel):
    return _rel_to_set(v)
  raise ParseError("not a set")


def _rel_to_set(rel: Rel) -> sympy.Set:
  """The real solution set of an inequality chain in one variable (linear ones without sympy)."""
  symbols = set().union(*(p.free_symbols for p in rel.parts if isinstance(p, sympy.Expr)))
  if len(symbols) != 1 or "=" in rel.ops or "~" in rel.ops:
    raise ParseError("not an inequality in one variable")
  (x,) = symbols
  lo, lo_open, hi, hi_open = -sympy.oo, True, sympy.oo, True
  holes, curved = [], []
  for lhs, op, rhs in zip(rel.parts[:-1], rel.ops, rel.parts[1:], strict=True):
    if expanded_terms(scalar(lhs) - scalar(rhs)) > MAX_EXPANDED_TERMS:
      raise ParseError("inequality too large")
    d = sympy.expand(scalar(lhs) - scalar(rhs))  # d op 0
    a, b = d.coeff(x, 1), d.coeff(x, 0)
    linear = a.is_number and b.is_number and a.is_real and b.is_real and a != 0
    if not linear or sympy.expand(a * x + b - d) != 0:
      curved.append(_nonlinear_set(scalar(lhs) - scalar(rhs), op, x))
      continue
    c = -b / a
    if a < 0:
      op = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "!=": "!="}[op]
    if op == "!=":
      holes.append(c)
    elif op in ("<", "<=") and bool(c < hi or (c == hi and op == "<")):
      hi, hi_open = c, op == "<"
    elif op in (">", ">=") and bool(c > lo or (c == lo and op == ">")):
      lo, lo_open = c, op == ">"
  result = sympy.Interval(lo, hi, lo_open, hi_open)
  for c in holes:
    result = sympy.Complement(result, sympy.FiniteSet(c))
  return sympy.Intersection(result, *curved) if curved else result


MAX_INEQ_DEGREE = 4  # of a non-linear inequality's numerator / denominator in its variable
MAX_INEQ_ABS = 2  # absolute values in one non-linear inequality
_RELATIONS = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge, "!=": sympy.Ne}


def _nonlinear_set(d: sympy.Expr, op: str, x: sympy.Symbol) -> sympy.Set:
  """{x real: d op 0} for d rational in x and |polynomial|s, rational coefficients, small degree.

  x^2 < 4 -> (-2, 2); 1 <= |z| -> (-oo, -1] U [1, oo). Anything else (radicals, pi, functions,
  high degree) is refused, which keeps sympy's solver on the small inputs it solves fast.
  """
  absolutes = list(d.atoms(sympy.Abs))
  if len(absolutes) > MAX_INEQ_ABS:
    raise ParseError("too many absolute values")
  ys = sympy.symbols(f"_y0:{len(absolutes)}")
  for inner in [a.args[0] for a in absolutes] + [d.subs(dict(zip(absolutes, ys, strict=True)))]:
    _check_rational_function(inner, x, ys)
  return sympy.solvers.inequalities.solve_univariate_inequality(
    _RELATIONS[op](d, 0), x, relational=False, domain=sympy.S.Reals
  )


def _check_rational_function(e: sympy.Expr, x: sympy.Symbol, ys: tuple) -> None:
  """e is a ratio of small-degree polynomials in x (and ys) with small rational coefficients."""
  if not e.free_symbols <= {x, *ys} or e.atoms(sympy.NumberSymbol, sympy.Function):
    raise ParseError("not a rational function")
  if e.has(sympy.I):
    raise ParseError("not a rational function")
  for p in e.atoms(sympy.Pow):
    if not (p.exp.is_Integer and abs(p.exp) <= MAX_INEQ_DEGREE):
      raise ParseError("not a rational function")
  for n in e.atoms(sympy.Number):
    if not n.is_Rational or max(int(n.p).bit_length(), int(n.q).bit_length()) > 64:
      raise ParseError("coefficients too large")
  num, den = sympy.fraction(sympy.together(e))
  for poly in (num, den):
    if sympy.Poly(poly, x, *ys).total_degree() > MAX_INEQ_DEGREE:
      raise ParseError("degree too high")


def set_op(op: str, a, b) -> sympy.Set:
  """a \\cup b, a \\cap b or a \\setminus b of two values that denote sets."""
  a, b = to_set(a), to_set(b)
  if op == "cup":
    return sympy.Union(a, b)
  if op == "cap":
    return sympy.Intersection(a, b)
  return sympy.Complement(a, b)
