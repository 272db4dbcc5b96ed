"""A step's rollouts: K samples per query from the rollout engine, graded by the verifier.

Dynamic sampling (rollout.dynamic): a group whose K rewards are all equal carries no learning
signal, so while fewer than Q of the step's groups are mixed, Q more queries are drawn from the
data iterator and sampled, up to rollout.resample_rounds extra rounds; the step then trains on
the first Q mixed groups in draw order, filled up with all-equal groups when the budget runs out.
Every draw comes from the checkpointed iterator, so resume stays exact.

One-step-off overlap (rollout.async_steps = 1): `Producer` samples the next step's rollouts in a
background thread with the params the current step started from (a copy placed on the sampler's
devices), while the current step constructs and updates; the next step then trains on rollouts
one update old (rollout/staleness = 1), with the sampler/trainer gap left to loss.rollout_is.
A checkpoint waits for the rollouts in flight and stores them, so a resumed run trains on exactly
the rollouts the interrupted one would have.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import threading

import numpy as np

from tapo_jax.data import Problem
from tapo_jax.sampling import stage


def _b64(x) -> str:
  return base64.b64encode(np.asarray(x, np.float32).tobytes()).decode()


@dataclasses.dataclass(frozen=True)
class StepRollouts:
  """Q queries x K samples, prompt-major, graded."""

  problems: list[Problem]  # Q
  prompts: list[list[int]]  # Q
  completions: list[list[int]]  # Q*K, EOS included when emitted
  logprobs: list[np.ndarray]  # Q*K x [len] f32, under the distribution sampled
  truncated: list[bool]  # Q*K
  rewards: np.ndarray  # [Q*K] f32
  stats: dict[str, float]  # rollout/* metrics

  def to_json(self) -> dict:
    """A JSON-able copy (logprobs as raw float32 bytes: exact)."""
    return dict(
      problems=[dataclasses.asdict(p) for p in self.problems],
      prompts=self.prompts,
      completions=self.completions,
      logprobs=[
        base64.b64encode(np.asarray(x, np.float32).tobytes()).decode() for x in self.logprobs
      ],
      truncated=[bool(t) for t in self.truncated],
      rewards=[float(r) for r in self.rewards],
      stats=self.stats,
    )

  @classmethod
  def from_json(cls, d: dict) -> StepRollouts:
    return cls(
      problems=[Problem(**p) for p in d["problems"]],
      prompts=d["prompts"],
      completions=d["completions"],
      logprobs=[np.frombuffer(base64.b64decode(x), np.float32) for x in d["logprobs"]],
      truncated=d["truncated"],
      rewards=np.asarray(d["rewards"], np.float32),
      stats=d["stats"],
    )


class Sampler:
  """Samples and grades a step's groups (what the loop's step 1 and 2 do), plain or dynamic."""

  def __init__(self, cfg, engine, tokenizer, grade, eos, sampling_settings):
    self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
    self.grade = grade  # (texts, golds) -> rewards; thread-safe
    self.eos, self.settings = eos, sampling_settings

  def _round(self, params, problems, seed, times):
    c = self.cfg
    g = stage.sample_and_grade(
      self.engine, params, problems, self.settings, tokenizer=self.tokenizer,
      grade_fn=self.grade, n=c.rollout.n, max_new_tokens=c.rollout.max_new_tokens, seed=seed,
      template=c.data.prompt_template, use_chat_template=c.data.use_chat_template,
      max_prompt_tokens=c.data.max_prompt_tokens,
    )  # fmt: skip
    times["time/rollout"] += g.sample_s
    times["time/reward"] += g.grade_s
    times["perf/rollout_tokens"] += g.tokens
    return g.prompts, g.generation, g.rewards

  def collect(self, params, it, step: int) -> StepRollouts:
    """The step's Q groups; draws its queries from `it` (one batch, or more when dynamic)."""
    c, k = self.cfg, self.cfg.rollout.n
    q, base = c.rollout.batch_queries, c.seed * 1_000_003 + step
    mixed, flat, sampled = [], [], 0
    times = collections.Counter()
    for r in range(1 + (c.rollout.resample_rounds if c.rollout.dynamic else 0)):
      problems = it.next()
      prompts, gen, rewards = self._round(params, problems, base + r * 7_919_000, times)
      for i, problem in enumerate(problems):
        rows = slice(i * k, (i + 1) * k)
        group = (problem, prompts[i], gen.completions[rows], gen.logprobs[rows],
                 gen.truncated[rows], rewards[rows])  # fmt: skip
        (mixed if np.ptp(rewards[rows]) > 0 or not c.rollout.dynamic else flat).append(group)
      sampled += len(problems)
      if len(mixed) >= q:
        break
    groups = (mixed + flat)[:q]
    stats = {
      "rollout/groups_sampled": float(sampled),
      "rollout/groups_mixed": float(sum(np.ptp(g[5]) > 0 for g in groups)),
      "rollout/rounds": float(r + 1),
      **{key: float(v) for key, v in times.items()},
    }
    return StepRollouts(
      problems=[g[0] for g in groups],
      prompts=[g[1] for g in groups],
      completions=[x for g in groups for x in g[2]],
      logprobs=[x for g in groups for x in g[3]],
      truncated=[x for g in groups for x in g[4]],
      rewards=np.concatenate([g[5] for g in groups]),
      stats=stats,
    )


class Producer:
  """Rollouts for step t: now (sync), or the ones started during step t - 1 (one-step-off).
  `params` are always the sampler's copy (placed on its devices)."""

  def __init__(self, sampler: Sampler, async_steps: int, pending: StepRollouts | None = None):
    self.sampler, self.async_steps = sampler, async_steps
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if async_steps else None
    self._pending = pending  # StepRollouts restored from a checkpoint, or a Future

  def take(self, params, it, step: int) -> tuple[StepRollouts, int]:
    """(step `step`'s rollouts, their staleness in updates): those in flight or restored (1),
    else sampled now with `params` (0)."""
    pending, self._pending = self._pending, None
    if pending is None:
      return self.sampler.collect(params, it, step), 0
    done = pending.result() if isinstance(pending, concurrent.futures.Future) else pending
    return done, 1

  def start_next(self, params, it, step: int) -> None:
    """One-step-off: starts sampling step `step + 1` with `params` (before they are updated)."""
    if self.async_steps:
      self._pending = self._pool.submit(self.sampler.collect, params, it, step + 1)

  def settle(self) -> StepRollouts | None:
    """The rollouts in flight, waited for (a checkpoint stores them), or None."""
    if isinstance(self._pending, concurrent.futures.Future):
      self._pending = self._pending.result()
    return self._pending

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)


def locked(fn):
  """`fn` callable from the loop and the producer's thread, one call at a time."""
  lock = threading.Lock()

  def run(*args, **kwargs):
    with lock:
      return fn(*args, **kwargs)

  return run
