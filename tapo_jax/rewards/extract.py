r"""Final-answer extraction, in one of two modes that follow the prompt; no fallbacks.

  "boxed" (default)   the content of the last brace-matched \boxed{...} / \fbox{...}
  "answer_line"       the text after "Answer:" on the last non-empty line (DAPO's template: "The
                      last line of your response should be of the form Answer: $Answer"); a
                      \boxed{} on that line is unwrapped, $...$ delimiters and a final period
                      dropped. Accepted markers: `Answer:`, `Final Answer:`, any case, with
                      markdown emphasis or a heading mark around them (`**Answer:** 5`).

Both read only the text after the last </think>. Neither falls back to the other, nor to the last
number in the text: a response without the form its prompt asked for has no answer.
Everything here is a linear scan (no backtracking regexes), so it is safe to run in the trainer
process on arbitrary model text.
"""

EXTRACT_MODES = ("boxed", "answer_line")  # reward.extract
MAX_BOXED_CHARS = 1000  # longer boxed text (or answer line) is treated as no answer
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_THINK_END = "</think>"


def _match_braces(text: str, start: int) -> int:
  """Index just past the brace group opening at text[start] == '{', or -1 if unbalanced."""
  depth = 0
  i = start
  n = len(text)
  while i < n:
    c = text[i]
    if c == "\\":  # an escaped brace \{ or \} does not count
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return -1


def _box_argument(text: str, pos: int) -> tuple[str | None, int]:
  r"""The argument of the box command ending at `pos`, and the index just past it.

  `\boxed{...}` takes a brace group; `\boxed 5` takes the following run of non-space characters
  up to a `$`, a newline, or a sentence-ending punctuation mark.
  """
  n = len(text)
  i = pos
  while i < n and text[i] in " \t":
    i += 1
  if i < n and text[i] == "{":
    end = _match_braces(text, i)
    if end < 0:
      return None, n
    return text[i + 1 : end - 1], end
  if i == pos:  # "\boxedx" is another command, not a box
    return None, pos
  j = i
  while j < n and not text[j].isspace() and text[j] not in "$\\":
    j += 1
  arg = text[i:j].rstrip(".,;:")
  return (arg or None), j


def _top_level_boxes(text: str) -> list[tuple[int, int]]:
  """(start, end) spans of every top-level box command, in order."""
  spans = []
  i = 0
  n = len(text)
  next_at = {cmd: text.find(cmd) for cmd in _BOX_COMMANDS}  # cached so the scan stays linear
  while i < n:
    for cmd, k in next_at.items():
      if 0 <= k < i:
        next_at[cmd] = text.find(cmd, i)
    found = [(k, len(cmd)) for cmd, k in next_at.items() if k >= 0]
    if not found:
      break
    nxt, cmd_len = min(found)
    after = nxt + cmd_len
    if after < n and text[after].isalpha():  # e.g. \boxedsymbol
      i = after
      continue
    arg, end = _box_argument(text, after)
    if arg is not None:
      spans.append((nxt, end))
    i = max(end, after)
  return spans


def _unwrap(arg: str) -> str:
  r"""Strip nested boxes: \boxed{\boxed{5}} -> 5."""
  for _ in range(8):
    s = arg.strip()
    spans = _top_level_boxes(s)
    if len(spans) != 1 or spans[0] != (0, len(s)):
      return s
    for cmd in _BOX_COMMANDS:
      if s.startswith(cmd):
        inner, _ = _box_argument(s, len(cmd))
        if inner is None:
          return s
        arg = inner
        break
  return arg.strip()


def _last_box(response: str) -> str | None:
  """The unwrapped content of the last top-level box in `response`, or None."""
  spans = _top_level_boxes(response)
  if not spans:
    return None
  start, _ = spans[-1]
  cmd = next(c for c in _BOX_COMMANDS if response.startswith(c, start))
  arg, _ = _box_argument(response, start + len(cmd))
  if arg is None or len(arg) > MAX_BOXED_CHARS:
    return None
  arg = _unwrap(arg)
  return arg or None


_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_EMPHASIS = "*_#> \t"


def _answer_line(response: str) -> str | None:
  """The answer on a last line `Answer: ...` (see the module docstring), or None."""
  end = len(response.rstrip())
  line = response[response.rfind("\n", 0, end) + 1 : end].strip()
  if len(line) > MAX_BOXED_CHARS + 100:
    return None
  rest = line.lstrip(_EMPHASIS)
  low = rest.lower()
  for marker in ("final answer", "answer"):
    if low.startswith(marker):
      rest = rest[len(marker) :].lstrip(_EMPHASIS)
      break
  else:
    return None
  if not rest.startswith(":"):
    return None
  rest = rest[1:].strip().lstrip("*_").strip()
  if _top_level_boxes(rest):
    return _last_box(rest)
  rest = rest.rstrip("*_ \t").rstrip(".").strip()
  for left, right in _DELIMITERS:
    if len(rest) >= len(left) + len(right) and rest.startswith(left) and rest.endswith(right):
      rest = rest[len(left) : -len(right)].strip()
      break
  rest = rest.rstrip(".").strip()
  return rest if rest and len(rest) <= MAX_BOXED_CHARS else None


def extract_answer(response: str, extract: str = "boxed") -> str | None:
  r"""The final answer in `response` after </think> by `extract` mode (EXTRACT_MODES), or None.

  "boxed": the content of the last top-level \boxed{} / \fbox{}; "answer_line": the text after
  "Answer:" on the last non-empty line. Raises ValueError for an unknown mode.
  """
  if extract not in EXTRACT_MODES:
    raise ValueError(f"unknown answer extraction {extract!r}; expected one of {EXTRACT_MODES}")
  if not isinstance(response, str):
    return None
  think = response.rfind(_THINK_END)
  if think >= 0:
    response = response[think + len(_THINK_END) :]
  if extract == "answer_line":
    return _answer_line(response)
  return _last_box(response)
