"""Sample k responses per problem, grade them, write per-problem JSONL and return the metrics.

Sampling goes through an engine built by the caller (once, on the params' mesh) and the params
given; grading through the caller's `grade_fn` (e.g. the run's one verifier pool: `pool.grade`).
`generate_fn` (default tapo_jax.sampling.generate) and `extract_fn` (default
tapo_jax.rewards.extract_answer) are injectable for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tapo_jax import toy
from tapo_jax.data.datasets import Problem, load_problems
from tapo_jax.data.prompts import DEFAULT_TEMPLATE, check_prompt_lengths
from tapo_jax.data.text import default_eos_ids
from tapo_jax.eval import reflection
from tapo_jax.eval.metrics import Equiv, ProblemResult, summarize

GradeFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]  # (responses, golds) -> scores
ExtractFn = Callable[[str], "str | None"]


def verifier_equiv(a: str, b: str) -> bool:
  """Answer equivalence by the verifier (in-process, no timeout): an opt-in maj@k `equiv_fn`."""
  from tapo_jax.rewards import grade

  return grade(f"\\boxed{{{a}}}", b) > 0.5


def sample_and_grade(
  engine: Any,
  params: Any,
  tokenizer: Any,
  problems: Sequence[Problem],
  *,
  k: int,
  temperature: float,
  top_p: float,
  max_new_tokens: int,
  grade_fn: GradeFn,
  top_k: int = 0,
  template: str | None = DEFAULT_TEMPLATE,
  use_chat_template: bool = True,
  generate_fn: Callable | None = None,
  extract_fn: ExtractFn | None = None,
  eos_token_ids: Sequence[int] | None = None,
  seed: int = 0,
  extract: str = "boxed",
) -> list[ProblemResult]:
  """k graded samples for each problem (the one sample-and-grade stage, tapo_jax.sampling.stage)."""
  from tapo_jax.sampling import Sampling, stage

  if extract_fn is None:
    from tapo_jax.rewards import extract_answer

    extract_fn = functools.partial(extract_answer, extract=extract)
  eos = list(default_eos_ids(tokenizer) if eos_token_ids is None else eos_token_ids)
  sampling = Sampling(float(temperature), float(top_p), int(top_k), tuple(eos))
  graded = stage.sample_and_grade(
    engine, params, problems, sampling, tokenizer=tokenizer, grade_fn=grade_fn, n=k,
    max_new_tokens=max_new_tokens, seed=seed, template=template,
    use_chat_template=use_chat_template, generate_fn=generate_fn or stage.generate,
  )  # fmt: skip
  completions = [list(c) for c in graded.generation.completions]
  truncated = getattr(graded.generation, "truncated", None)
  if truncated is None:
    truncated = [len(c) >= max_new_tokens and not (c and c[-1] in eos) for c in completions]
  texts, scores = graded.texts, graded.rewards
  results = []
  for i, p in enumerate(problems):
    s = slice(i * k, (i + 1) * k)
    results.append(
      ProblemResult(
        id=p.id,
        gold=p.answer,
        responses=texts[s],
        answers=[extract_fn(t) for t in texts[s]],
        correct=[float(x) > 0.5 for x in scores[s]],
        lengths=[len(c) for c in completions[s]],
        truncated=[bool(t) for t in truncated[s]],
      )
    )
  return results


def write_results(results: Sequence[ProblemResult], path: str | pathlib.Path) -> None:
  """One JSON object per problem (id, gold, responses, answers, correct, lengths, truncated)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for r in results:
      f.write(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n")


def evaluate(
  engine: Any,
  params: Any,
  tokenizer: Any,
  problems: Sequence[Problem],
  *,
  k: int,
  temperature: float,
  top_p: float,
  max_new_tokens: int,
  grade_fn: GradeFn,
  pass_ks: Sequence[int] = (1,),
  markers: Sequence[str] = (),
  generate_fn: Callable | None = None,
  extract_fn: ExtractFn | None = None,
  equiv_fn: Equiv | None = None,
  seed: int = 0,
  out_path: str | pathlib.Path | None = None,
  eos_token_ids: Sequence[int] | None = None,
  top_k: int = 0,
  template: str | None = DEFAULT_TEMPLATE,
  use_chat_template: bool = True,
  extract: str = "boxed",
  greedy: bool = False,
  steps_fn: reflection.StepsFn | None = None,
) -> dict[str, float]:
  """Samples k responses per problem, grades them and returns summarize()'s metrics; with
  `greedy`, also "greedy": the share of problems whose one temperature-0 response is correct;
  with `markers`, also reflection.summarize()'s first_pass, fix_rate and fix_share of the sampled
  responses (`steps_fn`: each problem's gold solution lines, to tell a wrong first pass)."""
  common = dict(
    max_new_tokens=max_new_tokens,
    template=template,
    use_chat_template=use_chat_template,
    generate_fn=generate_fn,
    grade_fn=grade_fn,
    extract_fn=extract_fn,
    eos_token_ids=eos_token_ids,
    seed=seed,
    extract=extract,
  )
  results = sample_and_grade(
    engine, params, tokenizer, problems, k=k, temperature=temperature, top_p=top_p, top_k=top_k,
    **common,
  )  # fmt: skip
  if markers:
    results = reflection.annotate(results, problems, grade_fn, markers, steps_fn)
  if out_path is not None:
    write_results(results, out_path)
  out = summarize(results, k=k, pass_ks=pass_ks, markers=markers, equiv=equiv_fn)
  out.update(reflection.summarize(results))
  if greedy:
    greedy_results = sample_and_grade(
      engine, params, tokenizer, problems, k=1, temperature=0.0, top_p=1.0, **common
    )
    out["greedy"] = sum(r.correct[0] for r in greedy_results) / max(len(greedy_results), 1)
  return out


def evaluate_sets(
  engine: Any,
  params: Any,
  tokenizer: Any,
  sets: Mapping[str, Sequence[Problem]],
  *,
  out_dir: str | pathlib.Path | None = None,
  **kwargs: Any,
) -> dict[str, float]:
  """evaluate() on each named set; keys are "<set>/<metric>", results in out_dir/<set>.jsonl."""
  summary = {}
  for name, problems in sets.items():
    out_path = None if out_dir is None else pathlib.Path(out_dir) / f"{name}.jsonl"
    metrics = evaluate(engine, params, tokenizer, problems, out_path=out_path, **kwargs)
    summary.update({f"{name}/{key}": v for key, v in metrics.items()})
  return summary


def load_eval_sets(paths: str | Sequence[str], layout: str = "auto") -> dict[str, list[Problem]]:
  """{file stem: problems} for comma-separated (config eval.paths) or listed files."""
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",") if p.strip()]
  sets = {}
  for path in paths:
    name = stem = pathlib.Path(path).stem
    i = 1
    while name in sets:
      i += 1
      name = f"{stem}_{i}"
    sets[name] = load_problems(path, layout)
  return sets


def eval_sets(cfg) -> dict[str, list[Problem]]:
  """{name: problems} from config eval.paths, or the toy model's held-out set."""
  if cfg.eval.paths:
    return load_eval_sets(cfg.eval.paths)
  return {cfg.model.toy: toy.eval_problems(cfg.model.toy, cfg.seed, cfg.eval.toy_problems)}


def checked_eval_sets(cfg, tokenizer) -> dict[str, list[Problem]]:
  """eval_sets, loaded once before any work: a prompt longer than the largest prefill bucket
  (what the eval engine can take) is a DataError naming its file and row."""
  sets = eval_sets(cfg)
  for problems in sets.values():
    check_prompt_lengths(
      problems, cfg.data.prompt_template, tokenizer, max(cfg.rollout.prefill_buckets),
      cfg.data.use_chat_template, limit_key="max(rollout.prefill_buckets)",
    )  # fmt: skip
  return sets


def eval_kwargs(cfg: Any) -> dict[str, Any]:
  """evaluate()'s keyword arguments from a base_config() tree (eval.*, data.*, reward.*)."""
  return dict(
    k=cfg.eval.k,
    temperature=cfg.eval.temperature,
    top_p=cfg.eval.top_p,
    max_new_tokens=cfg.eval.max_new_tokens,
    pass_ks=tuple(cfg.eval.pass_ks),
    markers=tuple(cfg.eval.reflection_markers),
    template=cfg.data.prompt_template,
    use_chat_template=cfg.data.use_chat_template,
    seed=cfg.seed,
    extract=cfg.reward.extract,
    greedy=cfg.eval.greedy,
    # the chain toy's held-out set: each problem's gold lines tell a wrong first pass
    steps_fn=reflection.solution_lines if cfg.model.toy == "chain" and not cfg.eval.paths else None,
  )


def describe_change(evals: Mapping[int, Mapping[str, float]]) -> str:
  """One line per eval set and metric (avg@k, greedy) from the first eval to the last:
  "held-out chain avg@4: 0.312 (step 0) -> 0.406 (step 40)"."""
  first, last = min(evals), max(evals)
  lines = []
  for key, before in evals[first].items():
    name, _, metric = key.rpartition("/")
    if metric.startswith("avg@") or metric == "greedy":
      after = evals[last][key]
      lines.append(
        f"held-out {name} {metric}: {before:.3f} (step {first}) -> {after:.3f} (step {last})"
      )
  return "\n".join(lines)


def compute_pass_rates(
  engine: Any, params: Any, tokenizer: Any, problems: Sequence[Problem], **kwargs: Any
) -> dict[str, float]:
  """{problem id: share of its k samples correct} for filter_by_pass_rate; sample_and_grade args."""
  results = sample_and_grade(engine, params, tokenizer, problems, **kwargs)
  return {r.id: sum(r.correct) / len(r.correct) for r in results}
