"""Constructions: divergence cases, synthesis prompts, strict parsing, anchoring, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapo_jax.tapo import construct as con
from tapo_jax.tapo import divergence, synthesis
from tapo_jax.tapo.batch import pack_rollouts, response_ids, take_rows
from tapo_jax.tapo.dcs import Candidates


class CharTokenizer:
  """ids 0 <pad>, 1 <eos>, then printable ASCII and newline, one id per character."""

  def __init__(self):
    self.itos = ["<pad>", "<eos>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    self.stoi = {c: i for i, c in enumerate(self.itos)}

  def encode(self, text, add_special_tokens=False):
    return [self.stoi[c] for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return "".join(self.itos[i] for i in ids if not (skip_special_tokens and i < 2))

  def __len__(self):
    return len(self.itos)


TOK = CharTokenizer()
EOS = 1
TABLES = con.token_tables(TOK, len(TOK), [EOS])
DIAG = "Wait, this step is wrong. Let me redo it.\n"
PROMPT = "Compute 12+7+30."
GOOD = "12+7=19\n19+30=49\n\\boxed{49}"


def pack(pairs, max_len=128, logprob_seed=0):
  """pairs: [(y⁺ text, y⁻ text, y⁻ ends with EOS)] -> K = 2 rollouts per query (y⁺, y⁻)."""
  rng = np.random.default_rng(logprob_seed)
  resp = []
  for pos, neg, neg_eos in pairs:
    resp.append(TOK.encode(pos) + [EOS])
    resp.append(TOK.encode(neg) + ([EOS] if neg_eos else []))
  lps = [(-rng.random(len(r))).tolist() for r in resp]
  prompts = [TOK.encode(PROMPT)] * len(pairs)
  return pack_rollouts(prompts, resp, lps, samples_per_prompt=2, max_len=max_len, eos_ids=[EOS])


def one_pair_each(q):
  """Candidates pairing, in every query, y⁻ (index 1) with y⁺ (index 0)."""
  return Candidates(
    neg=jnp.ones((q, 1), jnp.int32),
    pos=jnp.zeros((q, 1), jnp.int32),
    valid=jnp.ones((q, 1), bool),
    eligible=jnp.ones(q, bool),
  )


def texts(rows):
  return [TOK.decode(ids) for ids in response_ids(rows, [EOS])]


def test_token_tables_from_the_vocabulary():
  sep, space, eos = map(np.asarray, (TABLES.is_sep, TABLES.is_space, TABLES.is_eos))
  assert np.flatnonzero(sep).tolist() == [TOK.stoi["\n"]]
  assert np.flatnonzero(space).tolist() == [TOK.stoi[" "], TOK.stoi["\n"]]
  assert np.flatnonzero(eos).tolist() == [EOS]


CUT1 = "12+7=19\n19+30=50\n"  # y⁻ through its first differing step
REDO1 = "19+30=49\n\\boxed{49}"  # y⁺ from that step on
DIVERGENCE_CASES = [
  # (y⁺, y⁻, y⁻ has EOS, expected construction or None, anchored prefix)
  (GOOD, CUT1 + "\\boxed{50}", True, CUT1 + DIAG + REDO1, 17),
  (GOOD, "12+7=18\n18+30=48\n\\boxed{48}", True, "12+7=18\n" + DIAG + GOOD, 8),  # step 0
  (GOOD, "12+7=19", False, "12+7=19\n" + DIAG + REDO1, 7),  # y⁻ prefix of y⁺
  (GOOD, GOOD, True, None, 0),  # identical: nothing to construct
  # spaces are whitespace-only tokens: ignored when comparing steps
  (GOOD, "12+7=19 \n19+30=50\n\\boxed{50}", True, "12+7=19 \n19+30=50\n" + DIAG + REDO1, 18),
  (GOOD, "", True, DIAG + GOOD, 0),  # empty y⁻: empty prefix, no joiner
  ("12+7=19\n", CUT1 + "\\boxed{50}", True, None, 0),  # y⁺ prefix of y⁻: nothing to continue
]  # fmt: skip


def test_divergence_cases_text_masks_and_logprobs():
  batch = pack([c[:3] for c in DIVERGENCE_CASES])
  q = len(DIVERGENCE_CASES)
  diag = jnp.asarray(TOK.encode(DIAG), jnp.int32)
  rows, prefix = divergence.divergence_rows(
    batch, one_pair_each(q), diag, jnp.int32(TOK.stoi["\n"]), TABLES, k=2
  )
  got = texts(rows)
  valid = np.asarray(rows.valid)
  for i, (_, _, _, want, n_prefix) in enumerate(DIVERGENCE_CASES):
    assert bool(valid[i]) == (want is not None), i
    if want is None:
      assert not np.asarray(rows.loss_mask)[i].any()
      continue
    assert got[i] == want, (i, got[i])
    assert int(prefix[i]) == n_prefix
  # per-token values: the anchored prefix carries y⁻'s own logprobs, the rest none
  tok, lp, fl, mask = map(
    np.asarray, (rows.tokens, rows.sampler_logprobs, rows.from_learner, rows.loss_mask)
  )
  src_lp = np.asarray(batch.sampler_logprobs)
  p = len(PROMPT)
  for i in np.flatnonzero(valid):
    n = int(prefix[i])
    length = p + int(rows.response_lens[i])
    assert tok[i, :p].tolist() == TOK.encode(PROMPT) and tok[i, length - 1] == EOS
    np.testing.assert_array_equal(mask[i], (np.arange(128) >= p) & (np.arange(128) < length))
    np.testing.assert_array_equal(fl[i], (np.arange(128) >= p) & (np.arange(128) < p + n))
    np.testing.assert_array_equal(lp[i, p : p + n], src_lp[2 * i + 1, p : p + n])
    assert not lp[i, p + n :].any()
  np.testing.assert_array_equal(rows.group_ids, q + np.arange(q))
  assert np.asarray(rows.is_constructed).all() and not np.asarray(rows.truncated).any()


def test_divergence_overflow_is_truncated_and_flagged():
  pos = "1+1=2\n" * 15 + "\\boxed{2}"
  neg = "1+1=2\n" * 14 + "1+1=3\n\\boxed{3}"
  short = (GOOD, "12+7=18\n\\boxed{48}", True)
  batch = pack([(pos, neg, True), short, short], max_len=128)
  batch = batch.replace(truncated=batch.truncated.at[4].set(True))  # query 2's y⁺ had no end
  diag = jnp.asarray(TOK.encode(DIAG), jnp.int32)
  rows, _ = divergence.divergence_rows(batch, one_pair_each(3), diag, jnp.int32(-1), TABLES, k=2)
  assert np.asarray(rows.truncated).tolist() == [True, False, True]
  full = "1+1=2\n" * 14 + "1+1=3\n" + DIAG + "1+1=2\n\\boxed{2}"
  assert texts(rows)[0] == (full)[: 128 - len(PROMPT)]  # cut at the row length, never wrapped
  assert int(rows.prompt_lens[0] + rows.response_lens[0]) == 128


@pytest.mark.parametrize(
  "text,expected",
  [
    ("<analysis>a</analysis><reconstruction>r</reconstruction>", ("a", "r")),
    ("\n<analysis>\nx\n</analysis>\n<reconstruction>\n1\n2\n</reconstruction>", ("x", "1\n2")),
    ("<analysis></analysis><reconstruction>r</reconstruction>", ("", "r")),
    ("<analysis>a</analysis>", None),  # no reconstruction
    ("<analysis>a</analysis><reconstruction>  \n</reconstruction>", None),  # empty
    ("<reconstruction>r</reconstruction><analysis>a</analysis>", None),  # wrong order
    ("<analysis>a</analysis><reconstruction>r</reconstruction><reconstruction>s", None),
    ("Sure! <analysis>a</analysis><reconstruction>r</reconstruction>", None),  # text outside
    ("<analysis>a</analysis><reconstruction>r</reconstruction> done", None),
    ("<analysis>a<analysis>b</analysis><reconstruction>r</reconstruction>", None),
    ("<analysis>a</analysis><reconstruction>r", None),  # unterminated
  ],
)  # fmt: skip
def test_parse_construction_accepts_only_the_strict_format(text, expected):
  assert synthesis.parse_construction(text) == expected


def test_template_parts_and_errors():
  pieces, names = synthesis.template_parts(synthesis.SYNTHESIS_TEMPLATE)
  assert names == ["query", "incorrect", "correct"] and len(pieces) == 4
  assert "".join(p + "{" + n + "}" for p, n in zip(pieces, names, strict=False)) + pieces[-1] == (
    synthesis.SYNTHESIS_TEMPLATE
  )
  assert synthesis.template_parts("A {correct} B {{x}} {query} {incorrect}")[1] == [
    "correct",
    "query",
    "incorrect",
  ]
  for bad in (
    "{query} {incorrect}",
    "{query}{incorrect}{correct}{query}",
    "{query}{incorrect}{correct}{gold}",
  ):
    with pytest.raises(ValueError):
      synthesis.template_parts(bad)


NEG = "12+7=19\n19+30=50\n\\boxed{50}"


def synthesize(batch, cands, template, outputs, k=2, queries=None):
  """The loop's policy path with `outputs` standing in for the sampler (one per valid pair)."""
  tmpl = synthesis.encode_template(TOK, template)
  if queries is None:
    query_tokens, query_lens = batch.tokens[::k], batch.prompt_lens[::k]
  else:
    query_tokens, query_lens = synthesis.encode_queries(TOK, queries)
  sp = synthesis.synthesis_prompts(
    batch, cands, query_tokens, query_lens, TABLES.is_eos, k=k, template=tmpl
  )
  neg, _, _, valid = con.pair_rows(batch, cands, k)
  todo, prompts = synthesis.prompt_lists(sp, valid)
  outs = [TOK.encode(o) + [EOS] for o in outputs[: len(prompts)]]
  negatives = response_ids(take_rows(batch, neg), [EOS])
  anchored = synthesis.anchor(
    TOK, todo, outs, negatives, slots=len(negatives), width=batch.tokens.shape[1], eos_ids=[EOS]
  )
  rows = synthesis.anchored_rows(
    batch, cands, anchored.prefix_lens, anchored.rest, anchored.rest_lens, anchored.ok, k=k
  )
  return rows, anchored.prefix_lens, prompts


def test_policy_prompts_parse_and_anchor():
  batch = pack([(GOOD, NEG, True), (GOOD, NEG, True), (GOOD, NEG, True)])
  cands = one_pair_each(3).replace(valid=jnp.asarray([[True], [True], [False]]))
  template = "Q: {query}\nBAD: {incorrect}\nGOOD: {correct}\n"
  recon = "12+7=19\n19+30=50\nWait, 19+30 is 49.\n\\boxed{49}"
  outputs = [f"<analysis>step 2</analysis><reconstruction>{recon}</reconstruction>", "garbage"]
  rows, prefix, prompts = synthesize(batch, cands, template, outputs)
  assert len(prompts) == 2  # only the valid pairs are prompted
  assert TOK.decode(prompts[0]) == template.format(query=PROMPT, incorrect=NEG, correct=GOOD)
  np.testing.assert_array_equal(rows.valid, [True, False, False])
  assert texts(rows)[0] == recon
  n = len("12+7=19\n19+30=50\n")
  assert int(prefix[0]) == n
  p = len(PROMPT)
  fl = np.asarray(rows.from_learner)[0]
  np.testing.assert_array_equal(fl, (np.arange(128) >= p) & (np.arange(128) < p + n))
  np.testing.assert_array_equal(
    np.asarray(rows.sampler_logprobs)[0, p : p + n],
    np.asarray(batch.sampler_logprobs)[1, p : p + n],
  )
  length = p + int(rows.response_lens[0])
  assert int(rows.tokens[0, length - 1]) == EOS  # the anchored row ends with EOS


def test_no_eligible_pair_prompts_nothing():
  batch = pack([(GOOD, NEG, True)])
  cands = one_pair_each(1).replace(valid=jnp.zeros((1, 1), bool))
  rows, prefix, prompts = synthesize(batch, cands, "{query}|{incorrect}|{correct}", [])
  assert prompts == [] and not np.asarray(rows.valid).any() and int(prefix[0]) == 0


def grade(texts_, golds):
  return [float(f"\\boxed{{{g}}}" in t) for t, g in zip(texts_, golds, strict=True)]


def graded(rows, golds, q):
  """Rows with rewards set the way the loop sets them (valid rows only)."""
  valid = np.flatnonzero(np.asarray(rows.valid))
  rewards = np.zeros(rows.num_rows, np.float32)
  if valid.size:
    source = np.asarray(rows.group_ids)[valid] - q
    all_texts = [TOK.decode(ids) for ids in response_ids(take_rows(rows, valid), [EOS])]
    rewards[valid] = grade(all_texts, [golds[j] for j in source])
  return rows.replace(rewards=jnp.asarray(rewards))


def _graded(resp):
  """Groups of 4 of `resp` to PROMPT, packed and graded against 49."""
  return pack_rollouts(
    [TOK.encode(PROMPT)] * (len(resp) // 4), [TOK.encode(r) + [EOS] for r in resp], None,
    samples_per_prompt=4, max_len=128, eos_ids=[EOS], rewards=grade(resp, ["49"] * len(resp)),
  )  # fmt: skip


def test_divergence_from_dcs_to_metrics():
  # query 0: 2 correct / 2 wrong -> 2 pairs; query 1: all correct -> none
  wrong = ["12+7=19\n19+30=50\n\\boxed{50}", "12+7=18\n18+30=48\n\\boxed{48}"]
  resp = [GOOD, wrong[0], GOOD, wrong[1]] + [GOOD] * 4
  batch = _graded(resp)
  cands = con.select(batch, jax.random.key(0), k=4, n_pos=1, n_neg=1, m_max=2)
  diag, joiner = divergence.diagnosis_tokens(TOK, DIAG)
  rows, prefix = divergence.divergence_rows(batch, cands, diag, joiner, TABLES, k=4)
  rows = graded(rows, ["49", "49"], q=2)
  m = con.construction_metrics(cands, rows, prefix)
  assert rows.num_rows == 4  # Q * m_max, fixed
  np.testing.assert_array_equal(rows.valid, [True, True, False, False])
  np.testing.assert_array_equal(rows.rewards, [1, 1, 0, 0])
  assert sorted(texts(rows)[:2]) == sorted(
    ["12+7=19\n19+30=50\n" + DIAG + "19+30=49\n\\boxed{49}", "12+7=18\n" + DIAG + GOOD]
  )
  assert m["tapo/eligible_rate"] == 0.5 and m["tapo/constructions_attempted"] == 2
  assert m["tapo/constructions_parsed"] == 2 and m["tapo/constructions_correct"] == 2
  np.testing.assert_allclose(
    m["tapo/anchored_fraction"],
    np.mean([17 / (17 + len(DIAG) + 19 + 1), 8 / (8 + len(DIAG) + len(GOOD) + 1)]),
    rtol=1e-6,
  )


def test_policy_from_dcs_to_metrics_with_failed_and_unparsable():
  resp = [GOOD, NEG, GOOD, NEG]
  batch = _graded(resp)
  outputs = [
    "<analysis>a</analysis><reconstruction>12+7=19\nWait, no. \\boxed{48}</reconstruction>",
    "no tags at all",
  ]
  cands = con.select(batch, jax.random.key(0), k=4, n_pos=1, n_neg=1, m_max=2)
  rows, prefix, prompts = synthesize(
    batch, cands, "{query}|{incorrect}|{correct}", outputs, k=4, queries=["12+7+30?"]
  )
  assert len(prompts) == 2
  assert TOK.decode(prompts[0]) == f"12+7+30?|{NEG}|{GOOD}"  # the query text given
  rows = graded(rows, ["49"], q=1)
  m = con.construction_metrics(cands, rows, prefix)
  np.testing.assert_array_equal(rows.valid, [True, False])
  assert texts(rows)[0] == "12+7=19\nWait, no. \\boxed{48}"
  np.testing.assert_array_equal(rows.rewards, [0, 0])  # parsed but wrong: kept with reward 0
  assert m["tapo/constructions_attempted"] == 2 and m["tapo/constructions_parsed"] == 1
  assert m["tapo/constructions_correct"] == 0
