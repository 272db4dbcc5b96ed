"""Metrics against hand-computed values and exact formulas; evaluate() with a fake sampler."""

import itertools
import json
import math
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax import config
from tapo_jax.data import Problem, filter_by_pass_rate, format_prompts, last_boxed
from tapo_jax.data.text import default_eos_ids
from tapo_jax.eval import (
  ProblemResult,
  avg_at_k,
  canonical,
  compute_pass_rates,
  dsr,
  err,
  eval_kwargs,
  evaluate,
  evaluate_sets,
  has_reflection,
  load_eval_sets,
  maj_at_k,
  majority,
  mean_pass_at_k,
  pass_at_k,
  summarize,
)
from tapo_jax.sampling import Sampling

# --- pass@k ---------------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
  assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
  assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
  assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
  assert pass_at_k(8, 3, 4) == pytest.approx(1 - 5 / 70)  # 1 - C(5,4)/C(8,4)


def test_pass_at_k_edges():
  assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every k-subset holds a correct sample
  assert pass_at_k(4, 0, 1) == 0.0
  assert pass_at_k(4, 0, 4) == 0.0
  assert pass_at_k(4, 1, 4) == 1.0  # k = n
  assert pass_at_k(1, 1, 1) == 1.0
  for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
    with pytest.raises(ValueError):
      pass_at_k(*bad)


def test_pass_at_k_matches_exact_binomials():
  for n in range(1, 11):
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
      exact = 1 - math.comb(n - c, k) / math.comb(n, k)
      assert math.isclose(pass_at_k(n, c, k), exact, abs_tol=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_finite():
  # C(1000, 500) overflows a float; the product form does not.
  exact = 1 - math.comb(900, 500) / math.comb(1000, 500)
  assert math.isclose(pass_at_k(1000, 100, 500), exact, rel_tol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=8))
def test_pass_at_k_is_the_mean_over_k_subsets(row):
  n = len(row)
  for k in range(1, n + 1):
    subsets = list(itertools.combinations(row, k))
    brute = sum(any(s) for s in subsets) / len(subsets)
    assert math.isclose(pass_at_k(n, sum(row), k), brute, abs_tol=1e-12)


def test_mean_pass_at_k_and_avg_at_k():
  correct = [[0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
  assert avg_at_k(correct, 4) == pytest.approx((0.75 + 0 + 0.25) / 3)
  assert avg_at_k(correct, 2) == pytest.approx((0.5 + 0 + 0.5) / 3)  # the first two only
  assert avg_at_k(correct) == avg_at_k(correct, 4)
  assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct, 4))
  assert mean_pass_at_k(correct, 2) == pytest.approx((1.0 + 0 + 0.5) / 3)
  with pytest.raises(ValueError, match="k=5"):
    avg_at_k(correct, 5)
  with pytest.raises(ValueError, match="no problems"):
    avg_at_k([], 1)


# --- maj@k ----------------------------------------------------------------------------------------


def test_majority_ties_go_to_the_first_seen_answer():
  assert majority(["3", "4", "4", None, "3"]) == 0
  assert majority(["4", "3", "3", "4"]) == 0
  assert majority(["5", "4", "4"]) == 1


def test_majority_none_answers_do_not_vote():
  assert majority([None, None, "5"]) == 2
  assert majority([None, None]) is None
  assert majority([None, "1", None, None, "2", "2"]) == 4


def test_majority_groups_by_canonical_form():
  answers = ["1/2", "\\dfrac{1}{2}", "\\frac{1}{2}", "0.5", " 0.5 "]
  assert canonical("$\\left( 1, 2 \\right).$") == "(1,2)"
  # {1/2}: 1, {\frac{1}{2}}: 2 (first at 1), {0.5}: 2 (first at 3) -> the tie goes to index 1.
  assert majority(answers) == 1


def test_majority_merges_with_injected_equivalence():
  values = {"1/2": 0.5, "\\frac{1}{2}": 0.5, "0.5": 0.5, "2": 2.0}
  equiv = lambda a, b: values[canonical(a)] == values[canonical(b)]
  answers = ["2", "2", "1/2", "\\dfrac{1}{2}", "0.5"]
  assert majority(answers) == 0  # canonical only: "2" has 2 votes, the rest 1 each
  assert majority(answers, equiv) == 2  # the 0.5 cluster has 3 votes


def test_maj_at_k_grades_the_winner_and_reads_first_k():
  answers = [["3", "4", "4", "3"], ["7", "7", None, "1"], [None, None, None, None]]
  correct = [[False, True, True, False], [False, False, False, True], [False] * 4]
  # Problem 0: tie 3/4 -> "3" (wrong); problem 1: "7" (wrong); problem 2: nothing.
  assert maj_at_k(answers, correct, 4) == 0.0
  # First 3 only: problem 0 -> "4" (2 votes, right).
  assert maj_at_k(answers, correct, 3) == pytest.approx(1 / 3)
  correct[1] = [True, True, False, False]
  assert maj_at_k(answers, correct, 3) == pytest.approx(2 / 3)


# --- reflection, DSR, ERR -------------------------------------------------------------------------

MARKERS = config.base_config().eval.reflection_markers


def test_has_reflection_markers():
  assert has_reflection("x = 3. Wait, no.", MARKERS)
  assert has_reflection("LET ME RE-check", MARKERS)
  assert has_reflection("Actually, it is 4", MARKERS)
  assert not has_reflection("actually it is 4", MARKERS)  # the marker has the comma
  assert not has_reflection("we await the result", MARKERS)  # not a word start
  assert not has_reflection("Wait, no.", ())


def test_dsr_err_hand_case():
  correct = [1, 1, 0, 1, 0]
  reflected = [0, 1, 1, 0, 0]
  assert dsr(correct, reflected) == pytest.approx(2 / 3)  # correct among {0, 3, 4}
  assert err(correct, reflected) == pytest.approx(1 / 2)  # correct among {1, 2}
  assert math.isnan(err([1, 0], [0, 0]))
  assert math.isnan(dsr([1, 0], [1, 1]))
  assert dsr([1, 0], [1, 1]) != 1.0


def make_result(i, answers, correct, responses=None, lengths=None, truncated=None):
  k = len(answers)
  return ProblemResult(
    id=str(i),
    gold="g",
    responses=responses or [""] * k,
    answers=answers,
    correct=correct,
    lengths=lengths or [1] * k,
    truncated=truncated or [False] * k,
  )


def test_summarize_hand_case():
  results = [
    make_result(
      0,
      ["1", "2", "1"],
      [True, False, True],
      responses=["a", "Wait, b", "Actually, c"],
      lengths=[10, 20, 30],
      truncated=[False, True, False],
    ),
    make_result(
      1, ["5", None, "6"], [False, False, False], responses=["d", "e", "f"], lengths=[1, 2, 3]
    ),
  ]
  out = summarize(results, k=3, pass_ks=(1, 2), markers=MARKERS)
  assert set(out) == {
    "avg@3",
    "pass@1",
    "pass@2",
    "maj@3",
    "mean_len",
    "trunc_rate",
    "reflect_rate",
    "dsr",
    "err",
    "n_problems",
    "n_responses",
  }
  assert out["avg@3"] == pytest.approx((2 / 3 + 0) / 2)
  assert out["pass@1"] == pytest.approx(out["avg@3"])
  assert out["pass@2"] == pytest.approx((1.0 + 0) / 2)  # n - c = 1 < 2
  assert out["maj@3"] == pytest.approx(0.5)
  assert out["mean_len"] == pytest.approx(66 / 6)
  assert out["trunc_rate"] == pytest.approx(1 / 6)
  assert out["reflect_rate"] == pytest.approx(2 / 6)
  assert out["dsr"] == pytest.approx(1 / 4)  # no marker: a (right), d, e, f
  assert out["err"] == pytest.approx(1 / 2)  # marker: "Wait, b" (wrong), "Actually, c" (right)
  assert (out["n_problems"], out["n_responses"]) == (2, 6)


# --- evaluate() end to end ------------------------------------------------------------------------

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


@pytest.fixture(scope="module")
def tok():
  import transformers
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  chars = [chr(c) for c in range(32, 127)] + ["\n"]
  tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + chars)}, "<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
  tk.decoder = decoders.Fuse()
  tk.add_special_tokens(SPECIALS)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<unk>"
  )
  fast.chat_template = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
  )
  return fast


PROBLEMS = [
  Problem(id="p0", problem="1+1", answer="2"),
  Problem(id="p1", problem="2+3", answer="5"),
]
# Two samples per problem, in prompt-major order.
TEXTS = ["so \\boxed{2}", "Wait, \\boxed{3}", "\\boxed{5}", "Actually, it is \\boxed{5}"]


class FakeSampler:
  """Returns fixed texts (EOS-terminated unless truncated) and records its call."""

  def __init__(self, tok, texts, truncated):
    self.tok, self.texts, self.trunc, self.calls = tok, texts, truncated, []

  def __call__(self, engine, params, prompts, sampling, **kw):
    self.calls.append((engine, params, prompts, sampling, kw))
    eos = sampling.eos_ids[0]
    comps = [
      self.tok.encode(t) + ([] if tr else [eos])
      for t, tr in zip(self.texts, self.trunc, strict=True)
    ]
    return types.SimpleNamespace(completions=comps, truncated=list(self.trunc))


def grade_boxed(responses, golds):
  return [float(last_boxed(r) == g) for r, g in zip(responses, golds, strict=True)]


def _plain(generate_fn, max_new_tokens):
  """evaluate()'s keywords for k=2 at T=1 from `generate_fn`, graded on the last \\boxed{}."""
  return dict(
    k=2, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, generate_fn=generate_fn,
    grade_fn=grade_boxed, extract_fn=last_boxed,
  )  # fmt: skip


def run_eval(tok, tmp_path, truncated=(False, False, True, False), **kw):
  sampler = FakeSampler(tok, TEXTS, truncated)
  args = dict(k=2, temperature=0.6, top_p=0.95, max_new_tokens=64, pass_ks=(1, 2))
  args.update(markers=MARKERS, generate_fn=sampler, grade_fn=grade_boxed, extract_fn=last_boxed)
  args.update(kw)
  out = evaluate(
    "ENGINE", "PARAMS", tok, PROBLEMS, seed=7, out_path=tmp_path / "res" / "e.jsonl", **args
  )
  return out, sampler


def test_evaluate_end_to_end(tok, tmp_path):
  out, sampler = run_eval(tok, tmp_path)
  ((engine, params, prompts, sampling, kw),) = sampler.calls
  assert (engine, params) == ("ENGINE", "PARAMS")
  assert prompts == format_prompts(PROBLEMS, tokenizer=tok)
  assert tok.decode(prompts[0]).startswith("<|im_start|>1+1\n\nPlease reason step by step")
  eos = tok.convert_tokens_to_ids("<|im_end|>")
  assert sampling == Sampling(0.6, 0.95, 0, (eos, tok.convert_tokens_to_ids("<|endoftext|>")))
  assert kw == dict(n=2, max_new_tokens=64, seed=7)
  assert out["avg@2"] == pytest.approx(0.75)
  assert out["pass@1"] == pytest.approx(0.75)
  assert out["pass@2"] == 1.0
  assert out["maj@2"] == 1.0  # p0: tie 2 vs 3 -> "2" (first seen)
  assert out["trunc_rate"] == 0.25
  lens = [len(t) + 1 for t in TEXTS]
  lens[2] -= 1  # the truncated one has no EOS
  assert out["mean_len"] == pytest.approx(sum(lens) / 4)
  assert out["dsr"] == 1.0  # "so \\boxed{2}", "\\boxed{5}"
  assert out["err"] == 0.5  # "Wait, \\boxed{3}" wrong, "Actually, ..." right
  assert out["first_pass"] == 0.5 and out["fix_rate"] == 0.5  # (tests/test_eval_reflection.py)
  assert out["n_problems"] == 2

  rows = [json.loads(line) for line in (tmp_path / "res" / "e.jsonl").read_text().splitlines()]
  # "Wait, ..." is cut before its line: no answer, a wrong first pass; with no step reference a
  # first pass graded wrong makes its correction count for the fix rate
  assert rows == [
    dict(
      id="p0",
      gold="2",
      responses=TEXTS[:2],
      answers=["2", "3"],
      correct=[True, False],
      lengths=lens[:2],
      truncated=[False, False],
      first_pass=[True, False],
      fixed=[None, False],
    ),
    dict(
      id="p1",
      gold="5",
      responses=TEXTS[2:],
      answers=["5", "5"],
      correct=[True, True],
      lengths=lens[2:],
      truncated=[True, False],
      first_pass=[True, False],
      fixed=[None, True],
    ),
  ]


def test_evaluate_infers_truncation_when_the_sampler_does_not_say(tok, tmp_path):
  def gen(engine, params, prompts, sampling, *, n, max_new_tokens, **_):
    # "\\boxed{2}" is 9 tokens: exactly max_new_tokens without EOS = truncated.
    comps = [tok.encode("\\boxed{2}"), tok.encode("ab") + [sampling.eos_ids[0]]] * len(prompts)
    return types.SimpleNamespace(completions=comps)

  out = evaluate(None, None, tok, PROBLEMS, **_plain(gen, max_new_tokens=9))
  assert out["trunc_rate"] == 0.5
  assert out["avg@2"] == 0.25  # only p0's first sample is right


def test_evaluate_rejects_wrong_completion_count(tok):
  gen = lambda *a, **_: types.SimpleNamespace(completions=[[5]], truncated=[False])
  with pytest.raises(ValueError, match="1 completions, want 4"):
    evaluate(None, None, tok, PROBLEMS, **_plain(gen, max_new_tokens=4))


def test_evaluate_uses_injected_equivalence_for_maj(tok):
  texts = ["\\boxed{2}", "\\boxed{1/2}", "\\boxed{0.5}"]
  prob = [Problem(id="h", problem="half", answer="1/2")]
  sampler = FakeSampler(tok, texts, (False,) * 3)
  args = dict(k=3, temperature=1.0, top_p=1.0, max_new_tokens=32, generate_fn=sampler)
  args.update(extract_fn=last_boxed, grade_fn=lambda r, g: [0.0, 1.0, 1.0])
  assert evaluate(None, None, tok, prob, **args)["maj@3"] == 0.0  # three singletons -> "2"
  equiv = lambda a, b: {a, b} <= {"1/2", "0.5"}
  assert evaluate(None, None, tok, prob, equiv_fn=equiv, **args)["maj@3"] == 1.0  # {1/2, 0.5}


def test_evaluate_sets_prefixes_keys_and_writes_each(tok, tmp_path):
  sampler = FakeSampler(tok, TEXTS, (False,) * 4)
  sets = {"aime": PROBLEMS, "hmmt": PROBLEMS}
  args = dict(k=2, temperature=0.6, top_p=0.95, max_new_tokens=64, pass_ks=(1,))
  args.update(generate_fn=sampler, grade_fn=grade_boxed, extract_fn=last_boxed)
  out = evaluate_sets(None, None, tok, sets, out_dir=tmp_path, **args)
  assert out["aime/avg@2"] == out["hmmt/avg@2"] == pytest.approx(0.75)
  assert "aime/n_problems" in out and "avg@2" not in out
  assert (tmp_path / "aime.jsonl").exists() and (tmp_path / "hmmt.jsonl").exists()
  assert len(sampler.calls) == 2


def test_load_eval_sets_from_config_string(tmp_path):
  (tmp_path / "a").mkdir()
  for p in [tmp_path / "aime.jsonl", tmp_path / "a" / "aime.jsonl"]:
    p.write_text(json.dumps({"problem": "Q", "answer": "1"}) + "\n")
  paths = f"{tmp_path / 'aime.jsonl'}, {tmp_path / 'a' / 'aime.jsonl'},"
  sets = load_eval_sets(paths)
  assert list(sets) == ["aime", "aime_2"]
  assert sets["aime"][0].answer == "1"


def test_eval_kwargs_from_config_drive_evaluate(tok):
  cfg = config.base_config()
  cfg.eval.k = 2
  cfg.eval.pass_ks = (1, 2)
  kw = eval_kwargs(cfg)
  assert kw["markers"] == tuple(cfg.eval.reflection_markers)
  assert kw["template"] == cfg.data.prompt_template
  sampler = FakeSampler(tok, TEXTS, (False,) * 4)
  out = evaluate(
    None, None, tok, PROBLEMS, generate_fn=sampler, grade_fn=grade_boxed, extract_fn=last_boxed,
    **kw,
  )  # fmt: skip
  assert out["pass@2"] == 1.0 and out["avg@2"] == pytest.approx(0.75)
  assert sampler.calls[0][3].temperature == cfg.eval.temperature


def test_compute_pass_rates_feeds_the_filter(tok):
  sampler = FakeSampler(tok, TEXTS, (False,) * 4)
  rates = compute_pass_rates(None, None, tok, PROBLEMS, **_plain(sampler, max_new_tokens=64))
  assert rates == {"p0": 0.5, "p1": 1.0}
  assert [p.id for p in filter_by_pass_rate(PROBLEMS, rates, 1 / 8, 7 / 8)] == ["p0"]


def test_default_eos_ids(tok):
  ids = default_eos_ids(tok)
  assert ids == [
    tok.convert_tokens_to_ids("<|im_end|>"),
    tok.convert_tokens_to_ids("<|endoftext|>"),
  ]


def test_an_eval_prompt_longer_than_the_largest_bucket_is_a_data_error(tmp_path):
  """Issue 24.7: an eval prompt longer than the largest prefill bucket failed inside the engine
  (at the first eval, after training); the sets are now loaded and checked before any work."""
  import transformers

  from tapo_jax.data import DataError
  from tapo_jax.eval import checked_eval_sets
  from tapo_jax.toy import arith

  held = tmp_path / "held.jsonl"
  rows = [{"problem": "1+1", "answer": "2"}, {"problem": "1+" * 40 + "1", "answer": "41"}]
  held.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = config.base_config()
  cfg.model.toy, cfg.eval.paths = "arith", str(held)
  cfg.data.prompt_template, cfg.rollout.prefill_buckets = "{problem}", (32, 64)
  tokenizer = transformers.AutoTokenizer.from_pretrained(arith.CHECKPOINT_DIR)
  with pytest.raises(DataError) as e:
    checked_eval_sets(cfg, tokenizer)
  line = str(e.value)
  assert line.startswith(f"{held}: line 2: problem ") and "\n" not in line
  assert "tokens > max(rollout.prefill_buckets)=64" in line
  cfg.rollout.prefill_buckets = (32, 128)
  assert [p.answer for p in checked_eval_sets(cfg, tokenizer)["held"]] == ["2", "41"]


def test_eval_at_start_alone_builds_the_eval_engine():
  """train.eval_at_start=True with eval_every=0 built no eval engine: the step-0 eval failed."""
  from tapo_jax import policy as policy_lib
  from tapo_jax.sampling import engines as engines_lib

  cfg = config.base_config()
  cfg.model.toy, cfg.rollout.prefill_buckets, cfg.rollout.slots = "arith", (64,), 4
  cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens = 32, 16
  cfg.train.eval_at_start, cfg.train.eval_every = True, 0
  mesh, model, _ = policy_lib.load_policy(cfg)
  assert engines_lib.build_engines(cfg, model, mesh, None).eval is not None
