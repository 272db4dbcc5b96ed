"""Math problems and SFT examples from local jsonl / json / parquet files, one field map per layout.

Layouts (see docs/data.md for the files users bring):
  dapo        verl schema: `prompt` = [{role, content}], `reward_model.ground_truth`; the DAPO
              instruction template is stripped and repeated prompts are deduplicated.
  deepscaler  `problem`, `answer`.
  math        `problem`, answer = `answer` if present, else the last \\boxed{} of `solution`.
  aime        `problem` | `Problem` | `question`, `answer` | `Answer` (ints accepted).
  hmmt        `problem`, `answer` (LaTeX).
Every layout also reads an optional worked `solution` (or `Solution`) string: the reference
solution that `algorithm=opsd` shows its teacher (tapo_jax/opsd); absent or empty means none.
"auto" picks the layout from the first row's fields. A malformed row raises `DataError` naming the
file, the row (1-based line for jsonl, 0-based row index for json/parquet) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

LAYOUTS = ("dapo", "deepscaler", "math", "aime", "hmmt")

DAPO_PREFIX = (
  "Solve the following math problem step by step. The last line of your response should be of "
  "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

_ID_KEYS = ("id", "ID", "unique_id", "problem_idx", "idx")


class DataError(ValueError):
  """A data file that cannot be read as the requested layout."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """One question with its gold answer; `messages` keeps a source chat prompt when there is one."""

  id: str
  problem: str  # the bare problem text (no instruction template)
  answer: str  # gold answer string, graded by tapo_jax.rewards
  # The file's own chat prompt (dapo); dicts, so left out of the hash.
  messages: tuple[dict[str, str], ...] | None = dataclasses.field(default=None, hash=False)
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
  # A worked reference solution (the file's `solution` field), or None; OPSD's privileged text.
  solution: str | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """A chat context and the assistant response the loss is taken on."""

  id: str
  messages: tuple[dict[str, str], ...]  # context: every message before the trained response
  response: str  # the last assistant message (or `response`)


class _Row:
  """A row and its location, for error messages."""

  def __init__(self, path: pathlib.Path, where: str, data: Any):
    self.path, self.where, self.data = path, where, data

  def fail(self, field: str, why: str) -> DataError:
    return DataError(f"{self.path}: {self.where}: field {field!r}: {why}")


def _decode(path: pathlib.Path, raw: bytes, where: str | None = None) -> str:
  """UTF-8 text of `raw`; a DataError naming the file, line and byte otherwise."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if where is None:
      lineno = raw.count(b"\n", 0, e.start) + 1
      where = f"line {lineno}"
    raise DataError(
      f"{path}: {where}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8"
    ) from None


def _read_rows(path: pathlib.Path) -> Iterator[_Row]:
  """Yields every row of a jsonl / json / parquet file."""
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    with path.open("rb") as f:
      for lineno, raw in enumerate(f, start=1):
        where = f"line {lineno}"
        line = _decode(path, raw, where)
        if not line.strip():
          continue
        try:
          data = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}: {where}: invalid JSON ({e.msg})") from None
        yield _Row(path, where, data)
  elif suffix == ".json":
    try:
      data = json.loads(_decode(path, path.read_bytes()))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, dict) and "data" in data:
      data = data["data"]
    if not isinstance(data, list):
      raise DataError(f"{path}: expected a list of objects or {{'data': [...]}}")
    for i, item in enumerate(data):
      yield _Row(path, f"row {i}", item)
  elif suffix == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise DataError(
        f"{path}: reading parquet needs pyarrow (pip install pyarrow or tapo_jax[parquet])"
      ) from None
    for i, item in enumerate(pq.read_table(path).to_pylist()):
      yield _Row(path, f"row {i}", item)
  else:
    raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .json or .parquet)")


def _rows(path: str | pathlib.Path) -> list[_Row]:
  path = pathlib.Path(path)
  if path.is_dir():
    raise DataError(f"{path}: is a directory; expected a .jsonl, .json or .parquet file")
  if not path.exists():
    raise DataError(f"{path}: no such file")
  rows = list(_read_rows(path))
  if not rows:
    raise DataError(f"{path}: file has no rows")
  for row in rows:
    if not isinstance(row.data, dict):
      raise DataError(f"{path}: {row.where}: expected an object, got {type(row.data).__name__}")
  return rows


def last_boxed(text: str) -> str | None:
  """Contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched; None if none."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  while start >= 0:
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
      i += 1
    if i < len(text) and text[i] == "{":
      depth = 0
      for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
          return text[i + 1 : j]
    # Unbalanced or not followed by a brace: try an earlier box.
    start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
  return None


def strip_dapo_template(text: str) -> str:
  """The bare problem inside the DAPO-Math-17k instruction template (unchanged if absent)."""
  if text.startswith(DAPO_PREFIX):
    text = text[len(DAPO_PREFIX) :]
  if text.endswith(DAPO_SUFFIX):
    text = text[: -len(DAPO_SUFFIX)]
  return text.strip()


def detect_layout(row: Mapping[str, Any]) -> str:
  """The layout a row's fields belong to; raises ValueError if none fits."""
  keys = set(row)
  if "prompt" in keys and "reward_model" in keys:
    return "dapo"
  if "problem" in keys and "answer" in keys:
    return "deepscaler"
  if "problem" in keys and "solution" in keys:
    return "math"
  if keys & {"Problem", "question", "Question"} and keys & {"answer", "Answer"}:
    return "aime"
  raise ValueError(f"no layout matches fields {sorted(keys)}")


def _get(row: _Row, keys: Sequence[str]) -> tuple[str, Any]:
  for key in keys:
    if key in row.data and row.data[key] is not None:
      return key, row.data[key]
  raise row.fail(keys[0] if len(keys) == 1 else " | ".join(keys), "missing")


def _text(row: _Row, field: str, value: Any, *, numbers: bool = False) -> str:
  if numbers and isinstance(value, float) and not math.isfinite(value):
    # JSON's NaN / Infinity (and parquet's NaN) would become the gold answers "nan" / "inf".
    raise row.fail(field, f"{value} is not an answer (JSON NaN/Infinity); write the real answer")
  if numbers and isinstance(value, int | float) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise row.fail(field, f"expected a string, got {type(value).__name__}")
  if not value.strip():
    raise row.fail(field, "empty")
  return value.strip()


def _messages(row: _Row, field: str, value: Any) -> tuple[dict[str, str], ...]:
  if not isinstance(value, list | tuple) or not value:
    raise row.fail(field, "expected a non-empty list of {role, content}")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
      raise row.fail(f"{field}[{i}].role", "missing")
    if not isinstance(m.get("content"), str):
      raise row.fail(f"{field}[{i}].content", "expected a string")
    out.append({"role": m["role"], "content": m["content"]})
  return tuple(out)


def _solution(row: _Row) -> str | None:
  """The row's optional worked solution (`solution` | `Solution`): None when absent or empty."""
  for key in ("solution", "Solution"):
    value = row.data.get(key)
    if value is None:
      continue
    if not isinstance(value, str):
      raise row.fail(key, f"expected a string (a worked solution), got {type(value).__name__}")
    return value.strip() or None
  return None


def _row_id(row: _Row, default: str) -> str:
  for key in _ID_KEYS:
    if row.data.get(key) is not None:
      return str(row.data[key])
  extra = row.data.get("extra_info")
  if isinstance(extra, Mapping) and extra.get("index") is not None:
    return str(extra["index"])
  return default


def _dapo(row: _Row) -> tuple[str, str, tuple | None]:
  messages = _messages(row, "prompt", _get(row, ["prompt"])[1])
  users = [m for m in messages if m["role"] == "user"]
  if not users:
    raise row.fail("prompt", "no user message")
  problem = strip_dapo_template(users[-1]["content"])
  if not problem:
    raise row.fail("prompt[-1].content", "empty")
  rm = _get(row, ["reward_model"])[1]
  if not isinstance(rm, Mapping) or rm.get("ground_truth") is None:
    raise row.fail("reward_model.ground_truth", "missing")
  answer = _text(row, "reward_model.ground_truth", rm["ground_truth"], numbers=True)
  return problem, answer, messages


def _plain(problem_keys: Sequence[str], answer_keys: Sequence[str]) -> Callable:
  def parse(row: _Row) -> tuple[str, str, None]:
    pkey, problem = _get(row, problem_keys)
    akey, answer = _get(row, answer_keys)
    return _text(row, pkey, problem), _text(row, akey, answer, numbers=True), None

  return parse


def _math(row: _Row) -> tuple[str, str, None]:
  problem = _text(row, "problem", _get(row, ["problem"])[1])
  if row.data.get("answer") is not None:
    return problem, _text(row, "answer", row.data["answer"], numbers=True), None
  solution = _text(row, "solution", _get(row, ["solution"])[1])
  answer = last_boxed(solution)
  if answer is None or not answer.strip():
    raise row.fail("solution", "no \\boxed{} answer")
  return problem, answer.strip(), None


_PARSERS = {
  "dapo": _dapo,
  "deepscaler": _plain(["problem"], ["answer"]),
  "math": _math,
  "aime": _plain(["problem", "Problem", "question", "Question"], ["answer", "Answer"]),
  "hmmt": _plain(["problem"], ["answer"]),
}


def load_problems(
  path: str | pathlib.Path,
  layout: str = "auto",
  *,
  dedupe: bool | None = None,
  limit: int | None = None,
) -> list[Problem]:
  """Reads problems from a local file; `dedupe` (default: dapo only) keeps each problem once."""
  if layout == "sft":
    raise DataError(f"{path}: layout 'sft' holds SFT examples; read it with load_sft")
  if layout != "auto" and layout not in _PARSERS:
    raise DataError(f"{path}: unknown layout {layout!r} (expected auto or one of {LAYOUTS})")
  rows = _rows(path)
  if layout == "auto":
    try:
      layout = detect_layout(rows[0].data)
    except ValueError as e:
      raise DataError(f"{rows[0].path}: {rows[0].where}: {e}; pass layout=") from None
  dedupe = layout == "dapo" if dedupe is None else dedupe
  parse, stem = _PARSERS[layout], pathlib.Path(path).stem
  problems, seen = [], set()
  for i, row in enumerate(rows):
    text, answer, messages = parse(row)
    if dedupe:
      if text in seen:
        continue
      seen.add(text)
    problems.append(
      Problem(
        id=_row_id(row, f"{stem}-{i}"),
        problem=text,
        answer=answer,
        messages=messages,
        metadata={"source": str(path), "layout": layout, "row": row.where},
        solution=_solution(row),
      )
    )
    if limit is not None and len(problems) >= limit:
      break
  return problems


def load_sft(path: str | pathlib.Path) -> list[SFTExample]:
  """Reads {prompt, response} or {messages: [...]} rows; loss on the last assistant turn."""
  examples = []
  for i, row in enumerate(_rows(path)):
    default_id = f"{pathlib.Path(path).stem}-{i}"
    if "messages" in row.data:
      messages = _messages(row, "messages", row.data["messages"])
      if messages[-1]["role"] != "assistant":
        raise row.fail(f"messages[{len(messages) - 1}].role", "last message must be 'assistant'")
      if len(messages) < 2:
        raise row.fail("messages", "needs at least one message before the assistant response")
      context, response = messages[:-1], messages[-1]["content"]
      if not response.strip():
        raise row.fail(f"messages[{len(messages) - 1}].content", "empty")
    else:
      prompt = _text(row, "prompt", _get(row, ["prompt"])[1])
      rkey, response = _get(row, ["response", "completion"])
      response = _text(row, rkey, response)
      context = ({"role": "user", "content": prompt},)
    examples.append(SFTExample(id=_row_id(row, default_id), messages=context, response=response))
  return examples


def filter_by_pass_rate(
  problems: Sequence[Problem],
  pass_rates: Mapping[str, float] | Sequence[float],
  low: float,
  high: float,
) -> list[Problem]:
  """Problems whose pass rate (by id, or aligned by position) lies in [low, high]."""
  if isinstance(pass_rates, Mapping):
    missing = [p.id for p in problems if p.id not in pass_rates]
    if missing:
      raise ValueError(f"no pass rate for {len(missing)} problems, e.g. {missing[:3]}")
    rates = [pass_rates[p.id] for p in problems]
  else:
    if len(pass_rates) != len(problems):
      raise ValueError(f"{len(pass_rates)} pass rates for {len(problems)} problems")
    rates = list(pass_rates)
  return [p for p, r in zip(problems, rates, strict=True) if low <= r <= high]
