"""The paper's construction: the policy rewrites y⁻ given y⁺; the rewrite is anchored to y⁻.

Legend: T tokens per row, C construction rows, Q queries, W synthesis prompt width.

Two pure halves around one generation the loop runs itself: `requests` (1.) and `rows` (3.).
  1. `synthesis_prompts` (jitted): for each candidate pair, the template's literal pieces spliced
     on device with the query, y⁻ and y⁺ (responses without EOS); `prompt_lists` hands the valid
     ones to the sampler as token lists.
  2. The loop samples one completion per prompt (its synthesis engine) — nothing here generates.
  3. `anchor` (host): an output must be exactly `<analysis>…</analysis><reconstruction>…
     </reconstruction>`, optionally after one `<think>…</think>` block (a thinking model's);
     unparsable ones are dropped. The reconstruction is anchored to y⁻ on text: the longest
     common prefix of y⁻'s decoded text and the reconstruction (y⁻'s leading whitespace kept),
     cut back to a boundary between y⁻'s own tokens, is taken as y⁻'s exact tokens (with their
     sampler logprobs: on-policy, whatever BPE split y⁻ was sampled with); the rest is the
     policy's text re-tokenized. A construction that keeps nothing of y⁻ but whitespace, or
     fewer than `min_anchor` x |y⁻| tokens, is a full reconstruction and is dropped
     (`anchor_prefix=False` is the ablation that keeps them all and anchors nothing).
     `anchored_rows` (jitted) splices query prompt + y⁻'s prefix + the rest + EOS into rows.
  4. The loop grades the rows like its rollouts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tapo_jax.tapo import dcs
from tapo_jax.tapo.batch import Rollouts, response_ids, take_rows
from tapo_jax.tapo.construct import (
  body_ends,
  constructed_rows,
  inserted_tokens,
  learner_tokens,
  pair_rows,
)
from tapo_jax.tapo.splice import Spliced, splice

SYNTHESIS_TEMPLATE = """\
Below are a math problem and two solutions to it written by the same student: the first one is \
incorrect, the second one is correct.

Problem:
{query}

Incorrect solution:
{incorrect}

Correct solution:
{correct}

Find the first critical error in the incorrect solution. Then rewrite the incorrect solution: copy \
it verbatim up to and including the step that holds that error, insert a short correction that \
starts with "Wait," and says what went wrong, and continue from there to the correct final answer \
in the student's own style (the correct solution may guide you). Answer in exactly this format:
<analysis>where the first critical error is and why it is wrong</analysis>
<reconstruction>the rewritten solution</reconstruction>"""

PLACEHOLDERS = ("query", "incorrect", "correct")


def template_parts(template: str) -> tuple[list[str], list[str]]:
  """Literal pieces and placeholder names in order: pieces[0] {p0} pieces[1] {p1} ... pieces[-1].

  Each of {query}, {incorrect}, {correct} must appear exactly once; other braces must be doubled
  (str.format rules)."""
  pieces, names, literal = [], [], ""
  for text, field, spec, conv in string.Formatter().parse(template):
    literal += text
    if field is None:
      continue
    if field not in PLACEHOLDERS or spec or conv:
      raise ValueError(f"synthesis template: unknown field {{{field}}}; use {PLACEHOLDERS}")
    pieces.append(literal)
    names.append(field)
    literal = ""
  pieces.append(literal)
  if sorted(names) != sorted(PLACEHOLDERS):
    raise ValueError(f"synthesis template must hold each of {PLACEHOLDERS} once, got {names}")
  return pieces, names


def prompt_buckets(longest: int, smallest: int = 64) -> tuple[int, ...]:
  """Prefill buckets for synthesis prompts of at most `longest` tokens: powers of two from
  `smallest` below `longest`, then `longest` rounded up to 64."""
  top = -(-longest // 64) * 64
  return tuple(sorted({b for b in (smallest << i for i in range(24)) if b < top} | {top}))


@dataclasses.dataclass(frozen=True)
class Template:
  """A synthesis template as token ids: literal pieces around the placeholders, in order."""

  pieces: tuple[tuple[int, ...], ...]
  names: tuple[str, ...]

  @property
  def literal_tokens(self) -> int:
    return sum(map(len, self.pieces))


def encode_template(tokenizer, template: str, chat: bool = False) -> Template:
  """The template's pieces as ids (wrapped in the tokenizer's chat template when `chat`)."""
  if chat:
    template = tokenizer.apply_chat_template(
      [{"role": "user", "content": template}], tokenize=False, add_generation_prompt=True
    )
  pieces, names = template_parts(template)
  ids = tuple(tuple(tokenizer.encode(p, add_special_tokens=False)) for p in pieces)
  return Template(pieces=ids, names=tuple(names))


def encode_queries(tokenizer, queries: Sequence[str]) -> tuple[jax.Array, jax.Array]:
  """(ids [Q, L] right-padded, lengths [Q]) of the problem texts that fill {query}."""
  ids = [list(tokenizer.encode(text, add_special_tokens=False)) for text in queries]
  padded = np.zeros((len(ids), max(1, max(map(len, ids), default=1))), np.int32)
  for i, x in enumerate(ids):
    padded[i, : len(x)] = x
  return jnp.asarray(padded), jnp.asarray([len(x) for x in ids], jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "template"))
def synthesis_prompts(
  batch: Rollouts,
  cands: dcs.Candidates,
  query_tokens: jax.Array,
  query_lens: jax.Array,
  is_eos: jax.Array,
  *,
  k: int,
  template: Template,
) -> Spliced:
  """[C] synthesis prompts: the template's pieces spliced with the query, y⁻ and y⁺ (no EOS)."""
  neg, pos, _, _ = pair_rows(batch, cands, k)
  body = body_ends(batch, is_eos)
  query = neg // k
  zeros = jnp.zeros_like(neg)
  fields = {
    "query": (query_tokens[query], zeros, query_lens[query]),
    "incorrect": (batch.tokens[neg], batch.prompt_lens[neg], body[neg]),
    "correct": (batch.tokens[pos], batch.prompt_lens[pos], body[pos]),
  }
  sources, starts, ends = [], [], []
  for i, piece in enumerate(template.pieces):
    sources.append({"tokens": jnp.asarray(piece, jnp.int32).reshape(1, -1)})
    starts.append(zeros)
    ends.append(zeros + len(piece))
    if i < len(template.names):
      src, s, e = fields[template.names[i]]
      sources.append({"tokens": src})
      starts.append(s)
      ends.append(e)
  width = template.literal_tokens + query_tokens.shape[1] + 2 * batch.tokens.shape[1]
  return splice(tuple(sources), tuple(starts), tuple(ends), out_len=width)


def prompt_lists(sp: Spliced, valid: jax.Array) -> tuple[np.ndarray, list[list[int]]]:
  """(indices of the valid pairs, their synthesis prompts as token lists) for the sampler."""
  tokens, lengths, valid = jax.device_get((sp.values["tokens"], sp.lengths, valid))
  todo = np.flatnonzero(valid)
  return todo, [tokens[i, : lengths[i]].tolist() for i in todo]


_TAGS = ("<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>")
_FORMAT = re.compile(
  r"\A\s*<analysis>(.*?)</analysis>\s*<reconstruction>(.*?)</reconstruction>\s*\Z", re.DOTALL
)
_THINK = re.compile(r"\A\s*<think>.*?</think>", re.DOTALL)


def parse_construction(text: str) -> tuple[str, str] | None:
  """(analysis, reconstruction) when `text` is exactly one analysis then one non-empty
  reconstruction block (whitespace around them allowed, and one leading <think>…</think> block;
  nothing else); None otherwise."""
  think = _THINK.match(text)
  if think is not None:
    text = text[think.end() :]
  if any(text.count(tag) != 1 for tag in _TAGS):
    return None
  m = _FORMAT.match(text)
  if m is None or not m.group(2).strip():
    return None
  return m.group(1).strip(), m.group(2).strip()


def anchor_text(tokenizer, negative: Sequence[int], reconstruction: str) -> tuple[int, str]:
  """(n, rest): y⁻'s first n tokens are the longest prefix of y⁻, cut at its own token
  boundaries, whose text starts the reconstruction (y⁻'s leading whitespace kept: the
  reconstruction arrives stripped); `rest` is the reconstruction after that text."""
  neg_text = tokenizer.decode(list(negative))
  lead = len(neg_text) - len(neg_text.lstrip())
  target = neg_text[:lead] + reconstruction.lstrip()
  limit = min(len(neg_text), len(target))
  common = next((i for i in range(limit) if neg_text[i] != target[i]), limit)

  def fits(n: int) -> bool:
    text = tokenizer.decode(list(negative[:n]))
    return len(text) <= common and target.startswith(text)

  lo, hi = 0, len(negative)  # prefix texts grow with n: the largest n that fits, by bisection
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  while lo and not fits(lo):  # a partial UTF-8 character decodes to U+FFFD: step back
    lo -= 1
  return lo, target[len(tokenizer.decode(list(negative[:lo]))) :]


def full_reconstruction(tokenizer, negative: Sequence[int], n: int, min_anchor: float) -> bool:
  """Whether keeping y⁻'s first n tokens keeps too little of it: nothing but whitespace (which
  anchors nothing), or fewer than min_anchor x |y⁻| tokens."""
  kept = tokenizer.decode(list(negative[:n])).strip()
  return not kept or n < min_anchor * len(negative)


@dataclasses.dataclass(frozen=True)
class Anchored:
  """Per construction slot [C]: y⁻ tokens kept, the policy's remaining tokens, outcome."""

  prefix_lens: np.ndarray  # [C] int32  response tokens of y⁻ kept as they were sampled
  rest: np.ndarray  # [C, T] int32  the reconstruction after that prefix, then EOS
  rest_lens: np.ndarray  # [C] int32
  ok: np.ndarray  # [C] bool  parsed and anchored: a row
  parsed: np.ndarray  # [C] bool  the output had the format
  too_short: np.ndarray  # [C] bool  parsed, but dropped for keeping too little of y⁻

  def metrics(self, prompted: int) -> dict[str, float]:
    n = max(prompted, 1)
    return {
      "tapo/parse_rate": float(self.parsed.sum()) / n,
      "tapo/dropped_for_anchor": float(self.too_short.sum()),
    }


def anchor(
  tokenizer,
  todo: Sequence[int],
  outputs: Sequence[Sequence[int]],
  negatives: Sequence[Sequence[int]],
  *,
  slots: int,
  width: int,
  eos_ids: Sequence[int],
  min_anchor: float = 0.0,
  anchor_prefix: bool = True,
) -> Anchored:
  """Parses each output (for slot todo[i]) and anchors its reconstruction to y⁻ = negatives[slot]
  (response ids without EOS)."""
  eos = set(eos_ids)
  out = Anchored(
    prefix_lens=np.zeros(slots, np.int32),
    rest=np.zeros((slots, width), np.int32),
    rest_lens=np.zeros(slots, np.int32),
    ok=np.zeros(slots, bool),
    parsed=np.zeros(slots, bool),
    too_short=np.zeros(slots, bool),
  )
  for i, ids in zip(todo, outputs, strict=True):
    ids = [int(x) for x in ids if int(x) not in eos]
    parsed = parse_construction(tokenizer.decode(ids, skip_special_tokens=True))
    if parsed is None:
      continue
    out.parsed[i] = True
    n, text = anchor_text(tokenizer, negatives[i], parsed[1]) if anchor_prefix else (0, parsed[1])
    if anchor_prefix and full_reconstruction(tokenizer, negatives[i], n, min_anchor):
      out.too_short[i] = True
      continue
    tail = list(tokenizer.encode(text, add_special_tokens=False)) + list(eos_ids[:1])
    out.prefix_lens[i], out.rest_lens[i], out.ok[i] = n, min(len(tail), width), True
    out.rest[i, : out.rest_lens[i]] = tail[:width]
  return out


@functools.partial(jax.jit, static_argnames=("k",))
def anchored_rows(
  batch: Rollouts,
  cands: dcs.Candidates,
  prefix_lens: jax.Array,
  rest_ids: jax.Array,
  rest_lens: jax.Array,
  ok: jax.Array,
  *,
  k: int,
) -> Rollouts:
  """[C] rows: query prompt + y⁻'s first prefix_lens response tokens + rest_ids[:rest_lens]."""
  neg, _, group, valid = pair_rows(batch, cands, k)
  plen = batch.prompt_lens[neg]
  zeros = jnp.zeros_like(neg)
  sp = splice(
    (learner_tokens(batch, neg), inserted_tokens(rest_ids)),
    (zeros, zeros),
    (plen + prefix_lens, rest_lens),
    out_len=batch.tokens.shape[1],
  )
  return constructed_rows(sp, plen, group, ok & valid)


@dataclasses.dataclass(frozen=True)
class Requests:
  """What the loop samples for a step's constructions, and what `rows` needs back."""

  todo: np.ndarray  # [P] int  the construction slots that have a synthesis prompt
  prompts: list[list[int]]  # P synthesis prompts (token ids), one completion each
  negatives: list[list[int]]  # C  y⁻ of every slot: response ids without EOS


def requests(
  batch: Rollouts,
  cands: dcs.Candidates,
  queries: Sequence[str],
  tokenizer,
  is_eos: jax.Array,
  *,
  k: int,
  template: Template,
  eos_ids: Sequence[int],
) -> Requests:
  """The first half: the step's synthesis prompts (`synthesis_prompts` on the eligible pairs of
  `cands`). `queries`: the Q problem texts; `is_eos` [V]: construct.token_tables' EOS table."""
  query_tokens, query_lens = encode_queries(tokenizer, queries)
  sp = synthesis_prompts(batch, cands, query_tokens, query_lens, is_eos, k=k, template=template)
  neg, _, _, valid = pair_rows(batch, cands, k)
  todo, prompts = prompt_lists(sp, valid)
  negatives = response_ids(take_rows(batch, neg), eos_ids)
  return Requests(todo, prompts, negatives)


def rows(
  tokenizer,
  req: Requests,
  outputs: Sequence[Sequence[int]],
  batch: Rollouts,
  cands: dcs.Candidates,
  *,
  k: int,
  eos_ids: Sequence[int],
  min_anchor: float,
  anchor_prefix: bool,
) -> tuple[Rollouts, np.ndarray, dict[str, float]]:
  """The second half: the sampled `outputs` (one per request) parsed, anchored to y⁻ and spliced
  into rows. Returns (rows [C], y⁻ tokens kept per slot [C], parse metrics)."""
  anchored = anchor(
    tokenizer,
    req.todo,
    outputs,
    req.negatives,
    slots=len(req.negatives),
    width=batch.tokens.shape[1],
    eos_ids=eos_ids,
    min_anchor=min_anchor,
    anchor_prefix=anchor_prefix,
  )
  out = anchored_rows(
    batch, cands, anchored.prefix_lens, anchored.rest, anchored.rest_lens, anchored.ok, k=k
  )
  # the share of y⁻ the anchored prefix keeps, over the attempted constructions (0 if not built)
  kept = sum(
    anchored.prefix_lens[i] / max(len(req.negatives[i]), 1) for i in req.todo if anchored.ok[i]
  )
  metrics = {**anchored.metrics(len(req.todo)), "tapo/kept_fraction": kept / max(len(req.todo), 1)}
  return out, anchored.prefix_lens, metrics
