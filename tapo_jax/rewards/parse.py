r"""Safe parsing of final answers (a LaTeX / plain-math subset) into sympy objects.

A hand-written tokenizer and recursive-descent parser build sympy objects directly from screened
inputs: model text never reaches eval, exec, sympify or any sympy string parser. Exponents,
factorials, roots, number lengths and nesting depth are bounded before sympy touches them, so no
input can make sympy run long or allocate much here (the worker pool adds a hard timeout anyway).

One module, longer than most here, on purpose: it is one grammar (precedence climbing from
relations down to atoms), and its bounds only stay auditable when every production is read in
one place.

Values returned by `parse` (the non-sympy ones: values.py; what a set-valued one denotes:
intervals.py; the unit words it drops: units.py):
  sympy.Expr         a scalar (numbers exact: 0.25 is Rational(1, 4))
  Rel                a relation chain, e.g. x = 5, 1 < x <= 3, 2 + 3 = 5
  Seq                a comma list, a tuple, a set, the two branches of a \pm, a ratio 3:4
  sympy.Set          an interval, a union of intervals, the empty set, the reals
  sympy.MatrixBase   a pmatrix / bmatrix
  Text, Choice       words, and a multiple-choice letter

Names. A part of a relation that is a function value, `f(x)`, `f(2)`, `P(A)`, `f^{-1}(3)`,
`f'(0)` (one letter applied to numbers or letters), becomes one symbol named by its text, so
`f(2) = 3` names f(2) instead of asserting 2f = 3; `\angle ABC` is the symbol `∠ABC` and `A:B`
a ratio of symbols. How names are compared is decided in math.py.
Bases: `101_2` is 5 (digits below the base, base 2-36); a lone based literal also keeps its digit
string as a second reading (`101_2` ~ 101, for golds that omit the base).
"""

import re

import sympy

from tapo_jax.rewards import intervals
from tapo_jax.rewards.lex import (
  CONST_WORDS,
  END,
  EXTREMA,
  FUNC_NAMES,
  ParseError,
  Token,
  tokenize,
)
from tapo_jax.rewards.screen import (
  INVERSE,
  add,
  apply_function,
  binomial,
  div,
  factorial,
  interval,
  mul,
  power,
  root,
  scalar,
)
from tapo_jax.rewards.units import unit_key
from tapo_jax.rewards.values import PM, Choice, Parsed, Rel, Seq, Text

MAX_CHARS = 1000  # longer answers are not parsed
MAX_DEPTH = 40  # bracket nesting
_CURRENCY = re.compile(r"\\\$")  # \$5: a dollar amount (a plain $ delimits math)


def _subs_pm(v, sign: int):
  if isinstance(v, Rel):
    return Rel(tuple(_subs_pm(p, sign) for p in v.parts), v.ops, v.ulps)
  if isinstance(v, Seq):
    return Seq(v.kind, tuple(_subs_pm(p, sign) for p in v.items))
  return v.subs(PM, sign)


def _has_pm(v) -> bool:
  if isinstance(v, Rel):
    return any(_has_pm(p) for p in v.parts)
  if isinstance(v, Seq):
    return any(_has_pm(p) for p in v.items)
  return isinstance(v, sympy.Basic) and not isinstance(v, sympy.Set) and v.has(PM)


_CLOSERS = ("END", "COMMA", "SEP", "RP", "RB", "RS", "RG", "AMP")  # what may end an item


def _is_name_argument(a, letter: str) -> bool:
  """An argument of a function name: a number or a letter other than the function's own."""
  if isinstance(a, sympy.Symbol):
    return a.name != letter
  return isinstance(a, sympy.Expr) and a.is_number and not a.has(PM)


# ---------------------------------------------------------------------------------------------


class _Parser:
  """Recursive descent over the token list; one instance per parse."""

  def __init__(self, toks: list[Token]):
    self.toks = toks
    self.i = 0
    self.percent = False
    self.degree = False
    self.units: list[str] = []  # unit words dropped at the end of an item (5 cm: "cm")
    self.in_func = 0
    self.in_abs = 0

  def peek(self, k: int = 0) -> Token:
    j = self.i + k
    return self.toks[j] if 0 <= j < len(self.toks) else END

  def next(self) -> Token:
    tok = self.peek()
    self.i += 1
    return tok

  def at(self, kind: str, val=None, k: int = 0) -> bool:
    tok = self.peek(k)
    return tok.kind == kind and (val is None or tok.val == val)

  def expect(self, kind: str) -> Token:
    tok = self.next()
    if tok.kind != kind:
      raise ParseError(f"expected {kind}, got {tok.kind}")
    return tok

  def top(self):
    """items separated by commas, semicolons, 'or', 'and'."""
    v = self.items(("END",))
    self.expect("END")
    return v

  def items(self, closers: tuple[str, ...]):
    values, seps = [self.item()], set()
    while self.at("COMMA") or self.at("SEP"):
      tok = self.next()
      seps.add(tok.val if tok.kind == "SEP" else "list")
      if self.peek().kind in closers:  # trailing comma
        break
      values.append(self.item())
    if len(values) == 1:
      return values[0]
    kind = seps.pop() if len(seps) == 1 else "list"
    return Seq(kind, tuple(values))

  def item(self):
    if self.at("ID") and self.at("IN", k=1):  # x \in [1, 2]
      self.i += 2
    v = self.relation()
    while self.at("SETOP"):
      op = self.next().val
      v = intervals.set_op(op, v, self.relation())
    if _has_pm(v):
      return Seq("pm", (_subs_pm(v, 1), _subs_pm(v, -1)))
    return v

  def relation(self):
    parts, ops, ulps = [self.part(first=True)], [], []
    while self.at("REL"):
      ops.append(self.next().val)
      ulps.append(self._literal_ulp() if ops[-1] == "~" else None)
      parts.append(self.part(first=False))
    if not ops:
      return parts[0]
    if any(op != "=" for op in ops):
      for p in parts:
        if not (isinstance(p, Seq) and p.kind == "ratio"):
          scalar(p)
    return Rel(tuple(parts), tuple(ops), tuple(ulps) if "~" in ops else ())

  def part(self, first: bool):
    """One side of a relation: a function name f(2), a ratio a:b, or an expression."""
    name = self._function_name(first) if self.peek().kind == "ID" else None
    if name is not None:
      return name
    v = self.arith()
    if self.peek().kind != "COLON":
      return v
    items = [v]
    while self.at("COLON"):
      self.next()
      items.append(scalar(self.arith()))
    return Seq("ratio", tuple(scalar(x) for x in items))

  def _literal_ulp(self):
    """One unit in the last place of the plain number literal at the cursor, else None."""
    k = 1 if self.at("OP", "-") else 0
    tok = self.peek(k)
    if tok.kind != "NUM" or self.peek(k + 1).kind not in _CLOSERS + ("REL",):
      return None
    raw = re.sub(r"[,\s{}~\\!;:]", "", tok.raw)  # thousands separators
    if not re.fullmatch(r"\d+(\.\d*)?|\.\d+", raw):
      return None  # scientific notation, a repeating decimal
    decimals = len(raw.split(".")[1]) if "." in raw else 0
    return sympy.Rational(1, 10**decimals)

  def _function_name(self, first: bool):
    """f(x), f(2), P(A), f^{-1}(3), f'(0) standing alone as a relation part, as one symbol."""
    if not (self.at("ID") and self.peek().val not in ("e", "i")):
      return None
    k = 1  # look ahead without consuming: most parts (x = 5) are no function value
    if self.at("SUB", k=k):
      k += 2
    if self.at("OP", "^", k=k):
      k += 5
    while self.at("PRIME", k=k):
      k += 1
    if not self.at("LP", k=k):
      return None
    start, flags, units = self.i, (self.percent, self.degree), len(self.units)
    try:
      letter = self.next().val
      mark = ""
      if self.at("SUB") and self.peek(1).kind in ("NUM", "ID"):
        self.next()
        mark += "_" + str(self.next().raw)
      if self.at("OP", "^") and self.at("LG", k=1) and self.at("OP", "-", k=2):
        if self.peek(3).raw == "1" and self.at("RG", k=4):
          self.i += 5
          mark += "^{-1}"
      while self.at("PRIME"):
        self.next()
        mark += "'"
      if not self.at("LP"):
        raise ParseError("not a function value")
      self.next()
      v = self.items(("RP",))
      self.expect("RP")
      args = v.items if isinstance(v, Seq) and v.kind == "list" else (v,)
      if not all(_is_name_argument(a, letter) for a in args):
        raise ParseError("not a function value")
      follows = self.peek().kind
      if follows != "REL" and (first or follows not in _CLOSERS):
        raise ParseError("not a whole relation part")
    except ParseError:
      self.i, (self.percent, self.degree) = start, flags
      del self.units[units:]
      return None
    return sympy.Symbol(f"{letter}{mark}({','.join(str(a) for a in args)})")

  def arith(self):
    v = self.term()
    while self.at("OP") and self.peek().val in ("+", "-", "pm", "mp"):
      op = self.next().val
      w = self.term()
      if op == "-":
        w = mul(sympy.Integer(-1), w)
      elif op in ("pm", "mp"):
        w = mul(PM if op == "pm" else -PM, w)
      v = add(v, w)
    return v

  def _implicit_start(self) -> bool:
    tok = self.peek()
    if tok.kind == "BAR":
      return self.in_abs == 0
    return tok.kind in ("ID", "CONST", "FUNC", "FRAC", "SQRT", "BINOM", "LP", "LG", "BEGIN")

  def term(self):
    v = self.unary()
    while True:
      if self.at("OP", "*"):
        self.next()
        v = mul(v, self.unary())
      elif self.at("OP", "/"):
        self.next()
        v = div(v, self.unary())
      elif self._implicit_start():
        v = mul(v, self.factor())
      else:
        return v

  def unary(self):
    if self.at("OP", "-"):
      self.next()
      return mul(sympy.Integer(-1), self.unary())
    if self.at("OP", "+"):
      self.next()
      return self.unary()
    if self.at("OP", "pm") or self.at("OP", "mp"):
      sign = PM if self.next().val == "pm" else -PM
      return mul(sign, self.unary())
    return self.factor()

  def _degree_mark(self) -> int:
    """Tokens taken by a ^\\circ or ^{\\circ} at the cursor (0 if none)."""
    if self.at("OP", "^") and self.at("CIRC", k=1):
      return 2
    if self.at("OP", "^") and self.at("LG", k=1) and self.at("CIRC", k=2) and self.at("RG", k=3):
      return 4
    return 0

  def factor(self):
    v = self.primary()
    while True:
      if self.at("FACT"):
        self.next()
        v = factorial(v)
      elif self._degree_mark() or self.at("DEG"):
        self.i += self._degree_mark() or 1
        v = self._mark_degree(v)
        if self.peek().kind == "ID" and self.peek().val in "CF" and self.peek(1).kind in _CLOSERS:
          self.next()  # 30^\circ C: a temperature
      elif self.at("OP", "^"):
        self.next()
        v = power(v, self.exponent())
      elif self.at("PCT"):
        self.next()
        self.percent = True
        v = div(v, sympy.Integer(100))
      elif (self.at("UNIT") or self.peek().unit) and self._unit_ends_item():
        unit = self.next().val
        power_of = ""
        if self.at("OP", "^"):  # cm^2
          self.next()
          power_of = f"^{self.exponent()}"
        if unit == "percent":  # pct, percentage, per cent (lex.PERCENT_WORDS)
          self.percent = True
          v = div(v, sympy.Integer(100))
        elif unit in ("degree", "degrees"):
          v = self._mark_degree(v)
        else:
          words = unit_key(unit).split()
          self.units.extend(words[:-1] + [words[-1] + power_of])
      else:
        return v

  def _mark_degree(self, v):
    if self.in_func:  # \sin 30^\circ: radians inside a function
      return mul(v, sympy.pi / 180)
    self.degree = True
    return v

  def _unit_ends_item(self) -> bool:
    """A unit word is dropped only at the end of an item (5 cm, 5 \\text{ cm}^2)."""
    j = 1
    while self.peek(j).kind == "UNIT" or self.peek(j).unit:
      j += 1
    if self.at("OP", "^", k=j):
      j += 2 if not self.at("LG", k=j + 1) else 4
    return self.peek(j).kind in ("END", "COMMA", "SEP", "RP", "RB", "RS", "RG", "REL", "AMP")

  def exponent(self):
    if self.at("LG"):
      self.next()
      v = self.arith()
      self.expect("RG")
      return v
    if self.at("OP", "-"):
      self.next()
      return mul(sympy.Integer(-1), self.exponent())
    return self.factor()

  def arg(self):
    r"""One argument of \frac, \sqrt, \binom: a brace group or a single character/token."""
    if self.at("LG"):
      self.next()
      v = self.arith()
      self.expect("RG")
      return v
    tok = self.peek()
    if tok.kind == "NUM" and tok.raw.isdigit() and len(tok.raw) > 1:  # \frac94
      self.toks[self.i] = Token("NUM", sympy.Integer(int(tok.raw[1:])), tok.raw[1:])
      return sympy.Integer(int(tok.raw[0]))
    return self.primary()

  def primary(self):
    tok = self.next()
    kind = tok.kind
    if kind == "NUM":
      if tok.raw.isdigit() and self.at("FRAC"):
        return self._mixed_number(tok.val)
      if tok.raw.isdigit() and self.at("SUB"):
        return self._based(tok.raw)
      return tok.val
    if kind == "ANGLE":
      letters = []
      while self.at("ID") or self.at("WORD"):  # \angle A, \angle ABC (a WORD to the lexer)
        letters.append(self.next().val)
      if not letters:
        raise ParseError("angle without a name")
      name = "".join(letters)
      if len(name) == 3:  # \angle CBA is \angle ABC: the vertex in the middle
        name = min(name[0], name[2]) + name[1] + max(name[0], name[2])
      return sympy.Symbol("∠" + name)
    if kind == "ID":
      return self._identifier(tok.val)
    if kind == "CONST":
      return tok.val
    if kind == "SETCONST":
      return tok.val
    if kind in ("LP", "LB"):
      return self._bracketed(kind)
    if kind == "LS":
      if self.at("RS"):
        self.next()
        return sympy.S.EmptySet
      v = self.items(("RS",))
      self.expect("RS")
      vals = v.items if isinstance(v, Seq) and v.kind in ("list", "or", "and") else (v,)
      return Seq("set", tuple(vals))
    if kind == "LG":
      v = self.items(("RG",))
      self.expect("RG")
      return v
    if kind == "FRAC":
      a = self.arg()
      return div(a, self.arg())
    if kind == "SQRT":
      if self.at("LB"):
        self.next()
        n = self.arith()
        self.expect("RB")
        return root(self.arg(), n)
      return root(self.arg(), sympy.Integer(2))
    if kind == "BINOM":
      n = self.arg()
      return binomial(n, self.arg())
    if kind == "FUNC" and tok.val in EXTREMA:
      return self._extremum(tok.val)
    if kind == "FUNC":
      return self._function(tok.val)
    if kind == "BAR":
      self.in_abs += 1
      v = self.arith()
      self.expect("BAR")
      self.in_abs -= 1
      return sympy.Abs(scalar(v))
    if kind in ("LFLOOR", "LCEIL"):
      v = self.arith()
      self.expect("RFLOOR" if kind == "LFLOOR" else "RCEIL")
      return (sympy.floor if kind == "LFLOOR" else sympy.ceiling)(scalar(v))
    if kind == "BEGIN":
      return self._matrix(tok.val)
    raise ParseError(f"unexpected {kind}")

  def _mixed_number(self, whole):
    r"""3\frac12 is 7/2 when the fraction is proper and made of integer literals."""
    self.next()  # FRAC
    num, den = self.arg(), self.arg()
    if not (num.is_Integer and den.is_Integer):
      return mul(whole, div(num, den))  # 2\frac{\pi}{3}
    if 0 < num < den:
      return whole + num / den
    raise ParseError("improper mixed number")

  def _based(self, digits: str):
    """101_2, 101_{2}: an integer written in base 2..36 with decimal digits."""
    self.next()  # SUB
    braced = self.at("LG")
    if braced:
      self.next()
    base_tok = self.expect("NUM")
    if braced:
      self.expect("RG")
    if not base_tok.raw.isdigit() or not 2 <= int(base_tok.raw) <= 36:
      raise ParseError("bad base")
    base = int(base_tok.raw)
    if any(int(d) >= base for d in digits):
      raise ParseError("digit not below the base")
    return sympy.Integer(int(digits, base))

  def _extremum(self, name: str):
    r"""\max(3, 5), \min\{a, b\}: the largest / smallest of real numbers."""
    close = {"LP": "RP", "LS": "RS", "LG": "RG"}.get(self.peek().kind)
    if close is None:
      raise ParseError(f"{name} without arguments")
    self.next()
    v = self.items((close,))
    self.expect(close)
    args = v.items if isinstance(v, Seq) and v.kind == "list" else (v,)
    for a in args:
      if not (scalar(a).is_number and a.is_extended_real):
        raise ParseError(f"{name} of a non-real or symbolic value")
    return (sympy.Max if name == "max" else sympy.Min)(*args)

  def _identifier(self, name: str):
    if self.at("SUB"):
      self.next()
      if self.at("LG"):
        self.next()
        raw = []
        while not self.at("RG"):
          if self.at("END"):
            raise ParseError("unbalanced subscript")
          raw.append(self.next().raw or "?")
        self.next()
        sub = "".join(raw)
      else:
        sub = self.next().raw
      if not re.fullmatch(r"[A-Za-z0-9]{1,8}", sub or ""):
        raise ParseError("bad subscript")
      return sympy.Symbol(f"{name}_{sub}")
    if name == "i":
      return sympy.I
    if name == "e":
      return sympy.E
    return sympy.Symbol(name)

  def _bracketed(self, open_kind: str):
    """(a), (a, b), [a, b], (a, b], [a, b)."""
    v = self.items(("RP", "RB"))
    close = self.next().kind
    if close not in ("RP", "RB"):
      raise ParseError("unbalanced bracket")
    values = v.items if isinstance(v, Seq) and v.kind == "list" else (v,)
    if isinstance(v, Seq) and v.kind in ("or", "and"):
      raise ParseError("words inside brackets")
    if len(values) == 1:
      if open_kind == "LP" and close == "RP":
        return v
      raise ParseError("bracketed single value")
    if len(values) == 2 and (open_kind == "LP") != (close == "RP"):
      a, b = values
      return interval(a, b, open_kind == "LP", close == "RP")
    if open_kind == "LP" and close == "RP":
      return Seq("paren", tuple(values))
    if open_kind == "LB" and close == "RB":
      return Seq("bracket", tuple(values))
    raise ParseError("mismatched brackets")

  def _function(self, name: str):
    exponent = None
    base = None
    if self.at("SUB") and name in ("log", "ln"):
      self.next()
      base = self.arg()
    if self.at("OP", "^"):
      self.next()
      exponent = self.exponent()
    self.in_func += 1
    if self.at("LP"):
      self.next()
      a = self.arith()
      self.expect("RP")
    else:
      a = self.factor()
      while self.peek().kind in ("ID", "CONST"):
        a = mul(a, self.factor())
    self.in_func -= 1
    if exponent is not None and exponent == -1 and name in INVERSE:
      return apply_function(INVERSE[name], a)
    f = apply_function(name, a, base)
    return f if exponent is None else power(f, exponent)

  def _matrix(self, env: str):
    rows: list[list] = [[]]
    while True:
      rows[-1].append(scalar(self.arith()))
      tok = self.next()
      if tok.kind == "AMP":
        continue
      if tok.kind == "ROWSEP":
        if self.at("END"):  # a last row ending in \\
          tok = self.next()
          break
        rows.append([])
        continue
      if tok.kind == "END":
        break
      raise ParseError("bad matrix")
    if tok.val != env or len({len(r) for r in rows}) != 1:
      raise ParseError("ragged matrix")
    return sympy.ImmutableMatrix(rows)


def _check_depth(s: str) -> None:
  depth = 0
  for c in s:
    if c in "([{":
      depth += 1
      if depth > MAX_DEPTH:
        raise ParseError("nested too deep")
    elif c in ")]}":
      depth -= 1


_CHOICE = re.compile(r"\(?([A-E])\)?")
_TEXT_WRAP = re.compile(
  r"\\(?:text|textnormal|textrm|textbf|textit|textup|textsf|mbox|mathrm)(?![A-Za-z])\s*"
)


def normalize_text(s: str) -> str:
  r"""Lower case, no \text wrappers, braces, dollars, spacing or trailing period."""
  s = _TEXT_WRAP.sub("", s)
  s = re.sub(r"\\[,;:! ]|\\q?quad|~|\$|[{}\s]", "", s)
  return s.lower().rstrip(".")


def _as_text(s: str) -> str | None:
  """Normalized words when the answer is text rather than math (e.g. Monday, east, yes)."""
  plain = _TEXT_WRAP.sub("", s)
  plain = re.sub(r"[{}$]", "", plain).strip()
  if not re.fullmatch(r"[A-Za-z][A-Za-z .,'\-]*", plain):
    return None
  words = re.findall(r"[A-Za-z]+", plain)
  known = set(FUNC_NAMES) | set(CONST_WORDS) | {"or", "and", "sqrt"}
  if any(len(w) >= 2 and w not in known for w in words):
    return normalize_text(plain)
  return None


def parse(s: str, thousands: bool = True) -> Parsed:
  """Parse one answer; raises ParseError when it is unsupported or too large to handle safely."""
  s = re.sub(r"(?<!\.)\.\s*$", "", s.strip())  # a sentence-ending period
  if len(s) > MAX_CHARS:
    raise ParseError("answer too long")
  _check_depth(s)
  bare = re.sub(r"\\[,;:! ]|\\q?quad|~|\$|[{}\s]", "", _TEXT_WRAP.sub("", s)).rstrip(".")
  m = _CHOICE.fullmatch(bare)
  if m:
    return Parsed(Choice(m.group(1)))
  text = _as_text(s)
  if text is not None:
    return Parsed(Text(text))
  toks = tokenize(s, thousands)
  parser = _Parser(toks)
  value = parser.top()
  _check_finite(value)
  kinds = [t.kind for t in toks]
  digits = None
  if kinds in (["NUM", "SUB", "NUM"], ["NUM", "SUB", "LG", "NUM", "RG"]):
    digits = sympy.Integer(int(toks[0].raw))  # 101_2 also reads as the digit string 101
  units = set(parser.units) | ({"dollar"} if _CURRENCY.search(s) else set())
  return Parsed(value, parser.percent, parser.degree, digits, frozenset(units))


def _check_finite(v) -> None:
  if isinstance(v, Seq):
    for x in v.items:
      _check_finite(x)
  elif isinstance(v, Rel):
    for x in v.parts:
      _check_finite(x)
  elif isinstance(v, sympy.Basic) and v.has(sympy.zoo, sympy.nan, sympy.AccumBounds):
    raise ParseError("undefined value")
