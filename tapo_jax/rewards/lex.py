r"""Tokens of a final answer (LaTeX or plain math); anything outside the subset is refused.

Numbers are read exactly (digit groups with thousands separators, decimals, repeating decimals,
scientific notation) and bounded in length; `\text{}` content becomes a separator (or / and), a
unit, or math; runs of letters become function names, constants, units or single letters.

Thousands separators: after a first group of 1-3 digits, each further group of exactly three
digits may follow `,` `{,}` `,\!` (commas only where a comma is not a list separator, see
`thousands`) or a space: ` `, `\,` `\;` `\:` `\!` `\ ` `~` (spaces may follow any of them:
`11,\! 111`). `1 000` is 1000, `1 2` and `1, 000` are not numbers.
ASCII relations `>=` `<=` `!=` are single tokens (`5!=120` after a digit or `)` stays 5! = 120).
"""

import dataclasses
import re

import sympy

MAX_DIGITS = 400  # digits in one number literal
MAX_EXPONENT = 1000  # |exponent| of a scientific-notation literal (and of a power of a symbol)


class ParseError(ValueError):
  """The text is not in the supported subset (or is too large to handle safely)."""


@dataclasses.dataclass
class Token:
  """One token: its kind (NUM, ID, OP, REL, FRAC, ...), value and raw text."""

  kind: str
  val: object = None
  raw: str = ""
  unit: bool = False  # a letter in \text{}: dropped like a unit word at the end of an item


END = Token("END")

FUNC_NAMES = ("arcsin arccos arctan sinh cosh tanh sin cos tan cot sec csc log ln exp det").split()
EXTREMA = ("max", "min")  # \max / \min of numbers; plain max( / min( only before a bracket
CONST_WORDS = {"pi": sympy.pi, "infty": sympy.oo, "infinity": sympy.oo, "inf": sympy.oo}
_UNIT_WORDS = set(
  (
    "cm mm km kg mg ml mL ft in inch inches feet foot yd yard yards meter meters metre metres "
    "mile miles mph kph hour hours hr hrs minute minutes min mins second seconds sec secs day "
    "days week weeks year years month months dollar dollars cent cents unit units sq square "
    "cubic degree degrees percent gram grams liter liters litre litres people students ways "
    "times points pounds lbs oz ounces gallons cups pages boxes marbles apples pct percentage "
    "hundred thousand million billion trillion"  # scale words: units.units_agree
  ).split()
)
PERCENT_WORDS = ("percent", "pct", "percentage", "percents", "percentages", "percentpoints")
# Words that make a trailing text a qualifier rather than a unit: 5 \text{ or more} is not 5.
_QUALIFIERS = set(
  (
    "or and more less fewer than least most at about approximately approx around roughly nearly "
    "almost over under above below up to not no greater smaller larger bigger higher lower "
    "exceeding exceeds plus minus between from either nor only maximum minimum max min if when "
    "unless except"
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
  "angle": ("ANGLE", None),
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
  ":": ("COLON", None),  # a ratio A:B (\: is a space)
  "'": ("PRIME", None),  # only in a function name: f'(x)
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
  "∠": r"\angle ",
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
_COMMA_SEP = re.compile(r"(?:,\\!|\{,\}|,(?=\d))[ \t]*")  # ,\! {,} and a bare comma before a digit
_SPACE_SEP = re.compile(r"(?:\\[,;:! ]|~|[ \t])+")


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


def _lex_number(s: str, i: int, thousands: bool) -> tuple[Token, int]:
  """A number literal at s[i]: digit groups with separators, decimals, scientific notation."""
  j = i
  while j < len(s) and s[j].isdigit():
    j += 1
  int_part = s[i:j]
  if 1 <= len(int_part) <= 3 and int_part[0] != "0":  # 0,500 is not five hundred
    while True:
      m = (thousands and _COMMA_SEP.match(s, j)) or _SPACE_SEP.match(s, j)
      k = m.end() if m else j
      group = s[k : k + 3]
      if not (m and len(group) == 3 and group.isdigit() and not s[k + 3 : k + 4].isdigit()):
        break
      int_part += group
      j = k + 3
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
    return Token("NUM", value, s[i:j]), j
  exp = 0
  m = re.match(r"[eE]([+-]?)(\d{1,6})(?![A-Za-z0-9])", s[j : j + 8])
  if m and int_part + frac:
    exp = int(m.group(2)) * (-1 if m.group(1) == "-" else 1)
    if abs(exp) > MAX_EXPONENT:
      raise ParseError("exponent too large")
    j += m.end()
  if len(int_part + frac) > MAX_DIGITS:
    raise ParseError("number too long")
  value = sympy.Rational(int(int_part + frac or "0"), 10 ** len(frac)) * sympy.Integer(10) ** exp
  return Token("NUM", value, s[i:j]), j  # raw: the literal's text, digits only for 204 or 1000


def _text_tokens(cmd: str, content: str, thousands: bool) -> list[Token]:
  r"""Tokens for \text{...}-like content: a separator, a unit, or math written in text."""
  c = content.strip()
  low = c.lower().strip(" ,")
  if not c.strip("."):
    return []
  if low in ("or", "and"):
    return [Token("SEP", low)]
  if cmd == "operatorname":
    return [Token("FUNC", c)] if c in FUNC_NAMES or c in EXTREMA else [Token("WORD", c)]
  if re.fullmatch(r"[A-Za-z]", c) and c not in "ie":  # \text{m}: a unit after a number
    return [Token("ID", c, c, unit=True)]
  if re.fullmatch(r"[A-Za-z]", c) or not re.search(r"[A-Za-z]{2}", c):
    return tokenize(c, thousands)
  m = re.fullmatch(r"([0-9][0-9.,]*)\s*([A-Za-z][A-Za-z .\-]*)", c)  # \text{5 apples}
  if m and re.search(r"[A-Za-z]{2}", m.group(2)):
    return tokenize(m.group(1), thousands) + [_unit_token(m.group(2))]
  return [_unit_token(c)]


def _unit_token(words: str) -> Token:
  """A unit written in words; a qualifier (or more, at least, about) makes it no answer."""
  low = words.lower().strip(" .,")
  if any(w in _QUALIFIERS for w in re.findall(r"[a-z]+", low)):
    raise ParseError(f"qualified value: {low}")
  if low.replace(" ", "") in PERCENT_WORDS:
    return Token("UNIT", "percent")
  return Token("UNIT", low)


def _letter_tokens(run: str) -> list[Token]:
  """Tokens for a run of plain letters: function names, constants, units, or single letters."""
  if run in CONST_WORDS:
    return [Token("CONST", CONST_WORDS[run], run)]
  if run in ("or", "and"):
    return [Token("SEP", run)]
  if run in _UNIT_WORDS:
    return [Token("UNIT", "percent" if run in PERCENT_WORDS else run)]
  if run == "sqrt":
    return [Token("SQRT")]
  for name in FUNC_NAMES:
    if run.startswith(name):
      return [Token("FUNC", name)] + (_letter_tokens(run[len(name) :]) if run != name else [])
  if run.startswith("pi"):
    return [Token("CONST", sympy.pi, "pi")] + _letter_tokens(run[2:])
  if len(run) >= 3:
    return [Token("WORD", run)]
  return [Token("ID", c, c) for c in run]


def _after_operand(s: str, i: int) -> bool:
  """Whether s[i] follows a digit or ')': there 5!=120 is 5! = 120, not 5 != 120."""
  return i > 0 and s[i - 1] in "0123456789)"


def tokenize(s: str, thousands: bool = True) -> list[Token]:
  """Tokens of a LaTeX / plain-math answer; raises ParseError on anything unsupported."""
  for k, v in _UNICODE.items():
    s = s.replace(k, v)
  out: list[Token] = []
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
      run = s[i:j]
      if run in EXTREMA and s[j : j + 8].lstrip().startswith(("(", "\\{", "\\left", "\\lbrace")):
        out.append(Token("FUNC", run))  # min( is a function, 5 min a unit
      else:
        out.extend(_letter_tokens(run))
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
        out.append(Token(name.upper(), env))
      elif name == "mathbb":
        content, i = _read_group(s, i) if s.startswith("{", i) else (s[i : i + 1], i + 1)
        if content.strip() != "R":
          raise ParseError("unsupported number set")
        out.append(Token("SETCONST", sympy.S.Reals))
      elif name in _SIMPLE_CMDS:
        kind, val = _SIMPLE_CMDS[name]
        if kind != "SKIP":
          out.append(Token(kind, val, "\\" + name))
      elif name in FUNC_NAMES or name in EXTREMA or name in ("arcsec", "arccsc", "arccot"):
        out.append(Token("FUNC", name))
      elif name in _GREEK:
        out.append(Token("ID", name, name))
      else:
        raise ParseError(f"unsupported command \\{name}")
    elif c in "<>!" and s.startswith("=", i + 1) and not (c == "!" and _after_operand(s, i)):
      out.append(Token("REL", s[i : i + 2], s[i : i + 2]))  # >= <= !=
      i += 2
    elif c in _SINGLE:
      kind, val = _SINGLE[c]
      if c == "*" and s.startswith("**", i):
        kind, val, i = "OP", "^", i + 1
      out.append(Token(kind, val, c))
      i += 1
    else:
      raise ParseError(f"unsupported character {c!r}")
  return out
