r"""Answer extraction, safe parsing and exact equivalence (in-process; the pool is tested apart)."""

import builtins
import fractions

import pytest
import sympy
import sympy.parsing.sympy_parser
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.rewards import extract_answer, grade, is_equivalent
from tapo_jax.rewards.lex import ParseError
from tapo_jax.rewards.math import fast_equal, plain_int
from tapo_jax.rewards.parse import parse
from tapo_jax.rewards.values import Choice, Rel, Seq, Text

# --------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
  "response, expected",
  [
    (r"so $\boxed{5}$.", "5"),
    (r"\boxed{1} wait, no: \boxed{2}", "2"),  # the last box counts
    (r"\fbox{7}", "7"),
    (r"the answer is \boxed 5.", "5"),
    (r"the answer is \boxed 5 and done", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\boxed{5}}", "5"),  # nested boxes
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the group
    (r"\boxed{a^{2}} and \fbox{b}", "b"),
    (r"<think>\boxed{1}</think> so \boxed{2}", "2"),
    (r"<think>\boxed{1}</think> I am not sure", None),  # only after </think>
    (r"\boxed{}", None),  # empty box
    (r"\boxed{  }", None),
    (r"\boxed{1", None),  # unbalanced
    ("The answer is 5", None),  # no last-number fallback
    ("", None),
    (r"\boxed{" + "1" * 5000 + "}", None),  # length cap
    (r"\boxedfoo{5}", None),
  ],
)
def test_extract_answer(response, expected):
  assert extract_answer(response) == expected


def test_extract_answer_is_linear_on_hostile_text():
  assert extract_answer("x" * 100_000 + r"\boxed{5}") == "5"
  assert extract_answer(r"\boxed{" * 20_000) is None
  assert extract_answer(r"\boxed{1}" * 20_000) == "1"
  assert extract_answer(r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}") is None


# --------------------------------------------------------------------------------------------
# equivalence tables: (gold, answer)

EQUAL = [
  # integers, separators, leading zeros, trailing .0
  ("7425000", "7,425,000"),
  ("14916", "14{,}916"),
  ("10000", r"10,\!000"),
  ("1000000", r"1\,000\,000"),
  ("1000000", r"1\ 000\ 000"),
  ("25", "0025"),
  ("204", "204.0"),
  ("204", "204."),
  ("-3", "-3"),
  ("5", "+5"),
  ("5", "$5$"),
  ("5", r"\frac{10}{2}"),
  ("1234", r"\text{1234}"),
  # fractions
  (r"\frac{9}{4}", r"\frac94"),
  (r"\frac{9}{4}", r"\dfrac{9}{4}"),
  (r"\frac{9}{4}", r"\tfrac{9}{4}"),
  (r"\frac{9}{4}", "9/4"),
  (r"\frac{9}{4}", r"\frac{18}{8}"),
  (r"\frac{9}{4}", "2.25"),
  (r"\frac{7}{2}", r"3\frac12"),
  (r"\frac{7}{2}", r"3\frac{1}{2}"),
  (r"-\frac{7}{2}", r"-3\frac{1}{2}"),
  (r"\frac{2\pi}{3}", r"2\frac{\pi}{3}"),
  (r"\frac{2\sqrt{3}}{3}", r"2\frac{\sqrt3}{3}"),
  (r"-\frac{1}{2}", r"\frac{-1}{2}"),
  (r"-\frac{1}{2}", r"\frac{1}{-2}"),
  (r"\frac{1}{4}", "0.25"),
  (r"\frac{1}{4}", ".25"),
  ("0.5", "0.50"),
  (r"\frac{1}{3}", r"\frac{2}{6}"),
  (r"\frac{1}{3}", r"0.\overline{3}"),
  (r"\frac{1}{6}", r"0.1\overline{6}"),
  (r"\frac{1}{7}", r"0.\overline{142857}"),
  # percent and degrees
  (r"25\%", "0.25"),
  ("0.25", r"25\%"),
  ("25", r"25\%"),
  ("25", "25%"),
  ("30", r"30^\circ"),
  ("30", r"30^{\circ}"),
  ("30", "30°"),
  (r"30^\circ", "30"),
  (r"\frac{\pi}{6}", r"30^\circ"),
  (r"\frac{1}{2}", r"\sin 30^\circ"),
  # units
  ("5", r"5 \text{ cm}"),
  ("5", r"5\text{cm}^2"),
  ("5", r"5 \textnormal{ meters}"),
  ("5", r"5 \mbox{ units}"),
  ("12", r"12 \text{ ways}"),
  ("12", r"\$12"),
  ("12", "12 dollars"),
  # text
  (r"\text{Monday}", "Monday"),
  (r"\text{Monday}", r"\text{monday}"),
  ("east", r"\text{East}"),
  (r"\text{no solution}", "No solution."),
  # pi and radicals
  (r"2\pi", r"2 \pi"),
  (r"2\pi", r"\pi \cdot 2"),
  (r"\sqrt{2}", r"\sqrt2"),
  (r"\sqrt{2}", r"2^{1/2}"),
  (r"\sqrt[3]{2}", r"2^{\frac{1}{3}}"),
  (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
  (r"2\sqrt{3}", r"\sqrt{12}"),
  (r"1+\sqrt{3}", r"\frac{2}{\sqrt{3}-1}"),
  (r"\sqrt{3}+\sqrt{2}", r"\sqrt{5 + 2\sqrt{6}}"),
  (r"\sqrt[3]{-8}", "-2"),
  ("3", r"\log_2 8"),
  ("e^2", r"\exp(2)"),
  # plus-minus
  (r"3 \pm \sqrt{2}", r"3+\sqrt{2}, 3-\sqrt{2}"),
  (r"3 + \sqrt{2}, 3 - \sqrt{2}", r"3 \pm \sqrt{2}"),
  (r"\frac{1 \pm \sqrt{5}}{2}", r"\frac{1-\sqrt5}{2}, \frac{1+\sqrt5}{2}"),
  (r"\pm 2", "2, -2"),
  (r"x = \pm 2", "x = 2, x = -2"),
  # intervals, unions, inequalities
  ("[1, 2)", r"\left[1, 2\right)"),
  (r"(-\infty, 3]", r"(-\infty,3]"),
  (r"[1, 2) \cup (3, \infty)", r"[1,2)\cup(3,\infty)"),
  (r"(3, \infty)", "x > 3"),
  (r"(3, \infty)", "3 < x"),
  (r"[3, \infty)", r"x \ge 3"),
  (r"(-\infty, 3)", "x < 3"),
  ("(1, 5]", r"1 < x \le 5"),
  ("(1, 5]", r"2 < 2x \le 10"),
  (r"(-\infty, -1) \cup (2, \infty)", r"x < -1 \text{ or } x > 2"),
  (r"x < -1 \text{ or } x > 2", r"(-\infty, -1) \cup (2, \infty)"),
  (r"x \in [1, 2]", "[1, 2]"),
  (r"\mathbb{R}", r"(-\infty, \infty)"),
  (r"\emptyset", r"\{\}"),
  # sets and unordered lists
  (r"\{1, 2\}", r"\{2, 1\}"),
  (r"\{1, 2\}", "1, 2"),
  ("1, 2", "2, 1"),
  ("1, 2", "x = 1, x = 2"),
  ("1, 2", r"x=2 \text{ or } x=1"),
  ("1, 2", "1 and 2"),
  ("1, 2", r"\{1,2\}"),
  ("1,2,3", "3,2,1"),
  ("100, 200, 300", "300,200,100"),
  # ordered tuples
  ("(1, 2)", r"\left( 1, 2 \right)"),
  ("(1, 2)", "(x, y) = (1, 2)"),
  ("(1, 2, 3)", "(1,2,3)"),
  (r"(\frac{1}{2}, -3)", "(0.5, -3)"),
  # multiple choice
  (r"\text{(C)}", "C"),
  ("C", r"\text{(C)}"),
  ("(C)", "C"),
  ("C", r"\textbf{(C)}"),
  ("C", "(C)"),
  # equations
  ("5", "x = 5"),
  (r"\frac{1}{3}", r"k=\frac13"),
  ("5", "2 + 3 = 5"),
  ("5", "x = 2 + 3 = 5"),
  ("x = 5", "5"),
  ("x = 5", "x=5"),
  ("x = 5", "2x = 10"),
  ("y = 2x + 1", "2x - y + 1 = 0"),
  ("y = 2x + 1", "y = 1 + 2x"),
  ("y = 2x + 1", "2x + 1"),
  ("x^2 + y^2 = 1", "2x^2 + 2y^2 = 2"),
  (r"2\pi", r"2\pi \approx 6.28"),
  # algebra
  ("x^2 + 2x + 1", "(x+1)^2"),
  (r"\frac{x^2 - 1}{x - 1}", "x + 1"),
  ("2xy", "2yx"),
  ("a_1 + a_2", "a_{2} + a_{1}"),
  (r"\alpha + \beta", r"\beta+\alpha"),
  # matrices
  (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"),
  (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1, 2)"),
  (r"\begin{pmatrix} \frac12 & 0 \end{pmatrix}", r"\begin{pmatrix} 0.5 & 0 \end{pmatrix}"),
  # scientific notation
  ("1500", r"1.5\times10^{3}"),
  ("1500", r"1.5 \cdot 10^3"),
  ("1500", "1.5e3"),
  ("0.0015", "1.5E-3"),
  # complex numbers
  ("3+4i", "4i+3"),
  ("3+4i", r"3 + 4\mathrm{i}"),
  ("5", "|3+4i|"),
  ("-1", "i^2"),
  # misc
  ("120", "5!"),
  ("10", r"\binom{5}{2}"),
  ("10", r"\dbinom{5}{3}"),
  ("3", r"\lfloor \pi \rfloor"),
  (r"\infty", r"\infty"),
  ("2", r"\left(2\right)"),
  ("6", "2(3)"),
  ("6", r"2 \times 3"),
]

NOT_EQUAL = [
  # no tolerance, no percent rescaling without a percent sign
  ("25", "0.25"),
  ("25", "2500"),
  ("123456", "123460"),
  (r"2\pi", "6.28"),
  (r"2\pi", "6.283185307179586"),
  (r"\frac{1}{3}", "0.333"),
  (r"\frac{1}{3}", "0.3333333333333333"),
  (r"\frac{1}{3}", r"0.3\overline{4}"),
  (r"\sqrt{2}", "1.414"),
  ("0.25", "25"),
  ("1.25", "1.250001"),
  ("7425000", "7,425,001"),
  ("1000", "1,000,000"),
  ("12", "1, 2"),  # a list is not a number
  ("1, 2", "12"),
  # separators are not products
  ("0", r"1\,000\,000"),
  ("1000", r"1\,000\,000"),
  ("6", "2 3"),
  ("12", "1 2"),
  ("12", r"1\ 2"),
  # chains and hedges
  ("7", "3=5=7"),
  ("7", "x = 3 = 7"),
  ("5", r"3 \text{ or } 5"),
  ("5", "3, 5"),
  ("5", r"\{3, 5\}"),
  ("5", r"5 \pm 1"),
  ("5", "5, 5.1"),
  ("5", "[4, 5]"),
  ("5", "x > 4"),
  ("5", "2x = 10"),
  # forms
  (r"\frac{9}{4}", r"\frac{4}{9}"),
  (r"\frac{7}{2}", r"3\frac{1}{3}"),
  (r"\frac{15}{2}", r"3\frac{5}{2}"),  # neither a mixed number nor a product
  (r"\frac{1}{2}", r"\frac{1}{2}x"),
  ("5", "5x"),
  ("5", "5 apples and 3 pears"),
  (r"\frac{\pi}{6}", "30"),
  (r"\text{Monday}", "Tuesday"),
  (r"\text{Monday}", "5"),
  ("5", r"\text{five}"),
  (r"\sqrt{2}", r"\sqrt{3}"),
  (r"\sqrt[3]{2}", r"\sqrt{2}"),
  (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}"),
  (r"3 \pm \sqrt{2}", r"3+\sqrt{2}"),
  (r"3 \pm \sqrt{2}", r"3+\sqrt{2}, 3-\sqrt{3}"),
  # intervals: closedness and bounds
  ("[1, 2)", "[1, 2]"),
  ("[1, 2)", "(1, 2)"),
  ("(1, 2)", "[1, 2]"),
  (r"(3, \infty)", r"x \ge 3"),
  (r"(3, \infty)", "x < 3"),
  (r"[1, 2) \cup (3, \infty)", r"[1,2)\cup[3,\infty)"),
  (r"(-\infty, -1) \cup (2, \infty)", r"x < -1 \text{ and } x > 2"),
  # sets and tuples
  ("1, 2", "1"),
  ("1, 2", "1, 2, 3"),
  ("1, 2", "1, 3"),
  ("(1, 2)", "(2, 1)"),
  ("(1, 2)", "1"),
  ("(1, 2, 3)", "(1, 2)"),
  # choices
  (r"\text{(C)}", "D"),
  ("C", "(D)"),
  ("C", "c"),
  # equations
  ("y = 2x + 1", "2x - y - 1 = 0"),
  ("y = 2x + 1", "y = 2x"),
  ("x = 5", "y = 5"),
  ("x = 5", "x = 6"),
  (r"2\pi", r"6.28 \approx 2\pi"),
  # matrices
  (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix}1&3\\2&4\end{pmatrix}"),
  (r"\begin{pmatrix} 1 & 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
  # scientific and complex
  ("1500", r"1.5\times10^{4}"),
  ("1500", "1.5e4"),
  ("3+4i", "3-4i"),
  ("3+4i", "4+3i"),
  ("5", "3+4i"),
  # empty and junk
  ("5", ""),
  ("5", " "),
  ("5", "5 = "),
  ("5", ")5("),
]


# Issue 24.4: units and scale words were dropped on both sides (5 km graded right for 5 cm).
UNITS_EQUAL = [
  (r"5 \text{ cm}", "5"),  # a unit on one side only: the values decide
  ("5", r"5 \text{ cm}"),
  (r"5 \text{ cm}", r"5 \text{ centimeters}"),  # the same unit, spelled two ways
  (r"5 \text{ m}", r"5 \text{ meters}"),
  (r"3 \text{ hours}", r"3 \text{ hrs}"),
  (r"12 \text{ dollars}", r"\$12"),
  (r"\$0.50", r"\$\frac{1}{2}"),
  (r"2 \text{ million}", "2 million"),  # a scale word on both sides
  (r"\$2 \text{ million}", r"2 \text{ million dollars}"),
  (r"5\text{ cm}^2", r"5 \text{ cm}^2"),
  ("1500", r"\text{1,500 people}"),
]
UNITS_NOT_EQUAL = [
  (r"5 \text{ cm}", r"5 \text{ km}"),
  (r"5 \text{ km}", r"5 \text{ cm}"),
  ("2", r"2 \text{ million}"),  # a scale word on one side
  (r"2 \text{ million}", "2"),
  ("2", "2 billion"),
  ("2000000", r"2 \text{ million}"),
  (r"\$5", r"5 \text{ cents}"),  # a currency and a unit
  (r"5 \text{ cents}", r"\$5"),
  (r"5\text{ cm}^2", r"5 \text{ cm}"),
  (r"30 \text{ minutes}", r"30 \text{ seconds}"),
  ("5 apples", "5 marbles"),
]


@pytest.mark.parametrize("gold, answer", EQUAL + UNITS_EQUAL)
def test_equal(gold, answer):
  """UNITS_EQUAL: the same or one-sided units compare the values."""
  assert is_equivalent(gold, answer)


@pytest.mark.parametrize("gold, answer", NOT_EQUAL + UNITS_NOT_EQUAL)
def test_not_equal(gold, answer):
  """UNITS_NOT_EQUAL: different units, or a scale word on one side, do not match."""
  assert not is_equivalent(gold, answer)


def test_none_is_never_equal():
  assert not is_equivalent("5", None)
  assert grade("no box here, the answer is 5", "5") == 0.0


@pytest.mark.parametrize(
  "response, gold, expected",
  [
    (r"\boxed{3} hmm, actually \boxed{5}", "5", 1.0),
    (r"\boxed{3} hmm, actually \boxed{5}", "3", 0.0),
    (r"<think>it is \boxed{3}</think>The answer is $\boxed{5}$.", "5", 1.0),
    (r"<think>it is \boxed{5}</think>The answer is 5.", "5", 0.0),
    (r"\boxed{\boxed{5}}", "5", 1.0),
    (r"\boxed{}", "5", 0.0),
    (r"\boxed{3=5=7}", "7", 0.0),
    (r"\boxed{3 \text{ or } 5}", "5", 0.0),
    (r"\boxed{1\,000\,000}", "1000000", 1.0),
    (r"So the answer is \boxed 7.", "7", 1.0),
  ],
)
def test_grade(response, gold, expected):
  assert grade(response, gold) == expected


# --------------------------------------------------------------------------------------------
# the integer fast path and the parser's value types


@pytest.mark.parametrize(
  "text, value",
  [
    ("7,425,000", 7425000),
    ("14{,}916", 14916),
    (r"10,\!000", 10000),
    (r"1\,000\,000", 1000000),
    ("007", 7),
    ("204.0", 204),
    ("-12", -12),
    ("$12$", 12),
    ("1,2", None),
    ("1,0000", None),
    ("12.5", None),
    ("1e3", None),
    ("x", None),
  ],
)
def test_plain_int(text, value):
  assert plain_int(text) == value


def test_fast_path_only_decides_plain_integers():
  assert fast_equal("42", "42.00") is True
  assert fast_equal("42", "43") is False
  assert fast_equal("42", r"\frac{84}{2}") is None  # needs the parser
  assert fast_equal(r"\frac12", "0.5") is None


def test_parse_value_types():
  assert parse("0.25").value == sympy.Rational(1, 4)
  assert parse(r"\frac{1}{2}").value == sympy.Rational(1, 2)
  assert parse(r"1\,000\,000").value == 1000000
  assert parse(r"3\frac12").value == sympy.Rational(7, 2)
  assert parse(r"\sqrt[3]{-8}").value == -2
  assert parse(r"25\%").value == sympy.Rational(1, 4) and parse(r"25\%").percent
  assert parse(r"30^\circ").value == 30 and parse(r"30^\circ").degree
  assert parse(r"3+4i").value == 3 + 4 * sympy.I
  assert parse(r"\text{(B)}").value == Choice("B")
  assert parse(r"\text{Monday}").value == Text("monday")
  assert parse("(1, 2]").value == sympy.Interval.Lopen(1, 2)
  assert parse("(1, 2)").value == Seq("paren", (1, 2))
  assert parse(r"\{1, 2\}").value == Seq("set", (1, 2))
  assert parse("1 < x").value == Rel((1, sympy.Symbol("x")), ("<",))
  assert parse(r"\begin{pmatrix}1&2\end{pmatrix}").value == sympy.ImmutableMatrix([[1, 2]])
  assert parse("1,234").value == 1234
  assert parse("1,234", thousands=False).value == Seq("list", (1, 234))


# --------------------------------------------------------------------------------------------
# safety: screening and no evaluation of model text

ADVERSARIAL = [
  "9^{9^{9^9}}",
  "10^{10^{10}}",
  "2^{2^{2^{2^{2}}}}",
  "(10^{1000})^{1000}",
  "(1+\\sqrt{2})^{100000}",
  "x^{99999}",
  "1001!",
  "(10^{100})!",
  "\\binom{100000}{50000}",
  "\\sqrt[100000]{2}",
  "1e99999",
  "9" * 5000,
  "{" * 5000 + "1" + "}" * 5000,
  "(" * 300 + "1" + ")" * 300,
  "\\frac{1}{0}",
  "0^{-1}",
  "\\log 0",
  "\\infty - \\infty",
  "e^{e^{e^{e^{10}}}}",
  "__import__('os').system('echo pwned')",
  "exec('import os')",
  "lambda: 1",
  "eval('1+1')",
  "print(5)",
  "\\sum_{i=1}^{10^9} i",
  "\\int_0^1 x dx",
  "a" * 900,
  "1" * 100_000,
]


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_answers_are_wrong(answer):
  assert not is_equivalent("5", answer)
  assert not is_equivalent(r"\frac{1}{2}", answer)


@pytest.mark.parametrize(
  "text", ["9^{9^{9^9}}", "1001!", "(x+1)^{100}", "2^{400000}", "\\sqrt[5000]{3}", "1e5000"]
)
def test_screening_raises_before_sympy(text):
  with pytest.raises(ParseError):
    parse(text)


def test_model_text_is_never_evaluated(monkeypatch):
  calls = []

  def trap(name):
    def f(*args, **kwargs):
      calls.append(name)
      raise AssertionError(name)

    return f

  monkeypatch.setattr(builtins, "eval", trap("eval"))
  monkeypatch.setattr(builtins, "exec", trap("exec"))
  monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", trap("parse_expr"))
  answers = ADVERSARIAL[:-1] + [a for _, a in EQUAL[:40]] + ["x+1", r"\frac{x}{y}", "sin(x)"]
  for answer in answers:
    is_equivalent(r"\frac{x+1}{2}", answer)
    is_equivalent("(1, 2)", answer)
  assert calls == []


# --------------------------------------------------------------------------------------------
# properties: a value spelled many ways equals itself; a perturbed value does not


def _int_spellings(n: int) -> list[str]:
  sign = "-" if n < 0 else ""
  m = abs(n)
  out = [str(n), f"{n}.0", f"{sign}{m:,}", f"{sign}{m:,}".replace(",", "{,}")]
  out += [
    f"{sign}{m:,}".replace(",", r"\,"),
    rf"\frac{{{2 * n}}}{{2}}",
    f"0{m}" if n >= 0 else str(n),
  ]
  return out


def _frac_spellings(f: fractions.Fraction) -> list[str]:
  p, q = f.numerator, f.denominator
  sign = "-" if f < 0 else ""
  out = [rf"\frac{{{p}}}{{{q}}}", rf"{sign}\dfrac{{{abs(p)}}}{{{q}}}", f"{p}/{q}"]
  out.append(rf"\frac{{{3 * p}}}{{{3 * q}}}")
  if 10**12 % q == 0:
    out.append(str(float(f)))
  return out


@settings(max_examples=40, deadline=None)
@given(st.integers(-(10**7), 10**7), st.integers(1, 50), st.data())
def test_integer_spellings(n, delta, data):
  spellings = _int_spellings(n)
  gold = data.draw(st.sampled_from(spellings))
  answer = data.draw(st.sampled_from(spellings))
  assert is_equivalent(gold, answer)
  assert not is_equivalent(gold, _int_spellings(n + delta)[0])
  assert not is_equivalent(gold, _int_spellings(n - delta)[-2])


@settings(max_examples=40, deadline=None)
@given(st.fractions(max_denominator=64).filter(lambda f: abs(f) < 1000), st.data())
def test_fraction_spellings(f, data):
  spellings = _frac_spellings(f)
  gold = data.draw(st.sampled_from(spellings))
  assert is_equivalent(gold, data.draw(st.sampled_from(spellings)))
  perturbed = f + fractions.Fraction(1, f.denominator + 1)
  assert not is_equivalent(gold, data.draw(st.sampled_from(_frac_spellings(perturbed))))


@settings(max_examples=40, deadline=None)
@given(st.integers(-(10**6), 10**6), st.integers(1, 4), st.integers(1, 9))
def test_decimal_spellings(units, places, k):
  value = fractions.Fraction(units, 10**places)
  text = f"{float(value):.{places}f}"
  assert is_equivalent(text, text + "00")
  assert is_equivalent(text, rf"\frac{{{units}}}{{{10**places}}}")
  assert is_equivalent(text, f"{float(value * 100):.{max(places - 2, 0)}f}\\%")
  nudged = f"{float(value):.{places}f}{k}"  # one more digit: close but not equal
  assert not is_equivalent(text, nudged)
