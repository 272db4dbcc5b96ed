"""The toy domains without a model: the byte-level tokenizer, the `chain` generator, the teacher."""

import json
import random
import unicodedata

import numpy as np
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax.data.datasets import SFTExample
from tapo_jax.data.prompts import format_prompt, tokenize_sft
from tapo_jax.rewards import grade
from tapo_jax.tapo import construct, synthesis
from tapo_jax.toy import arith, chain, teacher
from tapo_jax.toy import tokenizer as toy_tokenizer

QWEN2_CONFIG = {"model_type": "qwen2", "vocab_size": 265, "hidden_size": 8}


@pytest.fixture(scope="module")
def tok():
  return toy_tokenizer.make_tokenizer(extra=teacher.TAGS)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tok):
  """The tokenizer as the loop gets it: AutoTokenizer on a qwen2 model directory."""
  d = tmp_path_factory.mktemp("tok")
  tok.save_pretrained(d)
  (d / "config.json").write_text(json.dumps(QWEN2_CONFIG))
  return transformers.AutoTokenizer.from_pretrained(d)


def _domain_texts(n=40):
  """Problems, solutions, wrong solutions, synthesis prompts and constructions of `chain`."""
  rng = random.Random(0)
  out = []
  for p in chain.make_split("train", n, seed=3):
    neg = teacher.corrupt(p, rng)
    synth = teacher.synthesis_prompt(p.problem, neg, p.solution)
    out += [p.problem, p.solution, neg, synth, teacher.construction(neg, p.solution)]
  return out


# ------------------------------------------------------------------------------------ tokenizer


def test_issue_example_keeps_spaces_and_newlines(loaded):
  s = "12+7=19\n19+30=49\n\\boxed{49} a b"
  assert loaded.decode(loaded.encode(s, add_special_tokens=False)) == s


def test_autotokenizer_on_a_qwen2_dir_is_the_saved_tokenizer(tok, loaded):
  # transformers 5 rebuilds any qwen2 directory's tokenizer as Qwen2Tokenizer (byte-level BPE):
  # the toy vocabulary is keyed so that this rebuild encodes exactly as the saved pipeline.
  assert type(loaded).__name__ == "Qwen2Tokenizer"
  for text in _domain_texts(10):
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(
      text, add_special_tokens=False
    )


def test_round_trip_on_domain_texts(loaded):
  texts = _domain_texts()
  waits = [line for t in texts for line in t.split("\n") if line.startswith("Wait,")]
  assert len(waits) >= 20  # the diagnosis lines are among them
  for text in texts:
    ids = loaded.encode(text, add_special_tokens=False)
    assert loaded.decode(ids) == text
    assert len(ids) == len(text.encode()) - sum(text.count(t) * (len(t) - 1) for t in teacher.TAGS)


def test_chat_prompt_round_trip(loaded):
  p = chain.make_split("heldout", 1)[0]
  ids = format_prompt(p.problem, "{problem}", loaded, True)
  assert loaded.decode(ids) == f"<|im_start|>{p.problem}<|im_end|><|im_start|>"


def test_newline_is_its_own_token(loaded):
  (nl,) = loaded.encode("\n", add_special_tokens=False)
  assert loaded.decode([nl]) == "\n"
  sol = chain.make_split("train", 1)[0].solution
  ids = loaded.encode(sol, add_special_tokens=False)
  assert ids.count(nl) == sol.count("\n") > 0
  eos = [loaded.eos_token_id]
  tables = construct.token_tables(loaded, len(loaded), eos)
  assert np.flatnonzero(np.asarray(tables.is_sep)).tolist() == [nl]  # the only step separator
  (space,) = loaded.encode(" ", add_special_tokens=False)
  assert space in np.flatnonzero(np.asarray(tables.is_space)).tolist()


def test_tags_are_single_tokens(loaded):
  for tag in teacher.TAGS:
    (i,) = loaded.encode(tag, add_special_tokens=False)
    assert loaded.decode([i]) == tag


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_nfc_text_round_trips(loaded, text):
  text = unicodedata.normalize("NFC", text)
  assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text


def test_the_shipped_arith_tokenizer_keeps_spaces_and_newlines():
  """Issue 24.9: the arith checkpoint (the tests' fast model) shipped the legacy tokenizer, which
  dropped every space and newline on load; rebuilt byte-level, with make_tokenizer()'s ids."""
  shipped = transformers.AutoTokenizer.from_pretrained(arith.CHECKPOINT_DIR)
  fixed = arith.make_tokenizer()
  for ch in arith.CHARS:
    assert shipped.encode(ch, add_special_tokens=False) == fixed.encode(
      ch, add_special_tokens=False
    ), repr(ch)
  p = arith.make_problems(1, seed=3)[0]
  for text in (p.problem, p.solution, "Compute 12+7+30.\n12+7=19\n19+30=49\n\\boxed{49}"):
    assert shipped.decode(shipped.encode(text, add_special_tokens=False)) == text
  (nl,) = shipped.encode("\n", add_special_tokens=False)
  tables = construct.token_tables(shipped, len(shipped), [shipped.eos_token_id])
  assert np.flatnonzero(np.asarray(tables.is_sep)).tolist() == [nl]  # the divergence cut


# ------------------------------------------------------------------------------------ generator


def test_splits_are_deterministic_and_disjoint():
  a, b = chain.make_split("train", 50, seed=1), chain.make_split("train", 50, seed=1)
  assert a == b
  assert a != chain.make_split("train", 50, seed=2)
  held = chain.make_split("heldout", 50, seed=1)
  assert {chain.split_of(p.problem) for p in held} == {"heldout"}
  assert {chain.split_of(p.problem) for p in a} == {"train"}
  assert not {p.problem for p in held} & {p.problem for p in a}
  with pytest.raises(ValueError, match="split"):
    chain.make_split("test", 1)


def test_hand_example():
  rng = random.Random(0)
  p = chain.make_problem(rng)
  assert p.problem.startswith("Compute ") and p.problem.endswith(".")
  assert chain.expression(47, [("+", 385), ("-", 129), ("*", 3), ("+", 56)]) == "(47+385-129)*3+56"
  assert chain.expression(5, [("*", 3), ("*", 2), ("+", 1), ("*", 4)]) == "(5*3*2+1)*4"
  assert chain.parse_step("432-129=303") == chain.Step(432, "-", 129, 303)
  assert chain.parse_step("-12+30 = 18") == chain.Step(-12, "+", 30, 18)
  assert chain.parse_step("\\boxed{3}") is None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["train", "heldout"]))
def test_solutions_are_right_and_well_formed(seed, split):
  (p,) = chain.make_split(split, 1, seed=seed)
  spec = chain.SPEC
  assert grade(p.solution, p.answer) == 1.0
  # The expression means the gold answer under standard precedence (the verifier evaluates it).
  assert grade(f"\\boxed{{{p.problem[len('Compute ') : -1]}}}", p.answer) == 1.0
  lines = p.solution.split("\n")
  assert spec.min_steps <= len(lines) - 1 <= spec.max_steps
  assert lines[-1] == f"\\boxed{{{p.answer}}}"
  acc = p.steps[0].a
  for line, step in zip(lines, p.steps):
    assert chain.parse_step(line) == step and step.a == acc
    assert step.c == chain.apply(step.a, step.op, step.b)
    assert 0 <= step.c <= spec.max_value
    lo, hi = (2, spec.max_factor) if step.op == "*" else (spec.min_operand, spec.max_operand)
    assert lo <= step.b <= hi
    acc = step.c


# -------------------------------------------------------------------------------------- teacher


def test_diagnosis_names_the_fault():
  assert teacher.diagnosis("432-129=293", "432-129=303", 1) == "Wait, 432-129 is not 293."
  assert (
    teacher.diagnosis("442-129=313", "432-129=303", 1) == "Wait, the last result was 432, not 442."
  )
  assert (
    teacher.diagnosis("48+385=433", "47+385=432", 0) == "Wait, the problem starts with 47, not 48."
  )
  assert (
    teacher.diagnosis("432-192=240", "432-129=303", 1) == "Wait, the problem says -129, not -192."
  )
  assert (
    teacher.diagnosis("432*129=303", "432-129=303", 1) == "Wait, the problem says -129, not *129."
  )
  assert (
    teacher.diagnosis("\\boxed{96}", "\\boxed{965}", 4) == "Wait, the answer is the last result."
  )
  assert teacher.diagnosis("432-1", "432-129=303", 1) == "Wait, this step is wrong."
  assert teacher.diagnosis(None, "\\boxed{965}", 2) == "Wait, the solution is not finished."


def test_hand_construction():
  pos = "47+385=432\n432-129=303\n303*3=909\n\\boxed{909}"
  neg = "47+385=432\n432-129=293\n293*3=879\n\\boxed{879}"
  assert teacher.construction(neg, pos) == (
    "<analysis>Step 2 is wrong: 432-129=293</analysis><reconstruction>47+385=432\n432-129=293\n"
    "Wait, 432-129 is not 293.\n432-129=303\n303*3=909\n\\boxed{909}</reconstruction>"
  )
  assert teacher.construction(pos, pos) is None
  assert teacher.first_difference("47+385=432", pos) == 1  # stopped early: wrong at its end
  assert teacher.reconstruction("47+385=432", pos)[1] == (
    "47+385=432\nWait, the solution is not finished.\n432-129=303\n303*3=909\n\\boxed{909}"
  )


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(sorted(teacher.ERROR_WEIGHTS) + [None]))
def test_corrupt_then_construct(seed, kind):
  rng = random.Random(seed)
  (p,) = chain.make_split("train", 1, seed=seed)
  neg = teacher.corrupt(p, rng, kind)
  assert neg == teacher.corrupt(p, random.Random(seed), kind)  # deterministic in the rng
  assert grade(neg, p.answer) == 0.0
  i = teacher.first_difference(neg, p.solution)
  assert i is not None
  out = teacher.construction(neg, p.solution)
  analysis, recon = synthesis.parse_construction(out)
  assert analysis == f"Step {i + 1} is wrong: {neg.split(chr(10))[i]}"
  assert grade(recon, p.answer) == 1.0
  lines, neg_lines, pos_lines = recon.split("\n"), neg.split("\n"), p.solution.split("\n")
  assert lines[: i + 1] == neg_lines[: i + 1]  # y⁻ verbatim through its wrong step
  assert lines[i + 1].startswith("Wait, ") and sum(x.startswith("Wait,") for x in lines) == 1
  assert lines[i + 2 :] == pos_lines[i:]  # then y⁺ from that step on


def test_template_is_valid_and_short():
  pieces, names = synthesis.template_parts(teacher.SYNTHESIS_TEMPLATE)
  assert sorted(names) == ["correct", "incorrect", "query"]
  assert len(teacher.SYNTHESIS_TEMPLATE) < 100


def test_sft_rows_match_the_loops_synthesis_prompt(tok):
  # The loop splices template pieces (chat-wrapped), the query and y⁻ / y⁺ response tokens;
  # the cold-start rows render the same text through tokenize_sft: the token ids must agree.
  rng = random.Random(1)
  p = chain.make_split("train", 1, seed=5)[0]
  neg = teacher.corrupt(p, rng)
  row = {"prompt": teacher.synthesis_prompt(p.problem, neg, p.solution)}
  ex = SFTExample(id="x", messages=({"role": "user", "content": row["prompt"]},), response="r")
  ids, mask = tokenize_sft(ex, tok, True)
  prompt = ids[: mask.index(True)]
  t = synthesis.encode_template(tok, teacher.SYNTHESIS_TEMPLATE, chat=True)
  pieces, names = t.pieces, t.names
  field = {"query": p.problem, "incorrect": neg, "correct": p.solution}
  spliced = list(pieces[0])
  for name, piece in zip(names, pieces[1:]):
    spliced += tok.encode(field[name], add_special_tokens=False) + list(piece)
  assert prompt == spliced


def test_cold_start_rows_mix(tok):
  rows = teacher.cold_start_rows(200, 0.5, seed=0)
  synth = [r for r in rows if r["prompt"].startswith("Fix the wrong solution.")]
  assert 70 <= len(synth) <= 130
  for r in synth[:20]:
    assert synthesis.parse_construction(r["response"]) is not None
  assert rows == teacher.cold_start_rows(200, 0.5, seed=0)


def test_scrambled_rows_are_copies():
  # a scrambled solution keeps the query's operators and operands and chains its random results;
  # its construction is y⁻'s lines then y⁺'s, like any other
  rng = random.Random(3)
  for p in chain.make_split("train", 20, seed=7):
    s = teacher.scramble(p, rng)
    assert [(x.op, x.b) for x in s.steps] == [(x.op, x.b) for x in p.steps]
    assert s.steps[0].a == p.steps[0].a
    assert all(b.a == a.c for a, b in zip(s.steps, s.steps[1:]))
    assert s.answer == str(s.steps[-1].c) and s.solution.endswith(chain.boxed(s.answer))
    neg = teacher.corrupt(s, rng)
    _, recon = synthesis.parse_construction(teacher.construction(neg, s.solution))
    assert grade(recon, s.answer) == 1.0
  rows = teacher.cold_start_rows(200, 0.5, seed=0, scrambled_share=0.5)
  assert len(rows) == 200 and rows != teacher.cold_start_rows(200, 0.5, seed=0)
