"""Cold-start data (mode = coldstart): the SFT set that teaches the policy the construction format
before TAPO RL (TAPO.md, step 6), chunk by chunk, top to bottom:

  problems -> rollouts (the policy's engine) -> rewards (verifier pool) -> DCS pairs (y⁻, y⁺) ->
  synthesis prompts as text (the template filled with the query, y⁻ and y⁺) -> teacher (a local HF
  model on its own engine and tokenizer, the policy by default; or an OpenAI-compatible server) ->
  parse -> anchor to y⁻ under the policy's tokenizer (full reconstructions dropped by RL's rule) ->
  grade -> rows appended to the SFT jsonl -> progress file.

Rows (one JSON object a line; mode=sft reads `prompt` and `response`, the rest is provenance):
  {"id", "kind": "construction", "problem_id", "prompt": the filled template (no chat wrapper: sft
   applies it), "response": "<analysis>…</analysis>\\n<reconstruction>…</reconstruction>"}
  {"id", "kind": "solution", "problem_id", "prompt": the problem's RL prompt text,
   "response": a correct, untruncated rollout}
`id` hashes (prompt, response): a row already in the file is never written again. Each kind stops
at its target (coldstart.constructions / coldstart.solutions; the teacher is not called once the
constructions are reached).

Resuming: the problem order and every seed follow from (config.seed, chunk index), so chunk c
yields the same rows in any run. After each chunk its rows are appended and synced, then
WORKDIR/coldstart_progress.json (chunks done, the output's committed size, the counters) is
replaced atomically. A restart cuts the output back to the committed size (a chunk a crash cut
short is never counted) and continues with the next chunk; the settings that decide the rows
(FINGERPRINT) must not change. WORKDIR/coldstart_summary.json: counters and rates.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import sys
import time

import jax
import numpy as np
import tqdm

from tapo_jax import policy as policy_lib
from tapo_jax import rewards as rewards_lib
from tapo_jax.coldstart import teachers
from tapo_jax.coldstart.teachers import TeacherError  # noqa: F401 (main catches it from here)
from tapo_jax.data import Problem
from tapo_jax.data import text as text_lib
from tapo_jax.data.prompts import render
from tapo_jax.sampling import engines as engines_lib
from tapo_jax.sampling import stage
from tapo_jax.tapo import dcs, synthesis
from tapo_jax.train import problems as problems_lib

COUNTERS = (
  "problems", "rollouts", "rollouts_correct", "eligible", "pairs", "prompted", "too_long",
  "parsed", "anchored", "correct", "constructions", "solutions", "duplicates",
)  # fmt: skip
# The settings that decide which rows a chunk yields: a resumed build must keep them.
FINGERPRINT = (
  "seed", "model.path", "model.toy", "model.dtype", "model.param_dtype", "data.train_path",
  "data.layout", "data.prompt_template", "data.use_chat_template", "data.shuffle", "rollout.n",
  "rollout.max_new_tokens", "rollout.temperature", "rollout.top_p", "rollout.top_k",
  "reward.extract", "tapo.n_pos", "tapo.n_neg", "tapo.m_max", "tapo.min_anchor",
  "tapo.synthesis_template", "tapo.synthesis_max_new_tokens", "coldstart.output",
  "coldstart.chunk_problems", "coldstart.solutions_per_problem", "coldstart.teacher_path",
  "coldstart.teacher_model", "coldstart.teacher_temperature", "coldstart.teacher_top_p",
)  # fmt: skip
HIST_BINS = 10  # anchored fraction |kept prefix| / |y⁻| in tenths


class BuildError(ValueError):
  """A workdir or output that cannot be resumed; main prints it on one line, exit 2."""


# ---------------------------------------------------------------------------------- pure helpers


def check_config(cfg) -> None:
  """The keys this mode reads (config.coldstart and the synthesis template); ValueError naming
  the first bad one (validate.validate runs this before any work)."""
  cs = cfg.coldstart
  if cfg.distributed:
    raise ValueError("config.distributed=True: mode=coldstart runs on one host; set it False")
  if cfg.tapo.synthesis_template:
    try:
      synthesis.template_parts(cfg.tapo.synthesis_template)
    except ValueError as e:
      raise ValueError(f"config.tapo.synthesis_template: {e}") from None
  for key in ("constructions", "solutions", "max_chunks", "teacher_retries"):
    if cs[key] < 0:
      raise ValueError(f"config.coldstart.{key}={cs[key]}: must be >= 0")
  for key in ("chunk_problems", "passes", "solutions_per_problem", "teacher_workers"):
    if cs[key] < 1:
      raise ValueError(f"config.coldstart.{key}={cs[key]}: must be >= 1")
  if cs.constructions == 0 and cs.solutions == 0:
    raise ValueError("config.coldstart.constructions and .solutions are both 0: nothing to build")
  if cs.constructions and cfg.tapo.n_pos + cfg.tapo.n_neg > cfg.rollout.n:
    raise ValueError(
      f"config.tapo.n_pos + tapo.n_neg = {cfg.tapo.n_pos + cfg.tapo.n_neg} > rollout.n="
      f"{cfg.rollout.n}: no problem can have a DCS pair; lower them or raise rollout.n"
    )
  if cs.teacher_temperature < 0 or not 0 < cs.teacher_top_p <= 1:
    raise ValueError(
      f"config.coldstart.teacher_temperature={cs.teacher_temperature}, teacher_top_p="
      f"{cs.teacher_top_p}: expected temperature >= 0 and top_p in (0, 1]"
    )
  t = cs.teacher_timeout_s
  if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < math.inf:
    raise ValueError(f"config.coldstart.teacher_timeout_s={t!r}: must be a finite number > 0")
  if cs.teacher_url and cs.teacher_path:
    raise ValueError("config.coldstart.teacher_url and teacher_path are both set: choose one")
  if cs.teacher_url:
    if not cs.teacher_url.startswith(("http://", "https://")):
      raise ValueError(f"config.coldstart.teacher_url={cs.teacher_url!r}: expected http(s)://...")
    if not cs.teacher_model:
      raise ValueError("config.coldstart.teacher_model is empty: the model name the server serves")
  if cs.teacher_path:
    if not os.path.exists(os.path.join(cs.teacher_path, "config.json")):
      raise ValueError(
        f"config.coldstart.teacher_path={cs.teacher_path!r}: not a Hugging Face model directory "
        "(no config.json)"
      )


def chunk_of(problems: list[Problem], size: int, seed: int, shuffle: bool, chunk: int):
  """The problems of chunk `chunk`: pass chunk // chunks-per-pass, in an order fixed by the pass."""
  per_pass = math.ceil(len(problems) / size)
  rng = np.random.default_rng([seed, chunk // per_pass])
  order = rng.permutation(len(problems)) if shuffle else np.arange(len(problems))
  j = chunk % per_pass
  return [problems[i] for i in order[j * size : (j + 1) * size]]


def body(ids, eos) -> list[int]:
  """A response's ids without its trailing EOS ids (what y⁻ is anchored to, as in RL)."""
  ids = [int(t) for t in ids]
  while ids and ids[-1] in eos:
    ids.pop()
  return ids


def fill_template(template: str, **fields: str) -> str:
  """The synthesis prompt as text: the template's pieces around {query}, {incorrect}, {correct}."""
  pieces, names = synthesis.template_parts(template)
  return "".join(p + fields[n] for p, n in zip(pieces, names)) + pieces[-1]


def make_row(kind: str, problem_id: str, prompt: str, response: str) -> dict[str, str]:
  digest = hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()[:32]
  return dict(id=digest, kind=kind, problem_id=problem_id, prompt=prompt, response=response)


def construction_response(analysis: str, reconstruction: str) -> str:
  return f"<analysis>{analysis}</analysis>\n<reconstruction>{reconstruction}</reconstruction>"


def fingerprint(cfg) -> dict:
  out = {}
  for key in FINGERPRINT:
    value = cfg
    for part in key.split("."):
      value = value[part]
    out[key] = json.loads(json.dumps(value))
  return out


def read_progress(path: str, fp: dict, output: str) -> dict:
  """The committed progress of the build in `path` (a fresh one when absent, for an `output`
  that does not exist or is empty: a file this build did not write is never truncated)."""
  if not os.path.exists(path):
    if os.path.exists(output) and os.path.getsize(output):
      raise BuildError(
        f"{output} exists but {path} does not: it is not this build's output; move it away or "
        "set coldstart.output to a new file"
      )
    counts = dict.fromkeys(COUNTERS, 0)
    return dict(chunks_done=0, bytes=0, counts=counts, hist=[0] * HIST_BINS, fingerprint=fp)
  progress = _load_progress(path)
  for key, value in fp.items():
    if progress["fingerprint"].get(key) != value:
      old = progress["fingerprint"].get(key)
      raise BuildError(
        f"{path}: this build was made with config.{key}={old!r}, now {value!r}: resume with the "
        "same settings or use a new workdir"
      )
  return progress


def _load_progress(path: str) -> dict:
  """The progress file, checked field by field: a hand-edited one is a BuildError naming it."""
  try:
    with open(path, "rb") as f:
      progress = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BuildError(f"{path}: not a progress file ({e}); {_START_OVER}") from None
  count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
  shape = {
    "chunks_done": count,
    "bytes": count,
    "counts": lambda v: isinstance(v, dict) and all(count(v.get(k)) for k in COUNTERS),
    "hist": lambda v: isinstance(v, list) and len(v) == HIST_BINS and all(map(count, v)),
    "fingerprint": lambda v: isinstance(v, dict),
  }
  if not isinstance(progress, dict):
    raise BuildError(f"{path}: not a progress file (a JSON object expected); {_START_OVER}")
  for key, ok in shape.items():
    if not ok(progress.get(key)):
      raise BuildError(f"{path}: damaged field {key!r}: {progress.get(key)!r}; {_START_OVER}")
  return progress


_START_OVER = "restore it, or start over in a new workdir with a new coldstart.output"


class OutputLock:
  """An exclusive flock on the output while a build appends to it: a second build with another
  workdir and the same coldstart.output is refused (BuildError) instead of writing every row
  again. A fresh build (no progress) also needs the output empty once it holds the lock."""

  def __init__(self, output: str, fresh: bool):
    self.output, self.fresh, self.fd = output, fresh, None

  def __enter__(self) -> OutputLock:
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
    fd = os.open(self.output, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise BuildError(
        f"{self.output}: another build is writing it (coldstart.output); wait for it, or give "
        "this build its own coldstart.output"
      ) from None
    self.fd = fd
    if self.fresh and os.fstat(fd).st_size:
      self.__exit__()
      raise BuildError(
        f"{self.output}: another build wrote it meanwhile; give this build its own coldstart.output"
      )
    return self

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      os.close(self.fd)  # releases the flock
      self.fd = None


def write_json(path: str, obj: dict) -> None:
  """Replaces `path` atomically (a crash leaves the old or the new file, never a mix)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def committed_rows(path: str, size: int) -> set[str]:
  """Cuts the output back to its committed `size` bytes; the ids of the rows it then holds."""
  have = os.path.getsize(path) if os.path.exists(path) else 0
  if have < size:
    raise BuildError(f"{path}: {have} bytes, but {size} were committed: the file was changed")
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    committed = f.read(size)
  ids = set()
  for n, line in enumerate(committed.splitlines(), 1):
    if not line.strip():
      continue
    try:
      ids.add(json.loads(line.decode("utf-8"))["id"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
      raise BuildError(
        f"{path}: line {n}: not a row of this build (a committed line was changed); {_START_OVER}"
      ) from None
  with open(path, "r+b") as f:
    f.truncate(size)
  return ids


def summarize(progress: dict, total: int, output: str, complete: bool) -> dict:
  c = progress["counts"]

  def rate(a: str, b: str) -> float:
    return c[a] / c[b] if c[b] else 0.0

  return dict(
    output=output, chunks_done=progress["chunks_done"], chunks_total=total, complete=complete,
    **c,
    rollout_accuracy=rate("rollouts_correct", "rollouts"),
    eligible_rate=rate("eligible", "problems"),
    parse_rate=rate("parsed", "prompted"),  # teacher outputs in the format
    anchored_rate=rate("anchored", "parsed"),  # parsed ones keeping enough of y⁻ (not full)
    correct_rate=rate("correct", "anchored"),  # anchored ones that reach the gold
    yield_rate=rate("correct", "prompted"),
    anchored_fraction_hist=progress["hist"],  # |kept prefix| / |y⁻| of anchored ones, in tenths
  )  # fmt: skip


def judge(tokenizer, pool, eos, outputs, negatives, golds, min_anchor):
  """Per teacher output (None: not sent): (analysis, reconstruction) when it parses, anchors to
  its y⁻ (response ids, no EOS) and reaches the gold, else None; counters; anchored fractions."""
  stats, fracs, todo, ids = collections.Counter(), [], [], []
  for i, (text, negative) in enumerate(zip(outputs, negatives, strict=True)):
    stats["too_long" if text is None else "prompted"] += 1
    parsed = None if text is None else synthesis.parse_construction(text)
    if parsed is None:
      continue
    stats["parsed"] += 1
    n, rest = synthesis.anchor_text(tokenizer, negative, parsed[1])
    if synthesis.full_reconstruction(tokenizer, negative, n, min_anchor):
      continue
    stats["anchored"] += 1
    fracs.append(n / max(len(negative), 1))
    todo.append(i)  # graded as RL grades a construction: y⁻'s tokens, then the rest re-tokenized
    ids.append(list(negative[:n]) + list(tokenizer.encode(rest, add_special_tokens=False)))
  rewards = stage.grade(pool.grade, tokenizer, ids, [golds[i] for i in todo], eos) if ids else []
  kept = [None] * len(outputs)
  for i, r in zip(todo, rewards, strict=True):
    if r > 0.5:
      kept[i] = synthesis.parse_construction(outputs[i])
      stats["correct"] += 1
  return kept, stats, fracs


def chunk_rows(batch, k, asked, synth, kept, texts, correct, per_problem, prompt_template):
  """Rows of one chunk, per problem: its constructions (kept teacher outputs), then up to
  `per_problem` distinct correct, untruncated rollouts as plain solutions."""
  rows = []
  for q, problem in enumerate(batch):
    for (i, _), prompt, parsed in zip(asked, synth, kept, strict=True):
      if i // k == q and parsed is not None:
        response = construction_response(*parsed)
        rows.append(make_row("construction", problem.id, prompt, response))
    right = [texts[r] for r in range(q * k, (q + 1) * k) if correct[r]]
    for text in list(dict.fromkeys(right))[:per_problem]:
      rows.append(make_row("solution", problem.id, render(problem, prompt_template), text))
  return rows


def append_rows(out, rows, counts: dict, targets: dict, seen: set[str]) -> None:
  """Appends the rows of kinds below their targets and not yet written, then syncs the file."""
  for row in rows:
    kind = row["kind"] + "s"
    if counts[kind] >= targets[kind]:
      continue
    if row["id"] in seen:
      counts["duplicates"] += 1
      continue
    seen.add(row["id"])
    counts[kind] += 1
    out.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
  out.flush()
  os.fsync(out.fileno())


# ---------------------------------------------------------------------------------------- run


def run(cfg, workdir: str) -> dict:
  """Builds (or continues) the cold-start SFT set; returns the summary it writes."""
  cs = cfg.coldstart
  output = cs.output or os.path.join(workdir, "coldstart.jsonl")
  progress_path = os.path.join(workdir, "coldstart_progress.json")
  template = cfg.tapo.synthesis_template or synthesis.SYNTHESIS_TEMPLATE
  problems = problems_lib.training_problems(cfg)
  total = cs.passes * math.ceil(len(problems) / cs.chunk_problems)
  progress = read_progress(progress_path, fingerprint(cfg), output)
  fresh = not os.path.exists(progress_path)
  with OutputLock(output, fresh):
    return _build(cfg, workdir, output, progress_path, template, problems, total, progress)


def _build(cfg, workdir, output, progress_path, template, problems, total, progress) -> dict:
  """run() once it holds the output."""
  cs, k = cfg.coldstart, cfg.rollout.n
  counts, targets = progress["counts"], dict(constructions=cs.constructions, solutions=cs.solutions)
  seen = committed_rows(output, progress["bytes"])
  os.makedirs(workdir, exist_ok=True)
  start = progress["chunks_done"]
  stop = min(total, start + cs.max_chunks) if cs.max_chunks else total

  def reached(kind: str) -> bool:
    return counts[kind] >= targets[kind]

  t0 = time.time()
  if start < stop and not (reached("constructions") and reached("solutions")):
    mesh, model, tokenizer = policy_lib.load_policy(cfg)
    eos = text_lib.default_eos_ids(tokenizer)
    engine = engines_lib.rollout_engine(cfg, model, mesh)
    params = engine.load_params(model)  # the decode copy, made once
    roll = engines_lib.rollout_sampling(cfg, eos)
    teacher = teachers.make_teacher(cfg, template, mesh, model, tokenizer)
    pool = rewards_lib.VerifierPool(
      workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s, extract=cfg.reward.extract
    )
    dcs_args = dict(n_pos=cfg.tapo.n_pos, n_neg=cfg.tapo.n_neg, m_max=cfg.tapo.m_max)
    bar = tqdm.tqdm(total=total, initial=start, desc="coldstart", unit="chunk", file=sys.stderr)
    with pool, bar, open(output, "ab") as out:
      for chunk in range(start, stop):
        if reached("constructions") and reached("solutions"):
          break
        seed = cfg.seed * 1_000_003 + chunk
        batch = chunk_of(problems, cs.chunk_problems, cfg.seed, cfg.data.shuffle, chunk)

        # 1. Rollouts: K samples per problem from the policy, graded by the verifier pool.
        graded = stage.sample_and_grade(
          engine, params, batch, roll, tokenizer=tokenizer, grade_fn=pool.grade, n=k,
          max_new_tokens=cfg.rollout.max_new_tokens, seed=seed,
          template=cfg.data.prompt_template, use_chat_template=cfg.data.use_chat_template,
          max_prompt_tokens=cfg.data.max_prompt_tokens,
        )  # fmt: skip
        gen, rewards, texts = graded.generation, graded.rewards, graded.texts
        responses = [body(ids, eos) for ids in gen.completions]

        # 2. DCS over the [Q, K] grid of verdicts (the rule construct.select applies to a packed
        #    batch, which needs no token arrays here): (y⁻, y⁺) pairs of the mixed groups as rows.
        key = jax.random.fold_in(jax.random.key(cfg.seed), chunk)
        cands = dcs.select_candidates((rewards > 0.5).reshape(-1, k), key, **dcs_args)
        neg, pos = jax.device_get(cands.rows(k))
        valid = np.asarray(cands.valid).reshape(-1)
        pairs = [(int(i), int(j)) for i, j, v in zip(neg, pos, valid, strict=True) if v]

        # 3. The teacher rewrites each y⁻ (none once the constructions are reached); keep the
        #    rewrites that parse, anchor to y⁻ under the policy's tokenizer and reach the gold.
        asked = [] if reached("constructions") else pairs
        synth = [
          fill_template(template, query=batch[i // k].problem, incorrect=texts[i], correct=texts[j])
          for i, j in asked
        ]
        outputs = teacher.write(synth, seed=seed + 7919) if synth else []
        kept, stats, fracs = judge(
          tokenizer, pool, eos, outputs, [responses[i] for i, _ in asked],
          [batch[i // k].answer for i, _ in asked], cfg.tapo.min_anchor,
        )  # fmt: skip

        # 4. Commit: the rows appended and synced, then the counters and the progress file.
        correct = (rewards > 0.5) & ~np.asarray(gen.truncated)
        rows = chunk_rows(
          batch, k, asked, synth, kept, texts, correct, cs.solutions_per_problem,
          cfg.data.prompt_template,
        )  # fmt: skip
        append_rows(out, rows, counts, targets, seen)
        stats.update(
          problems=len(batch), rollouts=len(rewards), rollouts_correct=int((rewards > 0.5).sum()),
          eligible=int(np.asarray(cands.eligible).sum()), pairs=len(pairs),
        )  # fmt: skip
        for name, value in stats.items():
          counts[name] += value
        hist = np.histogram(fracs, bins=HIST_BINS, range=(0.0, 1.0))[0]
        progress["hist"] = [int(a + b) for a, b in zip(progress["hist"], hist, strict=True)]
        progress.update(chunks_done=chunk + 1, bytes=out.tell())
        write_json(progress_path, progress)
        bar.set_postfix(dict(cons=counts["constructions"], sol=counts["solutions"]))
        bar.update(1)

  complete = reached("constructions") and reached("solutions")
  summary = summarize(progress, total, output, complete)
  summary["seconds"] = time.time() - t0
  write_json(os.path.join(workdir, "coldstart_summary.json"), summary)
  print(
    f"coldstart: {counts['constructions']}/{cs.constructions} constructions + "
    f"{counts['solutions']}/{cs.solutions} solutions in {output} (chunk {progress['chunks_done']}"
    f"/{total}); teacher outputs parsed {summary['parse_rate']:.1%}, of those anchored "
    f"{summary['anchored_rate']:.1%}, of those correct {summary['correct_rate']:.1%}",
    file=sys.stderr,
  )
  if not complete and progress["chunks_done"] == total:
    print(
      f"coldstart: the training file is used up (coldstart.passes={cs.passes}) before the "
      "targets; raise coldstart.passes or add problems to continue",
      file=sys.stderr,
    )
  return summary
