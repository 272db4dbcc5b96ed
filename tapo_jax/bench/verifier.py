r"""Verifier throughput and correctness vs math-verify on a synthetic, labeled workload.

python -m tapo_jax.bench verifier --n 3000 --workers 2 [--extract answer_line]

Every (response, gold) pair is generated with a known label (is the boxed answer really equal to
the gold?): integer golds (AIME-like, the majority), fractions, radicals, intervals, tuples,
sets, equations, text and choices; correct answers in many spellings, wrong answers, and the
tricky wrong answers public verifiers accept (25 vs 0.25, 6.28 vs 2\pi, \boxed{3=5=7}, hedges,
an unboxed last number). With --extract answer_line the same answers end the response as DAPO's
"Answer: ..." last line instead of a \boxed{}, and both verifiers read them that way.
"""

import argparse
import collections
import importlib.util
import random
import sys
import time
from fractions import Fraction

from tapo_jax.rewards.extract import EXTRACT_MODES
from tapo_jax.rewards.math import grade
from tapo_jax.rewards.pool import VerifierPool

_WORDS = (
  "note that we have so the sum is then adding gives thus and multiplying by which means "
  "substituting back into the equation we find the remainder is checking the case"
).split()


def _filler(rng: random.Random) -> str:
  """A few sentences of reasoning-like text with numbers in it (bait for last-number fallbacks)."""
  out = []
  for _ in range(rng.randint(3, 12)):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
    out.append(f"{words.capitalize()} ${a} + {b} = {a + b}$.")
  return " ".join(out)


def _respond(rng: random.Random, boxed: str, extract: str = "boxed") -> str:
  if extract == "answer_line":
    return f"<think>\n{_filler(rng)}\n</think>\n\n{_filler(rng)}\n\nAnswer: ${boxed}$"
  return (
    f"<think>\n{_filler(rng)}\n</think>\n\n{_filler(rng)} "
    f"Therefore the final answer is $\\boxed{{{boxed}}}$."
  )


def _frac_latex(f: Fraction, cmd: str = "\\frac") -> str:
  sign = "-" if f < 0 else ""
  return f"{sign}{cmd}{{{abs(f.numerator)}}}{{{f.denominator}}}"


def _with_commas(n: int, sep: str) -> str:
  s = f"{n:,}"
  return s.replace(",", sep)


def _integer_items(rng: random.Random):
  """(gold, right answers, wrong answers, tricky wrong answers); the other generators alike."""
  n = rng.choice([rng.randint(1, 999), rng.randint(1000, 10**7)])
  g = str(n)
  right = [str(n), f"{n}.0", f"{n}"]
  if n >= 1000:
    right += [_with_commas(n, ","), _with_commas(n, "{,}"), _with_commas(n, "\\,")]
  right += [f"0{n}", f"{n} \\text{{ ways}}", f"x = {n}", f"\\frac{{{2 * n}}}{{2}}"]
  wrong = [str(n + rng.choice([-2, -1, 1, 3, 10])), str(n * 10), f"{n / 100:g}"]
  tricky = [
    f"{n - 1} \\text{{ or }} {n}",  # hedge
    f"{n + 1}, {n}",  # a list of guesses
    f"{n + 2} = {n + 1} = {n}",  # an equation chain whose parts differ
    f"{round(n, -1) + (10 if n % 10 == 0 else 0)}",  # rounded
    f"{n / 100:g}",  # 25 vs 0.25
    f"{n}x",  # a stray variable
  ]
  return g, right, wrong, tricky


def _fraction_items(rng: random.Random):
  f = Fraction(rng.randint(-20, 40) or 1, rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 12, 16]))
  if f.denominator == 1:
    f += Fraction(1, 3)
  g = _frac_latex(f)
  k = rng.randint(2, 5)
  right = [_frac_latex(f, "\\dfrac"), f"{f.numerator}/{f.denominator}"]
  right.append(f"\\frac{{{f.numerator * k}}}{{{f.denominator * k}}}")
  if 10**6 % f.denominator == 0:
    right.append(str(float(f)))
  if f > 1 and f.denominator < 10 and f.numerator < 10:
    right.append(f"\\frac{f.numerator}{f.denominator}")
  wrong = [_frac_latex(f + Fraction(1, f.denominator)), _frac_latex(-f), f"{float(f) + 0.01:.3f}"]
  whole = f.numerator // f.denominator
  if f > 1 and f.denominator > 1:
    right.append(f"{whole}\\frac{{{f.numerator - whole * f.denominator}}}{{{f.denominator}}}")
  tricky = [f"{float(f):.2f}", f"{float(f):.4f}"] if 10**4 % f.denominator else [_frac_latex(1 / f)]
  return g, right, wrong, tricky


def _radical_items(rng: random.Random):
  a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
  kind = rng.randint(0, 2)
  if kind == 0:  # a sqrt(b) = sqrt(a^2 b)
    g = f"{a}\\sqrt{{{b}}}"
    right = [f"\\sqrt{{{a * a * b}}}", f"{a}\\sqrt{b}", f"\\sqrt{{{b}}} \\cdot {a}"]
    wrong = [f"{a}\\sqrt{{{b + 1}}}", f"\\sqrt{{{a * b}}}"]
    tricky = [f"{a * b**0.5:.3f}", f"{a * b**0.5:.6f}"]
  elif kind == 1:  # 1/sqrt(b) = sqrt(b)/b
    g = f"\\frac{{\\sqrt{{{b}}}}}{{{b}}}"
    right = [f"\\frac{{1}}{{\\sqrt{{{b}}}}}", f"\\frac{{\\sqrt {b}}}{{{b}}}", f"{b}^{{-1/2}}"]
    wrong = [f"\\frac{{\\sqrt{{{b}}}}}{{{b + 1}}}", f"\\sqrt{{{b}}}"]
    tricky = [f"{b**-0.5:.4f}"]
  else:  # a pi
    g = f"{a}\\pi"
    right = [f"{a} \\pi", f"\\pi \\cdot {a}", f"\\frac{{{2 * a}\\pi}}{{2}}"]
    wrong = [f"{a + 1}\\pi", f"{a}\\pi^2"]
    tricky = [f"{a * 3.14159:.2f}", f"{a * 3.14:.2f}"]
  return g, right, wrong, tricky


def _interval_items(rng: random.Random):
  a = rng.randint(-9, 5)
  b = a + rng.randint(1, 9)
  lo, hi = rng.choice("[("), rng.choice("])")
  g = f"{lo}{a}, {b}{hi}"
  op1 = "\\le" if lo == "[" else "<"
  op2 = "\\le" if hi == "]" else "<"
  right = [f"\\left{lo}{a},{b}\\right{hi}", f"{a} {op1} x {op2} {b}"]
  flip = {"[": "(", "(": "["}[lo]
  wrong = [f"{flip}{a}, {b}{hi}", f"{lo}{a}, {b + 1}{hi}"]
  tricky = [f"{lo}{b}, {a}{hi}", f"x {op2} {b}"]
  if rng.random() < 0.5:  # a ray
    g = f"({a}, \\infty)"
    right = [f"x > {a}", f"\\left({a},\\infty\\right)", f"{a} < x"]
    wrong = [f"x \\ge {a}", f"[{a}, \\infty)", f"x < {a}"]
    tricky = [f"x > {a + 1}"]
  return g, right, wrong, tricky


def _tuple_items(rng: random.Random):
  a, b = rng.randint(-9, 9), rng.randint(-9, 9)
  if a == b:
    b += 1
  g = f"({a}, {b})"
  right = [f"\\left({a},{b}\\right)", f"({a},{b})", f"(x, y) = ({a}, {b})"]
  wrong = [f"({b}, {a})", f"({a}, {b + 1})"]
  tricky = [f"{a}", f"({a}, {b}) \\text{{ or }} ({b}, {a})"]
  return g, right, wrong, tricky


def _set_items(rng: random.Random):
  a, b = rng.sample(range(-9, 10), 2)
  g = f"{a}, {b}"
  right = [f"{b}, {a}", f"x = {a}, x = {b}", f"\\{{{b}, {a}\\}}", f"x={b} \\text{{ or }} x={a}"]
  wrong = [f"{a}", f"{a}, {b + 20}"]
  tricky = [f"{a}, {b}, {a + b + 30}"]
  return g, right, wrong, tricky


def _other_items(rng: random.Random):
  kind = rng.randint(0, 3)
  if kind == 0:
    letter = rng.choice("ABCDE")
    other = rng.choice([c for c in "ABCDE" if c != letter])
    return f"\\text{{({letter})}}", [letter, f"({letter})", f"\\textbf{{({letter})}}"], [other], []
  if kind == 1:
    day = rng.choice(["Monday", "Tuesday", "Friday", "Sunday"])
    other = "Wednesday"
    return f"\\text{{{day}}}", [day, f"\\text{{{day}}}", day.lower()], [other], []
  if kind == 2:
    m = rng.randint(2, 5)
    c = rng.randint(-5, 5)
    g = f"y = {m}x + {c}" if c >= 0 else f"y = {m}x - {-c}"
    right = [f"{m}x - y + {c} = 0", f"y - {m}x = {c}", f"{2 * m}x - 2y = {-2 * c}"]
    wrong = [f"y = {m}x + {c + 1}", f"y = {m + 1}x + {c}"]
    return g, right, wrong, [f"y = {m}x + {c} = {m + 1}x"]
  a, b = rng.randint(1, 9), rng.randint(1, 9)
  g = f"{a}+{b}i"
  return g, [f"{b}i + {a}", f"{a} + {b}i"], [f"{a}-{b}i", f"{a}+{b + 1}i"], [f"{a}+{b}"]


_CATEGORIES = [  # (name, weight, generator)
  ("integer", 60, _integer_items),
  ("fraction", 9, _fraction_items),
  ("radical", 7, _radical_items),
  ("interval", 6, _interval_items),
  ("tuple", 5, _tuple_items),
  ("set", 5, _set_items),
  ("other", 8, _other_items),
]


def workload(n: int, seed: int = 0, extract: str = "boxed") -> list[tuple[str, str, bool, str]]:
  """n labeled items (response, gold, label, category/kind); answers written for `extract`."""
  rng = random.Random(seed)
  names = [c[0] for c in _CATEGORIES]
  weights = [c[1] for c in _CATEGORIES]
  gens = dict((c[0], c[2]) for c in _CATEGORIES)
  items = []
  while len(items) < n:
    cat = rng.choices(names, weights)[0]
    gold, right, wrong, tricky = gens[cat](rng)
    r = rng.random()
    if r < 0.45 and right:
      items.append((_respond(rng, rng.choice(right), extract), gold, True, f"{cat}/right"))
    elif r < 0.75 and wrong:
      items.append((_respond(rng, rng.choice(wrong), extract), gold, False, f"{cat}/wrong"))
    elif r < 0.95 and tricky:  # wrong answers that public verifiers are known to accept
      tricky_answer = rng.choice(tricky)
      items.append((_respond(rng, tricky_answer, extract), gold, False, f"{cat}/tricky"))
    else:  # no box at all; the text ends with guesses that include the gold
      text = f"{_filler(rng)} It could be {rng.randint(1, 999)} or {gold}"
      items.append((text, gold, False, f"{cat}/unboxed"))
  return items


def _math_verify_grade(items):
  from math_verify import parse, verify

  out = []
  for response, gold, _, _ in items:  # math-verify reads "Answer: ..." lines by itself too
    try:
      out.append(float(verify(parse(f"${gold}$"), parse(response))))
    except Exception:  # math-verify's own timeouts and errors count as wrong
      out.append(0.0)
  return out


def _row(name, scores, seconds, items):
  fp = sum(s > 0 and not lab for s, (_, _, lab, _) in zip(scores, items, strict=True))
  fn = sum(s == 0 and lab for s, (_, _, lab, _) in zip(scores, items, strict=True))
  rate = len(items) / seconds if seconds > 0 else float("inf")
  return name, rate, seconds, fp, fn


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m tapo_jax.bench verifier")
  p.add_argument("--n", type=int, default=3000, help="number of (response, gold) pairs")
  p.add_argument("--workers", type=int, default=2, help="verifier worker processes")
  p.add_argument("--timeout", type=float, default=5.0, help="per-item timeout in seconds")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-math-verify", action="store_true", help="skip the math-verify baseline")
  p.add_argument("--show", type=int, default=5, help="disagreements to print")
  p.add_argument(
    "--extract", choices=EXTRACT_MODES, default="boxed", help="how responses give their answer"
  )
  args = p.parse_args(argv)

  items = workload(args.n, args.seed, args.extract)
  responses = [r for r, _, _, _ in items]
  golds = [g for _, g, _, _ in items]
  n_wrong = sum(not lab for _, _, lab, _ in items)
  print(f"workload: {len(items)} items ({len(items) - n_wrong} correct, {n_wrong} wrong), ", end="")
  print(f"categories: {dict(collections.Counter(t.split('/')[0] for *_, t in items))}")

  rows, results = [], {}
  t0 = time.perf_counter()
  pool = VerifierPool(workers=args.workers, timeout_s=args.timeout, extract=args.extract).start()
  pool.grade(responses[:8], golds[:8])  # warm the workers
  start_s = time.perf_counter() - t0
  with pool:
    t0 = time.perf_counter()
    ours = pool.grade(responses, golds)
    rows.append(
      _row(f"tapo_jax pool ({args.workers} workers)", ours, time.perf_counter() - t0, items)
    )
  results["ours"] = ours
  t0 = time.perf_counter()
  inproc = [grade(r, g, args.extract) for r, g in zip(responses, golds, strict=True)]
  rows.append(_row("tapo_jax in-process", inproc, time.perf_counter() - t0, items))
  if not args.no_math_verify and importlib.util.find_spec("math_verify") is None:
    print("math-verify is not installed (pip install math-verify): baseline skipped")
    args.no_math_verify = True
  if not args.no_math_verify:
    t0 = time.perf_counter()
    mv = _math_verify_grade(items)
    rows.append(_row("math-verify in-process", mv, time.perf_counter() - t0, items))
    results["mv"] = mv

  print(f"pool start-up (not timed below): {start_s:.2f} s; worker restarts: {pool.restarts}")
  print(f"{'verifier':<30}{'answers/s':>12}{'seconds':>10}{'FP':>6}{'FN':>6}")
  for name, rate, secs, fp, fn in rows:
    print(f"{name:<30}{rate:>12.0f}{secs:>10.2f}{fp:>6}{fn:>6}")
  print(f"(FP: graded 1 among {n_wrong} wrong; FN: graded 0 among {len(items) - n_wrong} correct)")
  if "mv" in results:
    mv = results["mv"]
    agree = sum(a == b for a, b in zip(ours, mv, strict=True)) / len(items)
    print(
      f"throughput ratio pool / math-verify: {rows[0][1] / rows[2][1]:.1f}x; "
      f"agreement: {100 * agree:.1f}%"
    )
    by_tag = collections.Counter()
    for o, m, (_, _, lab, tag) in zip(ours, mv, items, strict=True):
      if o > 0 and not lab:
        by_tag[("tapo_jax FP", tag)] += 1
      if m > 0 and not lab:
        by_tag[("math-verify FP", tag)] += 1
    for (who, tag), c in sorted(by_tag.items()):
      print(f"  {who:<16}{tag:<20}{c}")
    shown = 0
    for o, m, (resp, gold, lab, tag) in zip(ours, mv, items, strict=True):
      if o != m and shown < args.show:
        boxed = resp[resp.rfind("boxed") :][:60] if "boxed" in resp else resp[-60:]
        print(f"  disagree [{tag}] gold={gold!r} answer={boxed!r} label={lab} ours={o} mv={m}")
        shown += 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
