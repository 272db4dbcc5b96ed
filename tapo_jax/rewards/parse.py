r"""Safe parsing of final answers (a LaTeX / plain-math subset) into sympy objects.

A hand-written tokenizer and recursive-descent parser build sympy objects directly from screened
inputs: model text never reaches eval, exec, sympify or any sympy string parser. Exponents,
factorials, roots, number lengths and nesting depth are bounded before sympy touches them, so no
input can make sympy run long or allocate much here (the worker pool adds a hard timeout anyway).

Values returned by `parse`:
  sympy.Expr         a scalar (numbers exact: 0.25 is Rational(1, 4))
  Rel                a relation chain, e.g. x = 5, 1 < x <= 3, 2 + 3 = 5
  Seq                a comma list, a tuple, a set, the two branches of a \pm
  sympy.Set          an interval, a union of intervals, the empty set, the reals
  sympy.MatrixBase   a pmatrix / bmatrix
  Text, Choice       words, and a multiple-choice letter
"""

import dataclasses
import re

import sympy

MAX_CHARS = 1000  # longer answers are not parsed
MAX_DEPTH = 40  # bracket nesting
MAX_DIGITS = 400  # digits in one number literal
MAX_EXPONENT = 1000  # |exponent| of a power of a symbol or of a scientific-notation literal
MAX_BITS = 100_000  # bits of a rational produced by a power
MAX_SMALL_EXPONENT = 64  # |exponent| of a power of a sum (its expansion grows fast)
MAX_FACTORIAL = 1000
MAX_BINOM = 10_000
MAX_ROOT = 1000  # index of a root, denominator of a rational exponent


class ParseError(ValueError):
  """The text is not in the supported subset (or is too large to handle safely)."""


@dataclasses.dataclass(frozen=True)
class Rel:
  """A relation chain parts[0] ops[0] parts[1] ...; ops are '=', '<', '<=', '>', '>=', '!=', '~'."""

  parts: tuple
  ops: tuple


@dataclasses.dataclass(frozen=True)
class Seq:
  """Several values: kind is list | or | and (bare separators), paren | bracket, set, pm."""

  kind: str
  items: tuple


@dataclasses.dataclass(frozen=True)
class Text:
  """A non-mathematical answer, normalized (lower case, no spaces)."""

  text: str


@dataclasses.dataclass(frozen=True)
class Choice:
  """A multiple-choice letter."""

  letter: str


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A parsed answer and whether it carried a percent sign or a degree mark."""

  value: object
  percent: bool = False
  degree: bool = False


@dataclasses.dataclass
class _Tok:
  kind: str
  val: object = None
  raw: str = ""
  unit: bool = False  # a letter in \text{}: dropped like a unit word at the end of an item


_END = _Tok("END")
PM = sympy.Symbol("_pm_")  # the sign of a \pm; substituted by +1 and -1 at the item level

_FUNC_NAMES = ("arcsin arccos arctan sinh cosh tanh sin cos tan cot sec csc log ln exp det").split()
_CONST_WORDS = {"pi": sympy.pi, "infty": sympy.oo, "infinity": sympy.oo, "inf": sympy.oo}
_UNIT_WORDS = set(
  (
    "cm mm km kg mg ml mL ft in inch inches feet foot yd yard yards meter meters metre metres "
    "mile miles mph kph hour hours hr hrs minute minutes min mins second seconds sec secs day "
    "days week weeks year years month months dollar dollars cent cents unit units sq square "
    "cubic degree degrees percent gram grams liter liters litre litres people students ways "
    "times points pounds lbs oz ounces gallons cups pages boxes marbles apples"
  ).split()
)
_GREEK = set(
  (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi "
    "Psi Omega"
  ).split()
)
_SPACE_CMDS = set(
  (
    "left right big Big bigg Bigg bigl bigr Bigl Bigr biggl biggr Biggl Biggr displaystyle "
    "textstyle limits quad qquad , ; : ! > boxed fbox mathbf bm boldsymbol mathit mathnormal "
    "vphantom phantom"
  ).split()
)
_TEXT_CMDS = set(
  "text textnormal textrm textbf textit textup textsf texttt mbox mathrm mathsf "
  "operatorname".split()
)


def _same(names: str, kind: str, val=None) -> dict:
  return dict.fromkeys(names.split(), (kind, val))


_SIMPLE_CMDS = {  # \name -> token (kind, value)
  **_same("frac dfrac tfrac cfrac", "FRAC"),
  **_same("binom dbinom tbinom", "BINOM"),
  "sqrt": ("SQRT", None),
  "pi": ("CONST", sympy.pi),
  **_same("infty infin", "CONST", sympy.oo),
  **_same("emptyset varnothing", "SETCONST", sympy.S.EmptySet),
  **_same("cdot times ast", "OP", "*"),
  "div": ("OP", "/"),
  "pm": ("OP", "pm"),
  "mp": ("OP", "mp"),
  **_same("le leq leqslant", "REL", "<="),
  **_same("ge geq geqslant", "REL", ">="),
  "lt": ("REL", "<"),
  "gt": ("REL", ">"),
  **_same("ne neq", "REL", "!="),
  "approx": ("REL", "~"),
  "cup": ("SETOP", "cup"),
  "cap": ("SETOP", "cap"),
  "setminus": ("SETOP", "minus"),
  "in": ("IN", None),
  "circ": ("CIRC", None),
  "degree": ("DEG", None),
  "%": ("PCT", None),
  **_same("{ lbrace", "LS"),
  **_same("} rbrace", "RS"),
  "langle": ("LP", None),
  "rangle": ("RP", None),
  **_same("lvert rvert vert mid", "BAR"),
  **_same("lfloor", "LFLOOR"),
  **_same("rfloor", "RFLOOR"),
  **_same("lceil", "LCEIL"),
  **_same("rceil", "RCEIL"),
  "\\": ("ROWSEP", None),
  **_same("$ ( ) [ ]", "SKIP"),  # \$ (currency), \( \) \[ \] (math delimiters)
  " ": ("SKIP", None),
}
_SINGLE = {  # plain characters -> token
  **{c: ("OP", c) for c in "+-*/^"},
  **{c: ("REL", c) for c in "=<>"},
  **_same(", ;", "COMMA"),
  "_": ("SUB", None),
  "!": ("FACT", None),
  "%": ("PCT", None),
  "|": ("BAR", None),
  "(": ("LP", None),
  ")": ("RP", None),
  "[": ("LB", None),
  "]": ("RB", None),
  "{": ("LG", None),
  "}": ("RG", None),
  "&": ("AMP", None),
}
_UNICODE = {
  "−": "-",
  "–": "-",
  "×": r"\times ",
  "·": r"\cdot ",
  "÷": r"\div ",
  "π": r"\pi ",
  "√": r"\sqrt ",
  "∞": r"\infty ",
  "≤": r"\le ",
  "≥": r"\ge ",
  "≠": r"\ne ",
  "≈": r"\approx ",
  "°": r"^\circ ",
  "∪": r"\cup ",
  "∩": r"\cap ",
  "±": r"\pm ",
  "∓": r"\mp ",
  "∅": r"\emptyset ",
  "\u2009": " ",
  "\u00a0": " ",
}
_MATRIX_ENVS = {"pmatrix", "bmatrix", "Bmatrix", "matrix", "smallmatrix", "array"}
_NUM_SEPS = (",\\!", "{,}", "\\,", "\\!", "\\ ", "~", ",")  # thousands separators


def _read_group(s: str, i: int) -> tuple[str, int]:
  """The raw text of the brace group starting at s[i] == '{' and the index past it."""
  depth = 0
  for j in range(i, len(s)):
    if s[j] == "{":
      depth += 1
    elif s[j] == "}":
      depth -= 1
      if depth == 0:
        return s[i + 1 : j], j + 1
  raise ParseError("unbalanced braces")


def _lex_number(s: str, i: int, thousands: bool) -> tuple[_Tok, int]:
  """A number literal at s[i]: digit groups with separators, decimals, scientific notation."""
  j = i
  while j < len(s) and s[j].isdigit():
    j += 1
  int_part = s[i:j]
  if thousands and 1 <= len(int_part) <= 3:
    while True:
      for sep in _NUM_SEPS:
        k = j + len(sep)
        if (
          s.startswith(sep, j)
          and s[k : k + 3].isdigit()
          and len(s[k : k + 3]) == 3
          and not s[k + 3 : k + 4].isdigit()
        ):
          int_part += s[k : k + 3]
          j = k + 3
          break
      else:
        break
  frac = ""
  if s.startswith(".", j) and s[j + 1 : j + 2].isdigit():
    k = j + 1
    while k < len(s) and s[k].isdigit():
      k += 1
    frac, j = s[j + 1 : k], k
  elif s.startswith(".", j) and int_part and not s[j + 1 : j + 2].isdigit():
    j += 1  # "204." and a sentence-ending period
  m = re.match(r"\\(?:overline|bar|dot)\s*\{(\d{1,50})\}", s[j : j + 70])
  if m and s[j - 1 : j] in ".0123456789" and "." in s[i:j]:  # 0.\overline{3} = 1/3
    rep = m.group(1)
    j += m.end()
    whole = int(int_part + frac + rep) - int(int_part + frac or "0")
    value = sympy.Rational(whole, 10 ** len(frac) * (10 ** len(rep) - 1))
    return _Tok("NUM", value, "."), j
  exp = 0
  is_int = not frac
  m = re.match(r"[eE]([+-]?)(\d{1,6})(?![A-Za-z0-9])", s[j : j + 8])
  if m and int_part + frac:
    exp = int(m.group(2)) * (-1 if m.group(1) == "-" else 1)
    if abs(exp) > MAX_EXPONENT:
      raise ParseError("exponent too large")
    j += m.end()
    is_int = False
  if len(int_part + frac) > MAX_DIGITS:
    raise ParseError("number too long")
  value = sympy.Rational(int(int_part + frac or "0"), 10 ** len(frac)) * sympy.Integer(10) ** exp
  return _Tok("NUM", value, s[i:j] if is_int else "."), j


def _text_tokens(cmd: str, content: str, thousands: bool) -> list[_Tok]:
  r"""Tokens for \text{...}-like content: a separator, a unit, or math written in text."""
  c = content.strip()
  low = c.lower().strip(" ,")
  if not c.strip("."):
    return []
  if low in ("or", "and"):
    return [_Tok("SEP", low)]
  if cmd == "operatorname":
    return [_Tok("FUNC", c)] if c in _FUNC_NAMES else [_Tok("WORD", c)]
  if re.fullmatch(r"[A-Za-z]", c) and c not in "ie":  # \text{m}: a unit after a number
    return [_Tok("ID", c, c, unit=True)]
  if re.fullmatch(r"[A-Za-z]", c) or not re.search(r"[A-Za-z]{2}", c):
    return tokenize(c, thousands)
  return [_Tok("UNIT", low)]


def _letter_tokens(run: str) -> list[_Tok]:
  """Tokens for a run of plain letters: function names, constants, units, or single letters."""
  if run in _CONST_WORDS:
    return [_Tok("CONST", _CONST_WORDS[run], run)]
  if run in ("or", "and"):
    return [_Tok("SEP", run)]
  if run in _UNIT_WORDS:
    return [_Tok("UNIT", run)]
  if run == "sqrt":
    return [_Tok("SQRT")]
  for name in _FUNC_NAMES:
    if run.startswith(name):
      return [_Tok("FUNC", name)] + (_letter_tokens(run[len(name) :]) if run != name else [])
  if run.startswith("pi"):
    return [_Tok("CONST", sympy.pi, "pi")] + _letter_tokens(run[2:])
  if len(run) >= 3:
    return [_Tok("WORD", run)]
  return [_Tok("ID", c, c) for c in run]


def tokenize(s: str, thousands: bool = True) -> list[_Tok]:
  """Tokens of a LaTeX / plain-math answer; raises ParseError on anything unsupported."""
  for k, v in _UNICODE.items():
    s = s.replace(k, v)
  out: list[_Tok] = []
  i, n = 0, len(s)
  while i < n:
    c = s[i]
    if c.isspace() or c in "$~":
      i += 1
    elif c.isdigit() or (c == "." and s[i + 1 : i + 2].isdigit()):
      tok, i = _lex_number(s, i, thousands)
      out.append(tok)
    elif c.isalpha() and c.isascii():
      j = i
      while j < n and s[j].isascii() and s[j].isalpha():
        j += 1
      out.extend(_letter_tokens(s[i:j]))
      i = j
    elif c == "\\":
      m = re.match(r"\\([A-Za-z]+|.)", s[i : i + 40])
      if not m:
        raise ParseError("dangling backslash")
      name = m.group(1)
      i += m.end()
      if name in _SPACE_CMDS:
        if name in ("left", "right") and s.startswith(".", i):
          i += 1
        if name in ("vphantom", "phantom") and s.startswith("{", i):
          _, i = _read_group(s, i)
      elif name in _TEXT_CMDS:
        while i < n and s[i] == " ":
          i += 1
        if s.startswith("{", i):
          content, i = _read_group(s, i)
        else:
          m2 = re.match(r"[A-Za-z]", s[i : i + 1])
          if not m2:
            raise ParseError("bad text command")
          content, i = s[i], i + 1
        out.extend(_text_tokens(name, content, thousands))
      elif name in ("begin", "end"):
        if not s.startswith("{", i):
          raise ParseError("bad environment")
        env, i = _read_group(s, i)
        if env not in _MATRIX_ENVS:
          raise ParseError(f"unsupported environment {env}")
        if name == "begin" and env == "array" and s.startswith("{", i):
          _, i = _read_group(s, i)
        out.append(_Tok(name.upper(), env))
      elif name == "mathbb":
        content, i = _read_group(s, i) if s.startswith("{", i) else (s[i : i + 1], i + 1)
        if content.strip() != "R":
          raise ParseError("unsupported number set")
        out.append(_Tok("SETCONST", sympy.S.Reals))
      elif name in _SIMPLE_CMDS:
        kind, val = _SIMPLE_CMDS[name]
        if kind != "SKIP":
          out.append(_Tok(kind, val, "\\" + name))
      elif name in _FUNC_NAMES or name in ("arcsec", "arccsc", "arccot"):
        out.append(_Tok("FUNC", name))
      elif name in _GREEK:
        out.append(_Tok("ID", name, name))
      else:
        raise ParseError(f"unsupported command \\{name}")
    elif c in _SINGLE:
      kind, val = _SINGLE[c]
      if c == "*" and s.startswith("**", i):
        kind, val, i = "OP", "^", i + 1
      out.append(_Tok(kind, val, c))
      i += 1
    elif c == "'":
      raise ParseError("prime")
    else:
      raise ParseError(f"unsupported character {c!r}")
  return out


# ---------------------------------------------------------------------------------------------
# Screened constructors: every sympy number above comes from here or from exact literals.


def _scalar(v) -> sympy.Expr:
  if isinstance(v, sympy.MatrixBase) or not isinstance(v, sympy.Expr):
    raise ParseError("expected a scalar")
  return v


def _bits(r: sympy.Rational) -> int:
  return max(int(r.p).bit_length(), int(r.q).bit_length(), 1)


def _pow(b, e):
  """b ** e, refusing anything whose size or expansion could blow up."""
  b, e = _scalar(b), _scalar(e)
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
  return sympy.Pow(b, e)


def _factorial(n):
  n = _scalar(n)
  if not (n.is_Integer and 0 <= n <= MAX_FACTORIAL):
    raise ParseError("factorial argument out of range")
  return sympy.factorial(n)


def _binomial(n, k):
  n, k = _scalar(n), _scalar(k)
  if not (n.is_Integer and k.is_Integer and 0 <= n <= MAX_BINOM):
    raise ParseError("binomial argument out of range")
  return sympy.binomial(n, k)


def _root(x, n):
  x, n = _scalar(x), _scalar(n)
  if not (n.is_Integer and 2 <= n <= MAX_ROOT):
    raise ParseError("bad root index")
  if x.is_Rational and x < 0 and n % 2 == 1:
    return -_pow(-x, sympy.Rational(1, int(n)))
  return _pow(x, sympy.Rational(1, int(n)))


def _mul(a, b):
  if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
    if a.shape[1] != b.shape[0]:
      raise ParseError("matrix shapes")
    return sympy.ImmutableMatrix(a * b)
  if isinstance(a, sympy.MatrixBase) or isinstance(b, sympy.MatrixBase):
    _scalar(b if isinstance(a, sympy.MatrixBase) else a)
    return sympy.ImmutableMatrix(a * b)
  return sympy.Mul(_scalar(a), _scalar(b))


def _div(a, b):
  b = _scalar(b)
  if b == 0:
    raise ParseError("division by zero")
  if isinstance(a, sympy.MatrixBase):
    return sympy.ImmutableMatrix(a / b)
  return sympy.Mul(_scalar(a), _pow(b, sympy.Integer(-1)))


def _add(a, b):
  if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
    if a.shape != b.shape:
      raise ParseError("matrix shapes")
    return sympy.ImmutableMatrix(a + b)
  return sympy.Add(_scalar(a), _scalar(b))


def _apply(name: str, arg, base=None):
  arg = _scalar(arg)
  if name in ("log", "ln"):
    if arg == 0:
      raise ParseError("log of zero")
    if base is not None:
      base = _scalar(base)
      if base in (0, 1):
        raise ParseError("bad log base")
      return sympy.log(arg, base)
    return sympy.log(arg) if name == "ln" else sympy.log(arg, 10)
  if name == "exp":
    return _pow(sympy.E, arg)
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


_INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan", "sec": "arcsec", "csc": "arccsc"}


def _interval(a, b, left_open: bool, right_open: bool) -> sympy.Set:
  """An interval written as (a, b], [a, b) ...; reversed, empty or non-real ones are refused."""
  a, b = _scalar(a), _scalar(b)
  if a.is_extended_real is False or b.is_extended_real is False or (b - a).is_nonpositive:
    raise ParseError("not an interval")
  try:
    return sympy.Interval(a, b, left_open, right_open)
  except (ValueError, TypeError) as e:
    raise ParseError("not an interval") from e


def to_set(v) -> sympy.Set:
  """The set a value denotes: intervals, unions, inequalities in one variable, {a, b}."""
  if isinstance(v, sympy.Set):
    return v
  if isinstance(v, Seq):
    if v.kind in ("paren", "bracket") and len(v.items) == 2:
      a, b = v.items
      return _interval(a, b, v.kind == "paren", v.kind == "paren")
    if v.kind == "set":
      return sympy.FiniteSet(*(_scalar(x) for x in v.items))
    if v.kind in ("or", "list", "and") and all(isinstance(x, Rel) for x in v.items):
      sets = [to_set(x) for x in v.items]
      return sympy.Intersection(*sets) if v.kind == "and" else sympy.Union(*sets)
  if isinstance(v, Rel):
    return _rel_to_set(v)
  raise ParseError("not a set")


def _rel_to_set(rel: Rel) -> sympy.Set:
  """The solution set of a chain of linear inequalities in one variable."""
  symbols = set().union(*(p.free_symbols for p in rel.parts if isinstance(p, sympy.Expr)))
  if len(symbols) != 1 or "=" in rel.ops or "~" in rel.ops:
    raise ParseError("not an inequality in one variable")
  (x,) = symbols
  lo, lo_open, hi, hi_open = -sympy.oo, True, sympy.oo, True
  holes = []
  for lhs, op, rhs in zip(rel.parts[:-1], rel.ops, rel.parts[1:], strict=True):
    d = sympy.expand(_scalar(lhs) - _scalar(rhs))  # d op 0
    a, b = d.coeff(x, 1), d.coeff(x, 0)
    if not (a.is_number and b.is_number and a.is_real and b.is_real and a != 0):
      raise ParseError("only linear inequalities")
    if sympy.expand(a * x + b - d) != 0:
      raise ParseError("only linear inequalities")
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
  return result


def _set_op(op: str, a, b) -> sympy.Set:
  a, b = to_set(a), to_set(b)
  if op == "cup":
    return sympy.Union(a, b)
  if op == "cap":
    return sympy.Intersection(a, b)
  return sympy.Complement(a, b)


def _subs_pm(v, sign: int):
  if isinstance(v, Rel):
    return Rel(tuple(_subs_pm(p, sign) for p in v.parts), v.ops)
  if isinstance(v, Seq):
    return Seq(v.kind, tuple(_subs_pm(p, sign) for p in v.items))
  return v.subs(PM, sign)


def _has_pm(v) -> bool:
  if isinstance(v, Rel):
    return any(_has_pm(p) for p in v.parts)
  if isinstance(v, Seq):
    return any(_has_pm(p) for p in v.items)
  return isinstance(v, sympy.Basic) and not isinstance(v, sympy.Set) and v.has(PM)


# ---------------------------------------------------------------------------------------------


class _Parser:
  """Recursive descent over the token list; one instance per parse."""

  def __init__(self, toks: list[_Tok]):
    self.toks = toks
    self.i = 0
    self.percent = False
    self.degree = False
    self.in_func = 0
    self.in_abs = 0

  def peek(self, k: int = 0) -> _Tok:
    j = self.i + k
    return self.toks[j] if j < len(self.toks) else _END

  def next(self) -> _Tok:
    tok = self.peek()
    self.i += 1
    return tok

  def at(self, kind: str, val=None, k: int = 0) -> bool:
    tok = self.peek(k)
    return tok.kind == kind and (val is None or tok.val == val)

  def expect(self, kind: str) -> _Tok:
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
      v = _set_op(op, v, self.relation())
    if _has_pm(v):
      return Seq("pm", (_subs_pm(v, 1), _subs_pm(v, -1)))
    return v

  def relation(self):
    parts, ops = [self.arith()], []
    while self.at("REL"):
      ops.append(self.next().val)
      parts.append(self.arith())
    if not ops:
      return parts[0]
    if any(op != "=" for op in ops):
      for p in parts:
        _scalar(p)
    return Rel(tuple(parts), tuple(ops))

  def arith(self):
    v = self.term()
    while self.at("OP") and self.peek().val in ("+", "-", "pm", "mp"):
      op = self.next().val
      w = self.term()
      if op == "-":
        w = _mul(sympy.Integer(-1), w)
      elif op in ("pm", "mp"):
        w = _mul(PM if op == "pm" else -PM, w)
      v = _add(v, w)
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
        v = _mul(v, self.unary())
      elif self.at("OP", "/"):
        self.next()
        v = _div(v, self.unary())
      elif self._implicit_start():
        v = _mul(v, self.power())
      else:
        return v

  def unary(self):
    if self.at("OP", "-"):
      self.next()
      return _mul(sympy.Integer(-1), self.unary())
    if self.at("OP", "+"):
      self.next()
      return self.unary()
    if self.at("OP", "pm") or self.at("OP", "mp"):
      sign = PM if self.next().val == "pm" else -PM
      return _mul(sign, self.unary())
    return self.power()

  def _degree_mark(self) -> int:
    """Tokens taken by a ^\\circ or ^{\\circ} at the cursor (0 if none)."""
    if self.at("OP", "^") and self.at("CIRC", k=1):
      return 2
    if self.at("OP", "^") and self.at("LG", k=1) and self.at("CIRC", k=2) and self.at("RG", k=3):
      return 4
    return 0

  def power(self):
    v = self.primary()
    while True:
      if self.at("FACT"):
        self.next()
        v = _factorial(v)
      elif self._degree_mark() or self.at("DEG"):
        self.i += self._degree_mark() or 1
        v = self._mark_degree(v)
      elif self.at("OP", "^"):
        self.next()
        v = _pow(v, self.exponent())
      elif self.at("PCT"):
        self.next()
        self.percent = True
        v = _div(v, sympy.Integer(100))
      elif (self.at("UNIT") or self.peek().unit) and self._unit_ends_item():
        unit = self.next().val
        if self.at("OP", "^"):  # cm^2
          self.next()
          self.exponent()
        if unit == "percent":
          self.percent = True
          v = _div(v, sympy.Integer(100))
        elif unit in ("degree", "degrees"):
          v = self._mark_degree(v)
      else:
        return v

  def _mark_degree(self, v):
    if self.in_func:  # \sin 30^\circ: radians inside a function
      return _mul(v, sympy.pi / 180)
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
      return _mul(sympy.Integer(-1), self.exponent())
    return self.power()

  def arg(self):
    r"""One argument of \frac, \sqrt, \binom: a brace group or a single character/token."""
    if self.at("LG"):
      self.next()
      v = self.arith()
      self.expect("RG")
      return v
    tok = self.peek()
    if tok.kind == "NUM" and tok.raw.isdigit() and len(tok.raw) > 1:  # \frac94
      self.toks[self.i] = _Tok("NUM", sympy.Integer(int(tok.raw[1:])), tok.raw[1:])
      return sympy.Integer(int(tok.raw[0]))
    return self.primary()

  def primary(self):
    tok = self.next()
    kind = tok.kind
    if kind == "NUM":
      if tok.raw.isdigit() and self.at("FRAC"):
        return self._mixed_number(tok.val)
      return tok.val
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
      return _div(a, self.arg())
    if kind == "SQRT":
      if self.at("LB"):
        self.next()
        n = self.arith()
        self.expect("RB")
        return _root(self.arg(), n)
      return _root(self.arg(), sympy.Integer(2))
    if kind == "BINOM":
      n = self.arg()
      return _binomial(n, self.arg())
    if kind == "FUNC":
      return self._function(tok.val)
    if kind == "BAR":
      self.in_abs += 1
      v = self.arith()
      self.expect("BAR")
      self.in_abs -= 1
      return sympy.Abs(_scalar(v))
    if kind in ("LFLOOR", "LCEIL"):
      v = self.arith()
      self.expect("RFLOOR" if kind == "LFLOOR" else "RCEIL")
      return (sympy.floor if kind == "LFLOOR" else sympy.ceiling)(_scalar(v))
    if kind == "BEGIN":
      return self._matrix(tok.val)
    raise ParseError(f"unexpected {kind}")

  def _mixed_number(self, whole):
    r"""3\frac12 is 7/2 when the fraction is proper and made of integer literals."""
    self.next()  # FRAC
    num, den = self.arg(), self.arg()
    if not (num.is_Integer and den.is_Integer):
      return _mul(whole, _div(num, den))  # 2\frac{\pi}{3}
    if 0 < num < den:
      return whole + num / den
    raise ParseError("improper mixed number")

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
      return _interval(a, b, open_kind == "LP", close == "RP")
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
      a = self.power()
      while self.peek().kind in ("ID", "CONST"):
        a = _mul(a, self.power())
    self.in_func -= 1
    if exponent is not None and exponent == -1 and name in _INVERSE:
      return _apply(_INVERSE[name], a)
    f = _apply(name, a, base)
    return f if exponent is None else _pow(f, exponent)

  def _matrix(self, env: str):
    rows: list[list] = [[]]
    while True:
      rows[-1].append(_scalar(self.arith()))
      tok = self.next()
      if tok.kind == "AMP":
        continue
      if tok.kind == "ROWSEP":
        if self.at("END"):
          self.next()
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
  known = set(_FUNC_NAMES) | set(_CONST_WORDS) | {"or", "and", "sqrt"}
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
  parser = _Parser(tokenize(s, thousands))
  value = parser.top()
  _check_finite(value)
  return Parsed(value, parser.percent, parser.degree)


def _check_finite(v) -> None:
  if isinstance(v, Seq):
    for x in v.items:
      _check_finite(x)
  elif isinstance(v, Rel):
    for x in v.parts:
      _check_finite(x)
  elif isinstance(v, sympy.Basic) and v.has(sympy.zoo, sympy.nan, sympy.AccumBounds):
    raise ParseError("undefined value")
