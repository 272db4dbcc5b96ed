"""generate(): n samples per prompt with continuous batching over an engine's slots.

Legend: P prompts, R = P * n rows (prompt-major: prompt i's samples are rows i*n .. i*n+n-1),
B slots.

Any `jetstream.engine.engine_api.Engine` works: the driver prefills each prompt once
(`prefill`), inserts the prefix into a free slot for each of its samples (`insert`), and steps
every slot at once (`generate` -> `ResultTokens`), reading one token per slot per step on the host
and freeing a slot at EOS or `max_new_tokens`. A plain Engine samples with its own settings
(`Sampling.eos_ids` still stop rows) and reports no logprobs (NaN). An engine that also offers the
batched fast path (the methods in FAST_PATH, as `QwenEngine` does) is driven through it instead:
several prompts per prefill call, several inserts per call, `steps_per_sync` generate steps in one
jitted call with sampling settings per call and per-token logprobs. While requests are pending
the host syncs after every chunk (finished slots are read out and refilled); once none are
pending, the next chunk is dispatched before the previous chunk's status is read (a chunk whose
slots are all done exits at once), and the sequences are read back at the end.

To plug in another engine: subclass `engine_api.Engine` (prefill of one padded prompt -> a
prefix; insert(prefix, decode_state, slot); generate(params, decode_state) -> (decode_state,
ResultTokens with one token per slot); max_concurrent_decodes; max_prefill_length) and pass it
with its params to `generate`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np
from flax import nnx

from tapo_jax import sharding
from tapo_jax.models.qwen import Qwen
from tapo_jax.sampling.engine import DEFAULT_BUCKETS, QwenEngine
from tapo_jax.sampling.sample import Sampling

# What an engine must offer (besides the Engine API) for the batched fast path.
FAST_PATH = ("prefill_many", "insert_many", "generate_steps", "bucket", "window", "max_len")


@dataclasses.dataclass(frozen=True)
class Generation:
  """n completions per prompt, prompt-major; EOS is included when it was emitted."""

  prompts: list[list[int]]  # P
  n: int
  completions: list[list[int]]  # R
  logprobs: list[np.ndarray]  # R x [len] f32 under the distribution sampled (0 greedy, NaN unknown)
  truncated: list[bool]  # R  hit max_new_tokens without EOS


def _validate(prompts, n, max_new_tokens, vocab_size):
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not prompts:
    raise ValueError("no prompts")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty")
    lo, hi = min(prompt), max(prompt)
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
      raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {lo}..{hi}")


def has_fast_path(engine) -> bool:
  return all(hasattr(engine, name) for name in FAST_PATH)


def generate(
  engine,
  params,
  prompts: Sequence[Sequence[int]],
  sampling: Sampling,
  *,
  n: int = 1,
  max_new_tokens: int,
  seed: int = 0,
  steps_per_sync: int = 16,
) -> Generation:
  """n samples of at most `max_new_tokens` tokens for each prompt (lists of token ids) from
  `engine` with `params` (new weights each call compile nothing)."""
  prompts = [[int(t) for t in p] for p in prompts]
  cfg = getattr(engine, "cfg", None)
  _validate(prompts, n, max_new_tokens, None if cfg is None else cfg.vocab_size)
  if steps_per_sync < 1:
    raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
  longest = max(len(p) for p in prompts)
  if longest > engine.max_prefill_length:
    raise ValueError(
      f"prompt of {longest} tokens is longer than the largest prefill bucket "
      f"{engine.max_prefill_length}"
    )
  if not has_fast_path(engine):
    return _run_engine_api(engine, params, prompts, n, max_new_tokens, sampling.eos_ids)
  if longest + max_new_tokens > engine.max_len:
    raise ValueError(
      f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the cache length "
      f"{engine.max_len}"
    )
  params = engine.load_params(params)
  return _run(engine, params, prompts, n, max_new_tokens, sampling, seed, steps_per_sync)


def sample_from(
  model: Qwen,
  prompts: Sequence[Sequence[int]],
  sampling: Sampling,
  *,
  n: int = 1,
  max_new_tokens: int,
  seed: int = 0,
  slots: int = 64,
  prefill_buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> Generation:
  """One-off convenience: builds an engine on the mesh of `model`'s params, sized for these
  prompts, and generates. Loops that sample repeatedly build their engine once instead."""
  longest = max((len(p) for p in prompts), default=1)
  bucket = next((b for b in sorted(prefill_buckets) if b >= longest), longest)
  engine = QwenEngine(
    model,
    slots=min(slots, 1 << (len(prompts) * n - 1).bit_length()) if prompts else slots,
    max_len=bucket + max_new_tokens,
    prefill_buckets=tuple(prefill_buckets),
  )
  params = nnx.state(model, nnx.Param)
  return generate(engine, params, prompts, sampling, n=n, max_new_tokens=max_new_tokens, seed=seed)


def _prefill_length(length: int, limit: int) -> int:
  """Padded prefill length for the Engine API path: a power of two (>= 16), at most `limit`."""
  return min(limit, max(16, 1 << (length - 1).bit_length()))


def _run_engine_api(engine, params, prompts, n, max_new_tokens, eos_ids) -> Generation:
  """The portable path: prefill / insert / one-token generate steps of the Engine API."""
  rows = len(prompts) * n
  eos = set(eos_ids)
  pending = collections.deque(range(rows))
  slot_row = np.full(engine.max_concurrent_decodes, -1)
  left = [n] * len(prompts)
  prefixes: dict[int, object] = {}
  tokens: list[list[int]] = [[] for _ in range(rows)]
  state = engine.init_decode_state()
  while True:
    for s in np.flatnonzero(slot_row < 0):
      if not pending:
        break
      r = pending.popleft()
      i = r // n
      if i not in prefixes:
        prompt = prompts[i]
        padded = np.zeros(_prefill_length(len(prompt), engine.max_prefill_length), np.int32)
        padded[: len(prompt)] = prompt
        prefixes[i] = engine.prefill(params=params, padded_tokens=padded, true_length=len(prompt))
      state = engine.insert(prefixes[i], state, int(s))
      slot_row[s] = r
      left[i] -= 1
      if not left[i]:
        del prefixes[i]
    busy = np.flatnonzero(slot_row >= 0)
    if not len(busy):
      break
    state, result = engine.generate(params, state)
    result = result.convert_to_numpy()
    progressed = False
    for s in busy:
      slot = result.get_result_at_slot(int(s))
      if not slot.valid[0, 0]:
        continue
      progressed = True
      r = slot_row[s]
      tokens[r].append(int(slot.tokens[0, 0]))
      if tokens[r][-1] in eos or len(tokens[r]) >= max_new_tokens:
        slot_row[s] = -1
    if not progressed:
      raise RuntimeError("the engine's generate step returned no valid token for any busy slot")
  return Generation(
    prompts=prompts,
    n=n,
    completions=tokens,
    logprobs=[np.full(len(t), np.nan, np.float32) for t in tokens],
    truncated=[len(t) >= max_new_tokens and t[-1] not in eos for t in tokens],
  )


def _run(engine, params, prompts, n, max_new_tokens, sampling, seed, k) -> Generation:
  """The fast path (see the module docstring)."""
  rows = len(prompts) * n
  b = engine.max_concurrent_decodes
  pending = collections.deque(range(rows))
  slot_row = np.full(b, -1)  # the row a slot is generating, -1 when free
  bound = np.zeros(b, np.int64)  # an upper bound of each slot's length
  limit = np.zeros(b, np.int64)
  left = [n] * len(prompts)  # samples of each prompt not inserted yet
  prefixes: dict[int, tuple] = {}  # prompt -> (Prefix, row), while samples remain to insert
  results: list = [None] * rows
  state = engine.init_decode_state(seed)
  data = None

  def collect(slots_done, lengths):
    toks, lps = sharding.to_host((state.tokens, state.logprobs))
    for s in slots_done:
      r = slot_row[s]
      p, end = len(prompts[r // n]), int(lengths[s])
      results[r] = (toks[s, p:end].tolist(), lps[s, p:end])
      slot_row[s] = -1

  while True:
    free = np.flatnonzero(slot_row < 0)
    if pending and len(free):
      take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
      _prefill(engine, params, prompts, sorted({r // n for r in take} - prefixes.keys()), prefixes)
      groups: dict[int, tuple] = {}  # id(Prefix) -> (Prefix, slots, rows, limits)
      for s, r in zip(free, take, strict=False):
        i = r // n
        prefix, row = prefixes[i]
        _, g_slots, g_rows, g_limits = groups.setdefault(id(prefix), (prefix, [], [], []))
        slot_row[s], bound[s], limit[s] = r, len(prompts[i]), len(prompts[i]) + max_new_tokens
        g_slots.append(int(s)), g_rows.append(row), g_limits.append(int(limit[s]))
        left[i] -= 1
        if not left[i]:
          del prefixes[i]
      for prefix, g_slots, g_rows, g_limits in groups.values():
        state = engine.insert_many(prefix, state, g_slots, g_rows, g_limits)
      data = None  # the last chunk's status predates these slots
    busy = slot_row >= 0
    if not busy.any():
      break
    bound = np.where(busy, np.minimum(bound + k, limit), bound)
    window = engine.window(int(bound[busy].max()))
    previous = data
    state, data = engine.generate_steps(params, state, steps=k, sampling=sampling, window=window)
    if pending:  # sync now: finished slots are refilled before the next chunk
      status = np.asarray(data)
      finished = np.flatnonzero(busy & (status[:, 3] > 0))
      if len(finished):
        collect(finished, status[:, 2])
      bound = np.where(busy, status[:, 2], bound)
    elif previous is not None and np.asarray(previous)[:, 3][busy].all():
      break  # everything was done before this chunk, which exits at once
  left_over = np.flatnonzero(slot_row >= 0)
  if len(left_over):
    collect(left_over, np.asarray(data)[:, 2])
  eos = set(sampling.eos_ids)
  return Generation(
    prompts=prompts,
    n=n,
    completions=[c for c, _ in results],
    logprobs=[lp for _, lp in results],
    truncated=[len(c) >= max_new_tokens and c[-1] not in eos for c, _ in results],
  )


def _prefill(engine, params, prompts, todo, prefixes) -> None:
  """Prefills prompts `todo` by bucket, several per call; records (Prefix, row) of each."""
  by_bucket = collections.defaultdict(list)
  for i in todo:
    by_bucket[engine.bucket(len(prompts[i]))].append(i)
  for bucket, ids in sorted(by_bucket.items()):
    step = engine.max_prefill_rows(bucket)
    for start in range(0, len(ids), step):
      chunk = ids[start : start + step]
      prefix = engine.prefill_many(params, [prompts[i] for i in chunk])
      for row, i in enumerate(chunk):
        prefixes[i] = (prefix, row)
