"""Loaders for every layout, error locations, dedupe, SFT examples and prompt formatting."""

import json
import math

import pytest

from tapo_jax import config
from tapo_jax.data import (
  DEFAULT_TEMPLATE,
  DataError,
  Problem,
  SFTExample,
  check_prompt_lengths,
  detect_layout,
  filter_by_pass_rate,
  format_prompt,
  format_prompts,
  last_boxed,
  load_problems,
  load_sft,
  render,
  strip_dapo_template,
  tokenize_sft,
)
from tapo_jax.data.datasets import DAPO_PREFIX, DAPO_SUFFIX

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(chat_template=CHAT):
  """A character-level PreTrainedTokenizerFast over printable ASCII, built offline."""
  import transformers
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  chars = [chr(c) for c in range(32, 127)] + ["\n"]
  vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(SPECIALS)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<unk>"
  )
  fast.chat_template = chat_template
  return fast


@pytest.fixture(scope="module")
def tok():
  return char_tokenizer()


def write_jsonl(path, rows, raw_lines=()):
  lines = [json.dumps(r) for r in rows] + list(raw_lines)
  path.write_text("\n".join(lines) + "\n")
  return path


def dapo_row(problem, answer, index):
  content = DAPO_PREFIX + problem + DAPO_SUFFIX
  return {
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": content}],
    "ability": "MATH",
    "reward_model": {"ground_truth": answer, "style": "rule-lean"},
    "extra_info": {"index": index},
  }


DAPO_ROWS = [
  dapo_row("What is $1+1$?", "2", "a"),
  dapo_row("What is $1+1$?", "2", "b"),
  dapo_row("Find $x$ if $\\{x\\} = 3$.", "3", "c"),
  dapo_row("What is $1+1$?", "2", "d"),
]


# --- DAPO -----------------------------------------------------------------------------------------


def test_strip_dapo_template_extracts_the_problem():
  assert strip_dapo_template(DAPO_PREFIX + "Compute $2^3$." + DAPO_SUFFIX) == "Compute $2^3$."
  assert strip_dapo_template("  no template here ") == "no template here"


def test_dapo_jsonl_strips_template_dedupes_and_keeps_messages(tmp_path):
  path = write_jsonl(tmp_path / "dapo.jsonl", DAPO_ROWS)
  problems = load_problems(path)
  assert [p.problem for p in problems] == ["What is $1+1$?", "Find $x$ if $\\{x\\} = 3$."]
  assert [p.answer for p in problems] == ["2", "3"]
  assert [p.id for p in problems] == ["a", "c"]  # first occurrence kept
  assert problems[0].messages == tuple(DAPO_ROWS[0]["prompt"])
  assert problems[0].metadata["layout"] == "dapo"
  assert len(load_problems(path, dedupe=False)) == 4


def test_dapo_parquet_reads_struct_columns(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = tmp_path / "dapo.parquet"
  pq.write_table(pa.Table.from_pylist(DAPO_ROWS), path)
  problems = load_problems(path, layout="dapo")
  assert [(p.id, p.problem, p.answer) for p in problems] == [
    ("a", "What is $1+1$?", "2"),
    ("c", "Find $x$ if $\\{x\\} = 3$.", "3"),
  ]


def test_dapo_missing_ground_truth_names_row_and_field(tmp_path):
  bad = dapo_row("Q", "1", "z")
  del bad["reward_model"]["ground_truth"]
  path = write_jsonl(tmp_path / "d.jsonl", [DAPO_ROWS[0], bad])
  with pytest.raises(DataError) as e:
    load_problems(path)
  msg = str(e.value)
  assert str(path) in msg and "line 2" in msg and "reward_model.ground_truth" in msg


def test_dapo_prompt_without_user_message_is_an_error(tmp_path):
  bad = dapo_row("Q", "1", "z")
  bad["prompt"] = [{"role": "system", "content": "hi"}]
  path = write_jsonl(tmp_path / "d.jsonl", [bad])
  with pytest.raises(DataError, match=r"line 1: field 'prompt': no user message"):
    load_problems(path, layout="dapo")


# --- plain layouts --------------------------------------------------------------------------------


def test_deepscaler_jsonl(tmp_path):
  rows = [
    {"problem": "Compute $3 \\cdot 4$.", "answer": "12", "solution": "It is $\\boxed{12}$."},
    {"problem": "Compute $\\frac{1}{2}+\\frac12$.", "answer": "1", "solution": "..."},
  ]
  path = write_jsonl(tmp_path / "dsr.jsonl", rows)
  problems = load_problems(path)
  assert [(p.id, p.problem, p.answer) for p in problems] == [
    ("dsr-0", "Compute $3 \\cdot 4$.", "12"),
    ("dsr-1", "Compute $\\frac{1}{2}+\\frac12$.", "1"),
  ]
  assert problems[0].messages is None
  assert problems[0].metadata["layout"] == "deepscaler"


def test_math_json_takes_last_boxed_of_solution(tmp_path):
  rows = [
    {
      "problem": "Find $\\sin 60^\\circ$.",
      "solution": "Not $\\boxed{2}$; it is $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
      "level": "Level 2",
    },
    {"problem": "P2", "solution": "so \\boxed {x^{2}}", "unique_id": "test/x.json"},
  ]
  path = tmp_path / "math.json"
  path.write_text(json.dumps(rows))
  problems = load_problems(path)
  assert [p.answer for p in problems] == ["\\frac{\\sqrt{3}}{2}", "x^{2}"]
  assert [p.id for p in problems] == ["math-0", "test/x.json"]
  assert problems[0].metadata["layout"] == "math"


def test_math_prefers_answer_field_and_requires_a_box(tmp_path):
  path = tmp_path / "m.json"
  path.write_text(json.dumps([{"problem": "P", "solution": "\\boxed{1}", "answer": "7"}]))
  assert load_problems(path, layout="math")[0].answer == "7"
  path.write_text(json.dumps([{"problem": "P", "solution": "no box"}]))
  with pytest.raises(DataError, match=r"row 0: field 'solution': no \\boxed"):
    load_problems(path)


def test_aime_json_with_data_key_capitalized_fields_and_int_answers(tmp_path):
  path = tmp_path / "aime24.json"
  rows = [{"ID": "2024-I-1", "Problem": "Every morning Aya ...", "Solution": "...", "Answer": 204}]
  path.write_text(json.dumps({"data": rows}))
  (p,) = load_problems(path)
  assert (p.id, p.problem, p.answer, p.metadata["layout"]) == (
    "2024-I-1",
    "Every morning Aya ...",
    "204",
    "aime",
  )


def test_aime_question_field(tmp_path):
  path = write_jsonl(tmp_path / "aime25.jsonl", [{"question": "Find $n$.", "answer": "70"}])
  (p,) = load_problems(path)
  assert (p.problem, p.answer) == ("Find $n$.", "70")
  assert load_problems(path, layout="aime")[0].answer == "70"


def test_hmmt_latex_answers(tmp_path):
  rows = [{"problem_idx": 3, "problem": "Compute $\\sum$.", "answer": "\\frac{9\\sqrt{3}}{2}"}]
  path = write_jsonl(tmp_path / "hmmt.jsonl", rows)
  (p,) = load_problems(path, layout="hmmt")
  assert (p.id, p.answer) == ("3", "\\frac{9\\sqrt{3}}{2}")


def test_detect_layout_from_fields():
  assert detect_layout(DAPO_ROWS[0]) == "dapo"
  assert detect_layout({"problem": "", "answer": "", "solution": ""}) == "deepscaler"
  assert detect_layout({"problem": "", "solution": ""}) == "math"
  assert detect_layout({"Problem": "", "Answer": ""}) == "aime"
  assert detect_layout({"question": "", "answer": ""}) == "aime"
  with pytest.raises(ValueError, match="no layout"):
    detect_layout({"text": ""})


def test_undetectable_layout_names_file(tmp_path):
  path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}])
  with pytest.raises(DataError, match=r"x\.jsonl: line 1: no layout matches fields \['text'\]"):
    load_problems(path)


def test_last_boxed_matches_braces():
  assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
  assert last_boxed("no box") is None
  assert last_boxed("\\boxed{2} then \\boxed{unclosed") == "2"
  assert last_boxed("\\fbox{5}") == "5"
  assert last_boxed("\\boxed{{x}}") == "{x}"


def test_limit_and_forced_dedupe(tmp_path):
  rows = [{"problem": "A", "answer": "1"}, {"problem": "A", "answer": "1"}]
  rows.append({"problem": "B", "answer": "2"})
  path = write_jsonl(tmp_path / "p.jsonl", rows)
  assert len(load_problems(path)) == 3  # no dedupe outside dapo by default
  assert [p.problem for p in load_problems(path, dedupe=True)] == ["A", "B"]
  assert len(load_problems(path, limit=2)) == 2


# --- errors ---------------------------------------------------------------------------------------


def test_malformed_jsonl_row_names_file_line_and_field(tmp_path):
  path = tmp_path / "bad.jsonl"
  ok = json.dumps({"problem": "A", "answer": "1"})
  # The blank line counts: line numbers are physical, 1-based.
  path.write_text(f"{ok}\n\n{json.dumps({'problem': 'B'})}\n")
  with pytest.raises(DataError) as e:
    load_problems(path)
  assert str(e.value) == f"{path}: line 3: field 'answer': missing"


def test_wrong_type_and_empty_fields(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "A", "answer": ["1"]}])
  with pytest.raises(DataError, match=r"line 1: field 'answer': expected a string, got list"):
    load_problems(path)
  path = write_jsonl(tmp_path / "e.jsonl", [{"problem": "  ", "answer": "1"}])
  with pytest.raises(DataError, match=r"line 1: field 'problem': empty"):
    load_problems(path)
  path = write_jsonl(tmp_path / "b.jsonl", [{"problem": "A", "answer": True}])
  with pytest.raises(DataError, match="expected a string, got bool"):
    load_problems(path)


def test_invalid_json_line(tmp_path):
  path = tmp_path / "j.jsonl"
  path.write_text('{"problem": "A", "answer": "1"}\n{"problem": \n')
  with pytest.raises(DataError, match=r"j\.jsonl: line 2: invalid JSON"):
    load_problems(path)


def test_json_row_index_in_errors(tmp_path):
  path = tmp_path / "r.json"
  path.write_text(json.dumps([{"problem": "A", "answer": "1"}, {"answer": "2", "problem": None}]))
  with pytest.raises(DataError, match=r"r\.json: row 1: field 'problem': missing"):
    load_problems(path, layout="deepscaler")
  path.write_text(json.dumps([{"problem": "A", "answer": "1"}, 5]))
  with pytest.raises(DataError, match=r"row 1: expected an object, got int"):
    load_problems(path)


def test_parquet_row_index_in_errors(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = tmp_path / "p.parquet"
  table = pa.Table.from_pylist([{"problem": "A", "answer": "1"}, {"problem": "B", "answer": None}])
  pq.write_table(table, path)
  with pytest.raises(DataError, match=r"p\.parquet: row 1: field 'answer': missing"):
    load_problems(path)


@pytest.mark.parametrize(
  ("name", "text"), [("e.jsonl", "\n  \n"), ("e.json", "[]"), ("f.json", '{"data": []}')]
)
def test_empty_file_names_the_file(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(DataError, match=rf"{name}: file has no rows"):
    load_problems(path)


def test_unknown_extension_and_layout(tmp_path):
  path = tmp_path / "x.csv"
  path.write_text("problem,answer\n")
  with pytest.raises(DataError, match="unknown file type '.csv'"):
    load_problems(path)
  path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "A", "answer": "1"}])
  with pytest.raises(DataError, match="unknown layout 'gsm8k'"):
    load_problems(path, layout="gsm8k")
  with pytest.raises(DataError, match="load_sft"):
    load_problems(path, layout="sft")


def test_explicit_layout_mismatch_names_field(tmp_path):
  path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "A", "answer": "1"}])
  with pytest.raises(DataError, match=r"line 1: field 'prompt': missing"):
    load_problems(path, layout="dapo")


# --- pass-rate filter -----------------------------------------------------------------------------


def test_filter_by_pass_rate_keeps_the_closed_window():
  problems = [Problem(id=str(i), problem=f"p{i}", answer="1") for i in range(5)]
  rates = [0.0, 0.125, 0.5, 0.875, 1.0]
  kept = filter_by_pass_rate(problems, rates, 1 / 8, 7 / 8)
  assert [p.id for p in kept] == ["1", "2", "3"]
  by_id = {p.id: r for p, r in zip(problems, rates, strict=True)}
  assert filter_by_pass_rate(problems, by_id, 0.5, 1.0) == problems[2:]
  with pytest.raises(ValueError, match="no pass rate"):
    filter_by_pass_rate(problems, {"0": 0.5}, 0, 1)
  with pytest.raises(ValueError, match="4 pass rates for 5"):
    filter_by_pass_rate(problems, rates[:4], 0, 1)


# --- SFT ------------------------------------------------------------------------------------------


def test_load_sft_prompt_response_and_messages(tmp_path):
  msgs = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "\\boxed{2}"},
  ]
  rows = [{"prompt": "2+2?", "response": "\\boxed{4}"}, {"messages": msgs, "id": "m"}]
  examples = load_sft(write_jsonl(tmp_path / "sft.jsonl", rows))
  assert examples == [
    SFTExample(id="sft-0", messages=({"role": "user", "content": "2+2?"},), response="\\boxed{4}"),
    SFTExample(id="m", messages=tuple(msgs[:2]), response="\\boxed{2}"),
  ]


def test_load_sft_errors_name_line_and_field(tmp_path):
  msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
  path = write_jsonl(tmp_path / "s.jsonl", [{"messages": msgs}, {"messages": msgs[:1]}])
  with pytest.raises(DataError, match=r"s\.jsonl: line 2: field 'messages\[0\]\.role': last"):
    load_sft(path)
  path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q"}])
  with pytest.raises(DataError, match=r"line 1: field 'response \| completion': missing"):
    load_sft(path)
  path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user"}]}])
  with pytest.raises(DataError, match=r"field 'messages\[0\]\.content': expected a string"):
    load_sft(path)
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(DataError, match="empty.jsonl: file has no rows"):
    load_sft(tmp_path / "empty.jsonl")


# --- prompts --------------------------------------------------------------------------------------


def test_default_template_is_the_configs():
  assert config.base_config().data.prompt_template == DEFAULT_TEMPLATE
  expected = "Q {x}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
  assert render("Q {x}") == expected


def test_bad_template_is_a_clear_error():
  with pytest.raises(ValueError, match="one field, {problem}"):
    render("x", "{problem} \\boxed{}")


def test_format_prompt_without_tokenizer_returns_text():
  p = Problem(id="1", problem="What is 2+2?", answer="4")
  assert format_prompt(p, "Q: {problem}") == "Q: What is 2+2?"


def test_format_prompt_applies_chat_template(tok):
  p = Problem(id="1", problem="2+2?", answer="4")
  ids = format_prompt(p, "Q: {problem}", tok)
  expected = "<|im_start|>user\nQ: 2+2?<|im_end|>\n<|im_start|>assistant\n"
  assert ids == tok.encode(expected)
  assert all(isinstance(i, int) for i in ids)
  assert tok.decode(ids) == expected
  # Specials are single tokens: the chat prefix is 1 + len("user\n") ids.
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[6] == tok.encode("Q")[0]


def test_format_prompt_plain_encode_without_chat_template(tok):
  p = Problem(id="1", problem="2+2?", answer="4")
  plain = char_tokenizer(chat_template=None)
  assert format_prompt(p, "Q: {problem}", plain) == plain.encode("Q: 2+2?")
  assert format_prompt(p, "Q: {problem}", tok, use_chat_template=False) == tok.encode("Q: 2+2?")


def test_format_prompt_uses_file_messages_when_template_is_none(tmp_path, tok):
  (p,) = load_problems(write_jsonl(tmp_path / "d.jsonl", DAPO_ROWS[:1]))
  ids = format_prompt(p, None, tok)
  assert tok.decode(ids) == (
    f"<|im_start|>user\n{DAPO_ROWS[0]['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
  )
  q = Problem(id="2", problem="bare", answer="1")
  assert format_prompt(q, None) == render("bare")


def test_format_prompts_rejects_long_prompts(tok):
  problems = [
    Problem(id="a", problem="x", answer="1"),
    Problem(id="b", problem="y" * 40, answer="2"),
  ]
  n_long = len(format_prompt(problems[1], "{problem}", tok))
  assert n_long == 59  # 6 (<|im_start|>user\n) + 40 + 2 + 11 (<|im_start|>assistant\n)
  ids = format_prompts(problems[:1], "{problem}", tok, max_prompt_tokens=30)
  assert ids == [format_prompt(problems[0], "{problem}", tok)]
  with pytest.raises(DataError, match=r"problem 'b': prompt has 59 tokens > max_prompt_tokens=30"):
    format_prompts(problems, "{problem}", tok, max_prompt_tokens=30)


def test_tokenize_sft_masks_the_response_only(tok):
  ex = SFTExample(id="0", messages=({"role": "user", "content": "1+1?"},), response="It is 2.")
  ids, mask = tokenize_sft(ex, tok)
  assert len(ids) == len(mask)
  prompt = format_prompt("1+1?", "{problem}", tok)
  assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
  response = [t for t, m in zip(ids, mask, strict=True) if m]
  assert tok.decode(response) == "It is 2.<|im_end|>\n"


def test_tokenize_sft_plain_appends_eos(tok):
  plain = char_tokenizer(chat_template=None)
  ex = SFTExample(id="0", messages=({"role": "user", "content": "q?"},), response="ab")
  ids, mask = tokenize_sft(ex, plain)
  eos = plain.eos_token_id
  assert ids == plain.encode("q?") + plain.encode("ab") + [eos]
  assert mask == [False, False, True, True, True]
  assert math.isclose(sum(mask) / len(mask), 0.6)


def test_problems_hash_and_compare_without_metadata():
  a = Problem(id="1", problem="p", answer="1", messages=({"role": "user", "content": "p"},))
  b = Problem(id="1", problem="p", answer="1", messages=a.messages, metadata={"row": "line 9"})
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1
  assert a != Problem(id="1", problem="p", answer="2")


# --- bad files and over-long prompts found at load time -------------------------------------------


def test_directory_as_data_file_is_a_data_error(tmp_path):
  (tmp_path / "train.jsonl").mkdir()
  with pytest.raises(DataError, match="train.jsonl: is a directory"):
    load_problems(tmp_path / "train.jsonl")
  with pytest.raises(DataError, match="no such file"):
    load_problems(tmp_path / "none.jsonl")


def test_non_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "train.jsonl"
  good = json.dumps({"problem": "1+1", "answer": "2"}).encode()
  path.write_bytes(good + b"\n" + good + b"\n" + b'{"problem": "caf\xe9", "answer": "1"}\n')
  with pytest.raises(DataError, match=r"train.jsonl: line 3: not UTF-8 \(byte 0xe9\)"):
    load_problems(path)
  path = tmp_path / "train.json"
  path.write_bytes(b'[\n{"problem": "1", "answer": "1"},\n{"problem": "\xff", "answer": "1"}\n]')
  with pytest.raises(DataError, match=r"train.json: line 3: not UTF-8 \(byte 0xff\)"):
    load_problems(path)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_golds_are_errors(tmp_path, constant):
  path = tmp_path / "train.jsonl"
  rows = ['{"problem": "1+1", "answer": 2}', f'{{"problem": "0/0", "answer": {constant}}}']
  path.write_text("\n".join(rows) + "\n")
  with pytest.raises(DataError, match=r"train.jsonl: line 2: field 'answer': .*NaN/Infinity"):
    load_problems(path)


class CountingTokenizer:
  """Wraps a tokenizer and counts the calls that tokenize."""

  def __init__(self, inner):
    self.inner, self.calls = inner, 0
    self.chat_template = inner.chat_template

  def get_vocab(self):
    return self.inner.get_vocab()

  def apply_chat_template(self, *args, **kwargs):
    self.calls += 1
    return self.inner.apply_chat_template(*args, **kwargs)

  def encode(self, *args, **kwargs):
    self.calls += 1
    return self.inner.encode(*args, **kwargs)


def test_huge_problem_fails_before_anything_is_tokenized(tok, tmp_path):
  path = write_jsonl(
    tmp_path / "train.jsonl",
    [{"problem": "1+1", "answer": "2"}] * 3 + [{"problem": "9" * 10_000_000, "answer": "9"}],
  )
  problems = load_problems(path)
  counting = CountingTokenizer(tok)
  with pytest.raises(DataError) as e:
    check_prompt_lengths(problems, "{problem}", counting, 64, path=str(path))
  assert counting.calls == 0  # the character bound alone rejected it
  msg = str(e.value)
  assert f"{path}: line 4: problem 'train-3'" in msg and "data.max_prompt_tokens=64" in msg
  # 10^7 characters / 13 (the longest vocabulary entry, '<|endoftext|>') tokens at least
  assert "at least 769231 tokens" in msg


def test_check_prompt_lengths_is_exact_below_the_bound(tok):
  problems = [
    Problem(id="a", problem="x", answer="1"),
    Problem(id="b", problem="y" * 40, answer="2"),
  ]
  ids = check_prompt_lengths(problems, "{problem}", tok, 59)
  assert ids == format_prompts(problems, "{problem}", tok)
  # 40 characters pass the bound (ceil(40/13) = 4 <= 58) but the prompt has 59 tokens.
  with pytest.raises(
    DataError, match=r"problem 'b': prompt has 59 tokens > data.max_prompt_tokens=58"
  ):
    check_prompt_lengths(problems, "{problem}", tok, 58)
