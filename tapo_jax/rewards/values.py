"""The values `parse` returns besides sympy objects: relations, lists, words, a choice letter,
and the parsed answer with what it carried (percent, degree, base digits, units)."""

import dataclasses

import sympy


@dataclasses.dataclass(frozen=True)
class Rel:
  r"""A relation chain parts[0] ops[0] parts[1] ...; ops are '=', '<', '<=', '>', '>=', '!=', '~'.

  ulps (only when there is a '~') holds, for ops[k] == '~', one unit in the last place of the
  decimal literal after it (2\pi \approx 6.28: 1/100), or None when that part is no plain literal.
  """

  parts: tuple
  ops: tuple
  ulps: tuple = ()


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
  """A parsed answer, whether it carried a percent sign or a degree mark, and its digit string
  when it is one literal in a base (101_2: value 5, digits 101)."""

  value: object
  percent: bool = False
  degree: bool = False
  digits: object = None
  units: frozenset = frozenset()  # unit_key()s of the unit words, scale words and \$ it carried


PM = sympy.Symbol("_pm_")  # the sign of a \pm; substituted by +1 and -1 at the item level
