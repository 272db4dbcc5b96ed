"""First-pass accuracy and the correction-fix rate (tapo_jax/eval/reflection.py) on hand-made
chain-toy responses, and through evaluate() with a fake sampler."""

import math
import random
import types

import pytest

from tapo_jax import config, toy
from tapo_jax.data import Problem, last_boxed
from tapo_jax.eval import ProblemResult, eval_kwargs, evaluate, summarize
from tapo_jax.eval import reflection as refl
from tapo_jax.eval.metrics import reflection_pattern
from tapo_jax.toy import chain, teacher

MARKERS = config.base_config().eval.reflection_markers
PATTERN = reflection_pattern(MARKERS)
GOLD = "21-16=5\n5+26=31\n31*3=93\n93-12=81\n\\boxed{81}"
PROBLEM = Problem(id="c0", problem="Compute (21-16+26)*3-12.", answer="81", solution=GOLD)
# a wrong step, the toy's correction line, then the right lines from the wrong step on: fixed
FIXED = "21-16=5\n5+26=32\nWait, 5+26 is not 32.\n5+26=31\n31*3=93\n93-12=81\n\\boxed{81}"
# the same correction that goes wrong again later: not fixed
UNFIXED = "21-16=5\n5+26=32\nWait, 5+26 is not 32.\n5+26=31\n31*3=94\n94-12=82\n\\boxed{82}"
# a correction after a right first pass (a false alarm): not in the fix rate
FALSE_ALARM = "21-16=5\n5+26=31\nWait, 5+26 is not 31.\n5+26=31\n31*3=93\n93-12=81\n\\boxed{81}"
# the right answer boxed before an afterthought: right on its first pass
BOXED_FIRST = GOLD + "\nWait, that is it."
WRONG = "21-16=5\n5+26=32\n32*3=96\n96-12=84\n\\boxed{84}"


def grade(responses, golds):
  return [float(last_boxed(r) == g) for r, g in zip(responses, golds, strict=True)]


def test_first_pass_is_the_text_before_the_correction_line():
  assert refl.first_pass(GOLD, PATTERN) is None
  assert refl.first_pass(FIXED, PATTERN) == "21-16=5\n5+26=32"
  assert refl.first_pass("Wait, no.\n1+1=2", PATTERN) == ""
  assert refl.first_pass("1+1=3 wait, 1+1=2\n\\boxed{2}", PATTERN) == ""  # the marker's whole line
  assert refl.first_pass("await\n\\boxed{2}", PATTERN) is None  # "wait" inside a word


def test_the_chain_held_out_problems_carry_the_generators_solution_lines():
  assert refl.solution_lines(PROBLEM) == GOLD.split("\n")
  held = toy.eval_problems("chain", seed=0, n=50)
  for p, gen in zip(held, chain.make_split("heldout", 50, seed=0), strict=True):
    assert p.problem == gen.problem and refl.solution_lines(p) == gen.solution.split("\n")
  assert refl.solution_lines(Problem(id="x", problem="What is 2+2?", answer="4")) is None


def test_the_teachers_constructions_are_fixes_of_a_wrong_first_pass():
  """The toy's construction (y⁻ to its wrong line, `Wait, ...`, y⁺ from there) is a correction
  after a wrong first pass that ends right: what a policy trained on them should learn to write."""
  rng = random.Random(0)
  for p in chain.make_split("heldout", 30, seed=1):
    neg = teacher.corrupt(p, rng)
    _, recon = teacher.reconstruction(neg, p.solution)
    cut = refl.first_pass(recon, PATTERN)
    assert cut is not None and refl.deviates(cut, p.solution.split("\n")), recon
    assert last_boxed(recon) == p.answer


def _annotated(texts, steps_fn=refl.solution_lines):
  result = ProblemResult(
    id="c0", gold="81", responses=texts, answers=[last_boxed(t) for t in texts],
    correct=[g > 0.5 for g in grade(texts, ["81"] * len(texts))], lengths=[1] * len(texts),
    truncated=[False] * len(texts),
  )  # fmt: skip
  return refl.annotate([result], [PROBLEM], grade, MARKERS, steps_fn)


def test_hand_made_responses():
  texts = [GOLD, WRONG, FIXED, UNFIXED, FALSE_ALARM, BOXED_FIRST]
  (r,) = _annotated(texts)
  assert r.first_pass == [True, False, False, False, False, True]
  assert r.fixed == [None, None, True, False, None, None]
  out = refl.summarize([r])
  assert out == {"first_pass": 2 / 6, "fix_rate": 1 / 2, "fix_share": 2 / 6}
  # against DSR / ERR on the same responses: first_pass >= (1 - r) * DSR, ERR counts false alarms
  plain = summarize([r], k=6, markers=MARKERS)
  assert plain["dsr"] == 1 / 2 and plain["reflect_rate"] == 4 / 6
  assert out["first_pass"] > (1 - plain["reflect_rate"]) * plain["dsr"]  # BOXED_FIRST
  assert plain["err"] == 3 / 4  # FIXED, FALSE_ALARM, BOXED_FIRST of the 4 reflecting


def test_without_a_step_reference_a_wrong_first_pass_is_graded():
  (r,) = _annotated([FIXED, FALSE_ALARM, BOXED_FIRST], steps_fn=None)
  assert r.first_pass == [False, False, True]
  assert r.fixed == [True, True, None]  # the false alarm's first pass has no answer: wrong


def test_no_reflection_no_extra_grading_and_undefined_fix_rate():
  calls = []

  def counting(responses, golds):
    calls.append(list(responses))
    return grade(responses, golds)

  result = ProblemResult("c0", "81", [GOLD, WRONG], ["81", "84"], [True, False], [1, 1], [0, 0])
  (r,) = refl.annotate([result], [PROBLEM], counting, MARKERS, refl.solution_lines)
  assert calls == [] and r.first_pass == [True, False]
  out = refl.summarize([r])
  assert out["first_pass"] == 0.5 and math.isnan(out["fix_rate"]) and out["fix_share"] == 0
  assert refl.summarize([result]) == {}  # not annotated


def test_evaluate_reports_both_and_eval_kwargs_picks_the_chain_reference():
  class Tok:  # one id per character; EOS = 0
    def encode(self, text, add_special_tokens=False):
      return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
      return "".join(chr(i) for i in ids if i)

  texts = [GOLD, FIXED, FALSE_ALARM, WRONG]

  def generate(engine, params, prompts, sampling, **kw):
    comps = [[ord(c) for c in t] + [0] for t in texts]
    return types.SimpleNamespace(completions=comps, truncated=[False] * 4)

  cfg = config.base_config()
  cfg.model.toy = "chain"
  cfg.eval.k, cfg.eval.pass_ks, cfg.eval.greedy = 4, (1,), False
  cfg.data.prompt_template, cfg.data.use_chat_template = "{problem}", False
  kw = eval_kwargs(cfg)
  assert kw["steps_fn"] is refl.solution_lines
  cfg.eval.paths = "x.jsonl"
  assert eval_kwargs(cfg)["steps_fn"] is None
  out = evaluate(
    None, None, Tok(), [PROBLEM], generate_fn=generate, grade_fn=grade, extract_fn=last_boxed,
    eos_token_ids=[0], **kw,
  )  # fmt: skip
  assert out["avg@4"] == 0.75
  assert out["first_pass"] == 0.25 and out["fix_rate"] == 1.0 and out["fix_share"] == 0.25


@pytest.mark.parametrize("n", [8, 256])
def test_the_toy_held_out_set_size_is_a_config_key(n):
  from tapo_jax.eval import eval_sets

  cfg = config.base_config()
  cfg.model.toy = "chain"
  cfg.eval.toy_problems = n
  (problems,) = eval_sets(cfg).values()
  assert len(problems) == n == len({p.problem for p in problems})
  assert all(chain.split_of(p.problem) == "heldout" for p in problems)
  cfg.eval.toy_problems = 64
  assert eval_sets(cfg)["chain"] == problems[:64] or n < 64  # a larger set extends the default
