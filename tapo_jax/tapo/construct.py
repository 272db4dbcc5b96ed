"""Micro-reflective constructions: y⁻'s own prefix, a correction, a continuation to the answer.

Legend: R rollout rows, T tokens per row, Q queries, K samples per query, M pairs per query,
C = Q*M construction rows (fixed; unused slots are invalid rows), V vocab.

Two constructions (config tapo.construction):
- `policy` (the paper's): the policy gets a synthesis prompt (template + query + y⁻ + y⁺, spliced
  on device from the padded rollouts) and writes `<analysis>…</analysis><reconstruction>…
  </reconstruction>`; outputs that do not parse strictly are dropped. The reconstruction is
  anchored to the learner: its longest common token prefix with y⁻ is y⁻'s own tokens (with their
  sampler logprobs), the rest is the policy's text re-tokenized (no valid sampler logprob).
- `divergence` (rule-based, no generation): y⁻ and y⁺ are split into steps at separator tokens
  (every vocabulary entry whose text holds a newline), compared ignoring whitespace-only tokens;
  the trajectory is y⁻ up to and including its first step that differs from y⁺, the diagnosis
  template, then y⁺ from the start of that same step. The differing step of y⁻ is kept on purpose:
  the diagnosis ("Wait, this step is wrong") refers to it. Everything runs on device.
Either way the trained row is the original query prompt followed by the constructed response,
graded by the injected verifier.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tapo_jax.tapo import dcs
from tapo_jax.tapo.batch import Rollouts, response_ids
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

_select = jax.jit(dcs.select_candidates, static_argnums=(2, 3, 4))

GenerateFn = Callable[[list[list[int]], int], Sequence[Sequence[int]]]
GradeFn = Callable[[list[str], list[Any]], Sequence[float]]


@flax.struct.dataclass
class TokenTables:
  """Per-vocabulary-entry flags used to find steps on device."""

  is_sep: jax.Array  # [V] bool  the token's text holds a newline: a step ends after it
  is_space: jax.Array  # [V] bool  the token's text is whitespace only: ignored when comparing
  is_eos: jax.Array  # [V] bool


def token_tables(tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> TokenTables:
  """Scans the vocabulary once (host); ids the tokenizer cannot decode are neither."""
  sep = np.zeros(vocab_size, bool)
  space = np.zeros(vocab_size, bool)
  for i in range(vocab_size):
    try:
      text = tokenizer.decode([i])
    except Exception:  # ids past the tokenizer's vocabulary (padded embeddings)
      continue
    sep[i] = "\n" in text
    space[i] = bool(text) and not text.strip()
  eos = np.zeros(vocab_size, bool)
  eos[list(eos_ids)] = True
  return TokenTables(jnp.asarray(sep), jnp.asarray(space & ~eos), jnp.asarray(eos))


# ----------------------------------------------------------------------------- shared row building


def _body_ends(batch: Rollouts, is_eos: jax.Array) -> jax.Array:
  """[R] end of each response without a final EOS token."""
  ends = batch.prompt_lens + batch.response_lens
  last = jnp.take_along_axis(batch.tokens, jnp.maximum(ends - 1, 0)[:, None], axis=1)[:, 0]
  drop = (batch.response_lens > 0) & is_eos[last]
  return ends - drop.astype(jnp.int32)


def _per_token(batch: Rollouts) -> dict[str, jax.Array]:
  return dict(tokens=batch.tokens, logprobs=batch.sampler_logprobs, from_learner=batch.from_learner)


def _inserted(tokens_N_W: jax.Array) -> dict[str, jax.Array]:
  """Per-token values of inserted text: no sampler logprob, not from the learner."""
  tokens = jnp.asarray(tokens_N_W, jnp.int32)
  return dict(
    tokens=tokens,
    logprobs=jnp.zeros(tokens.shape, jnp.float32),
    from_learner=jnp.zeros(tokens.shape, bool),
  )


def _rows(sp: Spliced, prompt_lens: jax.Array, group_ids: jax.Array, ok: jax.Array) -> Rollouts:
  """Constructed rows from spliced (prompt + response) rows; rewards filled in later."""
  t = jnp.arange(sp.positions.shape[1])[None]
  resp = (t >= prompt_lens[:, None]) & (t < sp.lengths[:, None]) & ok[:, None]
  return Rollouts(
    tokens=sp.values["tokens"],
    positions=sp.positions,
    loss_mask=resp,
    sampler_logprobs=jnp.where(resp, sp.values["logprobs"], 0.0),
    from_learner=resp & sp.values["from_learner"],
    prompt_lens=prompt_lens,
    response_lens=jnp.where(ok, sp.lengths - prompt_lens, 0),
    truncated=sp.overflow & ok,
    rewards=jnp.zeros(ok.shape, jnp.float32),
    group_ids=group_ids,
    is_constructed=jnp.ones(ok.shape, bool),
    valid=ok,
  )


def _pair_rows(batch: Rollouts, cands: dcs.Candidates, k: int):
  """(neg rows, pos rows, group ids of the constructions, valid) flattened to [C]."""
  neg, pos = cands.rows(k)
  q, m = cands.valid.shape
  group = q + jnp.repeat(jnp.arange(q, dtype=jnp.int32), m)
  return neg, pos, group, cands.valid.reshape(-1) & batch.valid[neg] & batch.valid[pos]


# ------------------------------------------------------------------------------------- divergence


def _content(tokens_T, start, end, ignore_V):
  """Tokens of [start, end) that are not ignored, compacted to the front: (ids, at, count)."""
  t = jnp.arange(tokens_T.shape[0], dtype=jnp.int32)
  keep = (t >= start) & (t < end) & ~ignore_V[tokens_T]
  rank = jnp.cumsum(keep) - 1
  at = jnp.zeros_like(t).at[jnp.where(keep, rank, t.shape[0])].set(t, mode="drop")
  return tokens_T[at], at, keep.sum()


def _divergence_cut(neg_T, neg_start, neg_end, pos_T, pos_start, pos_end, tables: TokenTables):
  """One pair: (end of y⁻'s first differing step, start of that step in y⁺, ok) in row coords."""
  c_neg, at_neg, n_neg = _content(neg_T, neg_start, neg_end, tables.is_space)
  c_pos, at_pos, n_pos = _content(pos_T, pos_start, pos_end, tables.is_space)
  t = jnp.arange(neg_T.shape[0], dtype=jnp.int32)
  n_common = jnp.minimum(n_neg, n_pos)
  differ = (t < n_common) & (c_neg != c_pos)
  d = jnp.where(differ.any(), jnp.argmax(differ), n_common)  # first differing content index
  ok = d < n_pos  # y⁺ has something to continue with (false when identical)
  d_neg = jnp.where(d < n_neg, at_neg[jnp.minimum(d, t.shape[0] - 1)], neg_end)
  d_pos = jnp.where(ok, at_pos[jnp.minimum(d, t.shape[0] - 1)], pos_end)
  sep_after = tables.is_sep[neg_T] & (t >= d_neg) & (t < neg_end)
  neg_cut = jnp.where(sep_after.any(), jnp.argmax(sep_after) + 1, neg_end)
  sep_before = tables.is_sep[pos_T] & (t >= pos_start) & (t < d_pos)
  last = jnp.max(jnp.where(sep_before, t, -1))
  pos_from = jnp.where(last >= 0, last + 1, pos_start)
  return neg_cut.astype(jnp.int32), pos_from.astype(jnp.int32), ok


@functools.partial(jax.jit, static_argnames=("k",))
def divergence_rows(
  batch: Rollouts,
  cands: dcs.Candidates,
  diagnosis_ids: jax.Array,
  joiner_id: jax.Array,
  tables: TokenTables,
  *,
  k: int,
) -> tuple[Rollouts, jax.Array]:
  """The C divergence constructions (rewards unset) and their anchored-prefix lengths [C]."""
  neg, pos, group, valid = _pair_rows(batch, cands, k)
  body = _body_ends(batch, tables.is_eos)
  ends = batch.prompt_lens + batch.response_lens
  plen = batch.prompt_lens
  cut = jax.vmap(functools.partial(_divergence_cut, tables=tables))
  neg_cut, pos_from, ok = cut(
    batch.tokens[neg], plen[neg], body[neg], batch.tokens[pos], plen[pos], body[pos]
  )
  ok &= valid
  last = jnp.take_along_axis(batch.tokens[neg], jnp.maximum(neg_cut - 1, 0)[:, None], 1)[:, 0]
  join = (neg_cut > plen[neg]) & ~tables.is_sep[last] & (joiner_id >= 0)
  c = neg.shape[0]
  zeros = jnp.zeros((c,), jnp.int32)
  sp = splice(
    (
      jax.tree.map(lambda x: x[neg], _per_token(batch)),
      _inserted(jnp.maximum(joiner_id, 0).reshape(1, 1)),
      _inserted(diagnosis_ids[None]),
      _inserted(batch.tokens[pos]),  # y⁺'s tokens in a new context: no valid sampler logprob
    ),
    (zeros, zeros, zeros, pos_from),
    (neg_cut, join.astype(jnp.int32), zeros + diagnosis_ids.shape[0], ends[pos]),
    out_len=batch.tokens.shape[1],
  )
  rows = _rows(sp, plen[neg], group, ok)
  rows = rows.replace(truncated=rows.truncated | (ok & batch.truncated[pos]))  # y⁺ had no end
  return rows, jnp.where(ok, neg_cut - plen[neg], 0)


# ----------------------------------------------------------------------------------------- policy


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


def template_ids(tokenizer, template: str, chat: bool = False) -> tuple[list[list[int]], list[str]]:
  """Token ids of the template's literal pieces (wrapped in the chat template when `chat`)."""
  if chat:
    template = tokenizer.apply_chat_template(
      [{"role": "user", "content": template}], tokenize=False, add_generation_prompt=True
    )
  pieces, names = template_parts(template)
  return [list(tokenizer.encode(p, add_special_tokens=False)) for p in pieces], names


@functools.partial(jax.jit, static_argnames=("k", "names"))
def synthesis_prompts(
  batch: Rollouts,
  cands: dcs.Candidates,
  pieces: tuple[jax.Array, ...],
  query_tokens: jax.Array,
  query_lens: jax.Array,
  is_eos: jax.Array,
  *,
  k: int,
  names: tuple[str, ...],
) -> Spliced:
  """[C] synthesis prompts: the template's pieces spliced with the query, y⁻ and y⁺ (no EOS)."""
  neg, pos, _, _ = _pair_rows(batch, cands, k)
  body = _body_ends(batch, is_eos)
  query = neg // k
  zeros = jnp.zeros_like(neg)
  fields = {
    "query": (query_tokens[query], zeros, query_lens[query]),
    "incorrect": (batch.tokens[neg], batch.prompt_lens[neg], body[neg]),
    "correct": (batch.tokens[pos], batch.prompt_lens[pos], body[pos]),
  }
  sources, starts, ends = [], [], []
  for i, piece in enumerate(pieces):
    sources.append({"tokens": piece[None]})
    starts.append(zeros)
    ends.append(zeros + piece.shape[0])
    if i < len(names):
      src, s, e = fields[names[i]]
      sources.append({"tokens": src})
      starts.append(s)
      ends.append(e)
  width = sum(p.shape[0] for p in pieces) + query_tokens.shape[1] + 2 * batch.tokens.shape[1]
  return splice(tuple(sources), tuple(starts), tuple(ends), out_len=width)


_TAGS = ("<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>")
_FORMAT = re.compile(
  r"\A\s*<analysis>(.*?)</analysis>\s*<reconstruction>(.*?)</reconstruction>\s*\Z", re.DOTALL
)


def parse_construction(text: str) -> tuple[str, str] | None:
  """(analysis, reconstruction) when `text` is exactly one analysis then one non-empty
  reconstruction block (whitespace around them allowed, nothing else); None otherwise."""
  if any(text.count(tag) != 1 for tag in _TAGS):
    return None
  m = _FORMAT.match(text)
  if m is None or not m.group(2).strip():
    return None
  return m.group(1).strip(), m.group(2).strip()


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common prefix of two token sequences."""
  n = min(len(a), len(b))
  if n == 0:
    return 0
  diff = np.asarray(a[:n]) != np.asarray(b[:n])
  return int(np.argmax(diff)) if diff.any() else n


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
  neg, _, group, valid = _pair_rows(batch, cands, k)
  plen = batch.prompt_lens[neg]
  zeros = jnp.zeros_like(neg)
  sp = splice(
    (jax.tree.map(lambda x: x[neg], _per_token(batch)), _inserted(rest_ids)),
    (zeros, zeros),
    (plen + prefix_lens, rest_lens),
    out_len=batch.tokens.shape[1],
  )
  return _rows(sp, plen, group, ok & valid)


def policy_rows(
  batch: Rollouts,
  cands: dcs.Candidates,
  *,
  k: int,
  tokenizer,
  generate_fn: GenerateFn,
  template: str,
  tables: TokenTables,
  eos_ids: Sequence[int],
  max_new_tokens: int,
  query_tokens: jax.Array | None = None,
  query_lens: jax.Array | None = None,
  chat: bool = False,
) -> tuple[Rollouts, jax.Array, dict[str, float]]:
  """The paper's construction: prompt the policy, parse, anchor; (rows, prefix lens, counts)."""
  if query_tokens is None:  # the rollout's own prompt stands for the query
    query_tokens, query_lens = batch.tokens[::k], batch.prompt_lens[::k]
  piece_ids, names = template_ids(tokenizer, template, chat)
  pieces = tuple(jnp.asarray(p, jnp.int32).reshape(-1) for p in piece_ids)
  sp = synthesis_prompts(
    batch, cands, pieces, query_tokens, query_lens, tables.is_eos, k=k, names=tuple(names)
  )
  neg_rows, _, _, valid = _pair_rows(batch, cands, k)
  valid = np.asarray(valid)
  prompt_tok, prompt_len = jax.device_get((sp.values["tokens"], sp.lengths))
  todo = np.flatnonzero(valid)
  outs = generate_fn([prompt_tok[i, : prompt_len[i]].tolist() for i in todo], max_new_tokens)
  c, t = valid.shape[0], batch.tokens.shape[1]
  negs = response_ids(jax.tree.map(lambda x: x[neg_rows], batch), eos_ids)
  eos = set(eos_ids)
  prefix = np.zeros(c, np.int32)
  rest = np.zeros((c, t), np.int32)
  rest_len = np.zeros(c, np.int32)
  ok = np.zeros(c, bool)
  for i, out in zip(todo, outs, strict=True):
    out = [int(x) for x in out if int(x) not in eos]
    parsed = parse_construction(tokenizer.decode(out))
    if parsed is None:
      continue
    recon = list(tokenizer.encode(parsed[1], add_special_tokens=False))
    n = common_prefix_len(recon, negs[i])
    tail = recon[n:] + list(eos_ids[:1])
    prefix[i], rest_len[i], ok[i] = n, min(len(tail), t), True
    rest[i, : rest_len[i]] = tail[:t]
  rows = anchored_rows(
    batch,
    cands,
    jnp.asarray(prefix),
    jnp.asarray(rest),
    jnp.asarray(rest_len),
    jnp.asarray(ok),
    k=k,
  )
  return rows, jnp.asarray(prefix), {"tapo/constructions_parsed": float(ok.sum())}


# ------------------------------------------------------------------------------------- top level


def construct(
  batch: Rollouts,
  golds: Sequence[Any],
  key: jax.Array,
  cfg,
  *,
  k: int,
  tokenizer,
  grade_fn: GradeFn,
  tables: TokenTables,
  eos_ids: Sequence[int],
  generate_fn: GenerateFn | None = None,
  queries: Sequence[str] | None = None,
  chat: bool = False,
) -> tuple[Rollouts, dict[str, float]]:
  """DCS -> constructions -> verifier: C = Q*m_max rows to append to the K*Q originals.

  `batch` holds the originals (prompt-major, K per query, rewards set), `golds` one answer per
  query, `cfg` the `tapo` config section. `generate_fn(prompts, max_new_tokens)` returns one
  completion (token ids) per prompt and is needed by `policy` only; `grade_fn(texts, golds)`
  returns one reward per text. `queries` (the problem texts, one per query) fill the synthesis
  prompt's {query}; without them the rollouts' own (possibly chat-formatted) prompts do.
  Constructions that fail (unparsable, no divergence) are invalid rows; the rest are graded.
  """
  q = batch.num_rows // k
  correct = (batch.rewards > 0.5).reshape(q, k) & batch.valid.reshape(q, k)
  cands = _select(correct, key, cfg.n_pos, cfg.n_neg, cfg.m_max)
  metrics = {n: float(v) for n, v in dcs.dcs_metrics(cands).items()}
  if cfg.construction == "divergence":
    diag = tokenizer.encode(cfg.diagnosis_template, add_special_tokens=False)
    nl = tokenizer.encode("\n", add_special_tokens=False)
    joiner = jnp.int32(nl[0] if len(nl) == 1 else -1)
    rows, prefix = divergence_rows(
      batch, cands, jnp.asarray(diag, jnp.int32).reshape(-1), joiner, tables, k=k
    )
    metrics["tapo/constructions_parsed"] = float(rows.valid.sum())
  elif cfg.construction == "policy":
    if generate_fn is None:
      raise ValueError("tapo.construction=policy needs a generate_fn")
    query_tokens = query_lens = None
    if queries is not None:
      ids = [list(tokenizer.encode(text, add_special_tokens=False)) for text in queries]
      query_lens = jnp.asarray([len(x) for x in ids], jnp.int32)
      padded = np.zeros((len(ids), max(1, max(map(len, ids)))), np.int32)
      for i, x in enumerate(ids):
        padded[i, : len(x)] = x
      query_tokens = jnp.asarray(padded)
    rows, prefix, counts = policy_rows(
      batch,
      cands,
      k=k,
      tokenizer=tokenizer,
      generate_fn=generate_fn,
      template=cfg.synthesis_template or SYNTHESIS_TEMPLATE,
      tables=tables,
      eos_ids=eos_ids,
      max_new_tokens=cfg.synthesis_max_new_tokens,
      query_tokens=query_tokens,
      query_lens=query_lens,
      chat=chat,
    )
    metrics.update(counts)
  else:
    raise ValueError(f"tapo.construction={cfg.construction!r}: expected policy or divergence")
  idx = np.flatnonzero(np.asarray(rows.valid))
  rewards = np.zeros(rows.num_rows, np.float32)
  if idx.size:
    graded = jax.tree.map(lambda x: x[idx], rows)
    texts = [tokenizer.decode(ids) for ids in response_ids(graded, eos_ids)]
    query = np.asarray(graded.group_ids) - q
    rewards[idx] = np.asarray(grade_fn(texts, [golds[j] for j in query]))
  rows = rows.replace(rewards=jnp.asarray(rewards))
  resp = np.maximum(np.asarray(rows.response_lens), 1)
  frac = np.asarray(prefix) / resp
  metrics.update(
    {
      "tapo/constructions_attempted": float(np.asarray(cands.valid).sum()),
      "tapo/constructions_correct": float((rewards[idx] > 0.5).sum()),
      "tapo/constructions_truncated": float(np.asarray(rows.truncated).sum()),
      "tapo/anchored_fraction": float(frac[idx].mean()) if idx.size else 0.0,
    }
  )
  return rows, metrics
