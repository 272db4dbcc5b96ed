r"""What a toy checkpoint gives TAPO before any RL: accuracy at T=1, DCS-eligible queries, and
the kinds of step errors it makes.

python -m tapo_jax.toy.measure [--model=tapo_jax/toy/chain] [--n=128] [--k=8] [--seeds=0,1,2]

1. Rollouts: k samples per held-out `chain` problem at temperature 1 (the prompt is the problem
   through the chat template, as configs with data.prompt_template="{problem}" render it), graded
   by the project's verifier against the gold answer; plus one greedy sample per problem.
   avg@k = mean correct share, pass@k = share of problems with >= 1 correct sample.
2. DCS: a problem is eligible iff >= n_pos samples are right and >= n_neg wrong (paper: 2 and 4).
3. The first wrong line of each wrong sample against the gold solution, by kind (result digit,
   carry-like result slip, other result, previous result miscopied, operand, answer line,
   malformed line, unfinished): the errors the model itself makes.

4. With --constructions, the `policy` construction (tapo.construction=policy) as the RL loop
   makes it, by the loop's own functions: DCS over the k samples (n_pos=2, n_neg=4, m_max=4),
   the synthesis prompts spliced from the chat-formatted SYNTHESIS_TEMPLATE with the model's own
   y⁻ and y⁺, one completion each at T=1 (the rollout temperature), parsed and anchored to y⁻
   (`synthesis.anchor`), graded against the gold. Reported over the attempted constructions:
   parse rate, kept share of y⁻ (anchored prefix / |y⁻|, 0 when unparsed) and the share that
   reaches the gold answer ("ideal": the same rates of the teacher's construction of those pairs,
   i.e. of a perfect copier); the same on teacher-made pairs (y⁻ from `teacher.corrupt`, y⁺ the
   worked solution, one per problem).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from tapo_jax.rewards import grade
from tapo_jax.toy import chain, teacher

ROLLOUT_MAX_NEW_TOKENS = 112  # a solution is <= 96 tokens + EOS
SYNTHESIS_MAX_NEW_TOKENS = 192  # a teacher construction is <= ~145 tokens (tiny.py allows 320)


@dataclasses.dataclass(frozen=True)
class Groups:
  """k graded samples per problem, prompt-major."""

  prompts: list[list[int]]  # P prompt token ids
  completions: list[list[int]]  # P*k response ids (EOS included when emitted)
  texts: list[str]  # P*k decoded responses
  correct: np.ndarray  # [P, k] bool
  k: int


def load(model_dir: str):
  """(model, tokenizer, eos ids) of a local HF directory."""
  import transformers

  from tapo_jax.data.text import default_eos_ids
  from tapo_jax.models import load_pretrained

  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  return load_pretrained(model_dir), tokenizer, default_eos_ids(tokenizer)


def _strip(ids: Sequence[int], eos: set[int]) -> list[int]:
  ids = list(ids)
  while ids and ids[-1] in eos:
    ids.pop()
  return ids


def sample_groups(model, tokenizer, eos, problems, *, k, temperature=1.0, seed=0) -> Groups:
  """k samples per problem at `temperature`, graded against the gold answers."""
  from tapo_jax.data.prompts import format_prompt
  from tapo_jax.sampling import Sampling, sample_from

  prompts = [format_prompt(p.problem, "{problem}", tokenizer, True) for p in problems]
  sampling = Sampling(temperature, 1.0, 0, tuple(eos))
  out = sample_from(model, prompts, sampling, n=k, max_new_tokens=ROLLOUT_MAX_NEW_TOKENS, seed=seed)
  texts = [tokenizer.decode(_strip(c, set(eos)), skip_special_tokens=True) for c in out.completions]
  golds = [p.answer for p in problems for _ in range(k)]
  correct = np.array([grade(t, g) > 0.5 for t, g in zip(texts, golds)]).reshape(len(problems), k)
  return Groups(prompts, [list(c) for c in out.completions], texts, correct, k)


def accuracy_stats(groups: Groups, n_pos: int = 2, n_neg: int = 4) -> dict[str, float]:
  """avg@k, pass@k and the DCS-eligible share of the problems."""
  c = groups.correct
  right = c.sum(1)
  return {
    "avg@k": float(c.mean()),
    "pass@k": float((right > 0).mean()),
    "eligible": float(((right >= n_pos) & (c.shape[1] - right >= n_neg)).mean()),
    "mixed": float(((right > 0) & (right < c.shape[1])).mean()),
  }


def error_kind(response: str, gold_solution: str) -> str:
  """The kind of the first line where `response` departs from the gold solution."""
  i = teacher.first_difference(response, gold_solution)
  if i is None:
    return "none"
  lines, gold = response.split("\n"), gold_solution.split("\n")
  if i >= len(lines):
    return "unfinished"
  n, g = chain.parse_step(lines[i]), chain.parse_step(gold[i])
  if n is None or g is None:
    return "answer" if g is None and lines[i].startswith("\\boxed") else "malformed"
  if n.a != g.a:
    return "prev"
  if (n.op, n.b) != (g.op, g.b):
    return "operand"
  wrong, right = str(n.c), str(g.c)
  if len(wrong) == len(right) and sum(x != y for x, y in zip(wrong, right)) == 1:
    diff = abs(n.c - g.c)
    return "carry" if diff >= 10 and str(diff).rstrip("0") == "1" else "digit"
  return "result"


def measure(
  model_dir: str, n: int = 128, k: int = 8, seed: int = 0, constructions: bool = False
) -> dict:
  """Accuracy, DCS eligibility and first-error kinds on `n` held-out problems (and with
  `constructions`, the `policy` construction rates: in the loop's way, and on teacher pairs)."""
  model, tokenizer, eos = load(model_dir)
  problems = chain.make_split("heldout", n, seed=seed)
  groups = sample_groups(model, tokenizer, eos, problems, k=k, seed=seed)
  greedy = sample_groups(model, tokenizer, eos, problems, k=1, temperature=0.0, seed=seed)
  out = accuracy_stats(groups)
  out["greedy"] = float(greedy.correct.mean())
  kinds = collections.Counter(
    error_kind(t, problems[i // k].solution)
    for i, t in enumerate(groups.texts)
    if not groups.correct.reshape(-1)[i]
  )
  out["error_kinds"] = dict(kinds.most_common())
  if constructions:
    out["loop"] = loop_constructions(model, tokenizer, eos, problems, groups, seed)
    out["teacher"] = teacher_constructions(model, tokenizer, eos, problems, seed)
  return out


def _anchored_stats(tokenizer, eos, todo, outputs, negatives, golds) -> dict[str, float]:
  """Parse / kept / gold rates of `outputs` (one per attempted pair) anchored to `negatives`."""
  from tapo_jax.tapo import synthesis

  slots = len(negatives)
  width = max(map(len, negatives)) + SYNTHESIS_MAX_NEW_TOKENS + 2
  a = synthesis.anchor(
    tokenizer, todo, outputs, negatives, slots=slots, width=width, eos_ids=eos, min_anchor=0.0
  )
  kept, gold = np.zeros(slots), np.zeros(slots, bool)
  for i in todo:
    if a.ok[i]:
      kept[i] = a.prefix_lens[i] / max(len(negatives[i]), 1)
      rest = [int(x) for x in a.rest[i, : a.rest_lens[i]] if int(x) not in set(eos)]
      text = tokenizer.decode(list(negatives[i][: a.prefix_lens[i]]) + rest)
      gold[i] = grade(text, golds[i]) > 0.5
  n = max(len(todo), 1)
  return {
    "attempted": int(len(todo)),
    "parse": float(a.parsed[todo].sum()) / n,
    "kept": float(kept[todo].sum()) / n,  # mean over attempted, 0 when not built
    "gold": float(gold[todo].sum()) / n,
  }


def loop_constructions(model, tokenizer, eos, problems, groups: Groups, seed: int = 0) -> dict:
  """The RL loop's `policy` constructions from `groups` (the model's own samples)."""
  import jax

  from tapo_jax.sampling import Sampling, sample_from
  from tapo_jax.tapo import batch as batch_lib
  from tapo_jax.tapo import construct, synthesis

  k = groups.k
  originals = batch_lib.pack_rollouts(
    groups.prompts,
    groups.completions,
    None,
    samples_per_prompt=k,
    max_len=384,
    eos_ids=eos,
    max_new_tokens=ROLLOUT_MAX_NEW_TOKENS,
    rewards=groups.correct.reshape(-1).astype(np.float32),
  )
  cands = construct.select(originals, jax.random.key(seed), k=k, n_pos=2, n_neg=4, m_max=4)
  template = synthesis.encode_template(tokenizer, teacher.SYNTHESIS_TEMPLATE, chat=True)
  tables = construct.token_tables(tokenizer, model.cfg.vocab_size, eos)
  req = synthesis.requests(
    originals, cands, [p.problem for p in problems], tokenizer, tables.is_eos,
    k=k, template=template, eos_ids=eos,
  )  # fmt: skip
  neg = construct.pair_rows(originals, cands, k)[0]
  golds = [problems[int(j) // k].answer for j in np.asarray(neg)]
  sampling = Sampling(1.0, 1.0, 0, tuple(eos))
  out = sample_from(
    model, req.prompts, sampling, n=1, max_new_tokens=SYNTHESIS_MAX_NEW_TOKENS, seed=seed + 7919,
    prefill_buckets=synthesis.prompt_buckets(max(map(len, req.prompts), default=64)),
  )  # fmt: skip
  stats = _anchored_stats(tokenizer, eos, req.todo, out.completions, req.negatives, golds)
  # The teacher's construction of the same pairs: what a perfect copier would reach.
  pos = np.asarray(construct.pair_rows(originals, cands, k)[1])
  ideal = [
    teacher.construction(groups.texts[int(neg[i])], groups.texts[int(pos[i])]) or ""
    for i in req.todo
  ]
  ideal_ids = [tokenizer.encode(t, add_special_tokens=False) for t in ideal]
  stats["ideal"] = _anchored_stats(tokenizer, eos, req.todo, ideal_ids, req.negatives, golds)
  return stats


def teacher_constructions(model, tokenizer, eos, problems, seed: int = 0) -> dict:
  """`policy` constructions of teacher-made pairs: y⁻ = teacher.corrupt, y⁺ = the solution."""
  import random

  from tapo_jax.data.prompts import format_prompt
  from tapo_jax.sampling import Sampling, sample_from
  from tapo_jax.tapo import synthesis

  rng = random.Random(f"measure-{seed}")
  negs = [teacher.corrupt(p, rng) for p in problems]
  prompts = [
    format_prompt(teacher.synthesis_prompt(p.problem, n, p.solution), "{problem}", tokenizer, True)
    for p, n in zip(problems, negs)
  ]
  sampling = Sampling(1.0, 1.0, 0, tuple(eos))
  out = sample_from(
    model, prompts, sampling, n=1, max_new_tokens=SYNTHESIS_MAX_NEW_TOKENS, seed=seed + 7919,
    prefill_buckets=synthesis.prompt_buckets(max(map(len, prompts), default=64)),
  )  # fmt: skip
  negatives = [tokenizer.encode(n, add_special_tokens=False) for n in negs]
  todo = np.arange(len(problems))
  return _anchored_stats(
    tokenizer, eos, todo, out.completions, negatives, [p.answer for p in problems]
  )


_MODEL = flags.DEFINE_string("model", str(chain.CHECKPOINT_DIR), "Toy checkpoint directory.")
_N = flags.DEFINE_integer("n", 128, "Held-out problems.")
_K = flags.DEFINE_integer("k", 8, "Samples per problem.")
_CONSTRUCTIONS = flags.DEFINE_bool(
  "constructions", False, "Also measure the `policy` constructions (loop's way, teacher pairs)."
)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Sampling seeds (each also draws its own problems).")


def main(argv) -> None:
  del argv
  runs = []
  for s in map(int, _SEEDS.value):
    r = measure(_MODEL.value, _N.value, _K.value, s, _CONSTRUCTIONS.value)
    print(json.dumps({"seed": s, **r}), flush=True)
    runs.append(r)
  if len(runs) > 1:
    keys = ["avg@k", "pass@k", "greedy", "eligible"]
    vals = {key: [r[key] for r in runs] for key in keys}
    summary = {key: (float(np.mean(v)), float(np.std(v))) for key, v in vals.items()}
    print(json.dumps({"mean_std": summary}))


if __name__ == "__main__":
  app.run(main)
