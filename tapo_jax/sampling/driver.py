"""generate(): n samples per prompt with continuous batching over a QwenEngine's slots.

Legend: P prompts, R = P * n rows (prompt-major: prompt i's samples are rows i*n .. i*n+n-1),
T padded row length, B slots.

The loop: fill free slots with the next pending (prompt, sample) — one prefill per prompt, inserted
into as many slots as it has samples — then run `steps_per_sync` generate steps in one jitted call
and look at the slots' status on the host. While requests are pending the host syncs after every
chunk (finished slots are read out and refilled); once none are pending, the next chunk is
dispatched before the previous chunk's status is read (a chunk whose slots are all done exits at
once), and the sequences are read back at the end.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import numpy as np
from flax import nnx

from tapo_jax.models.qwen import Qwen
from tapo_jax.sampling.engine import DEFAULT_BUCKETS, QwenEngine
from tapo_jax.sampling.sample import Sampling


@flax.struct.dataclass
class PaddedRollouts:
  """Prompt then response per row, right-padded; what the trainer consumes (numpy arrays)."""

  tokens: np.ndarray  # [R, T] int32
  positions: np.ndarray  # [R, T] int32
  loss_mask: np.ndarray  # [R, T] bool  response tokens
  sampler_logprobs: np.ndarray  # [R, T] f32  logprob of tokens[:, t] as sampled (0 off-response)
  policy_logprobs: np.ndarray  # [R, T] f32  same at temperature 1, untruncated
  prompt_lens: np.ndarray  # [R] int32
  response_lens: np.ndarray  # [R] int32
  truncated: np.ndarray  # [R] bool


@dataclasses.dataclass(frozen=True)
class Generation:
  """n completions per prompt, prompt-major; EOS is included when it was emitted."""

  prompts: list[list[int]]  # P
  n: int
  completions: list[list[int]]  # R
  logprobs: list[np.ndarray]  # R x [len] f32 under the distribution sampled (0 when greedy)
  policy_logprobs: list[np.ndarray]  # R x [len] f32 under the policy, temperature 1
  truncated: list[bool]  # R  hit max_new_tokens without EOS

  def padded(self, length: int | None = None, pad_id: int = 0) -> PaddedRollouts:
    """The rows as right-padded arrays of `length` (default: the longest row)."""
    r = len(self.completions)
    plens = np.array([len(self.prompts[i // self.n]) for i in range(r)], np.int32)
    rlens = np.array([len(c) for c in self.completions], np.int32)
    longest = int((plens + rlens).max()) if r else 0
    t = longest if length is None else length
    if longest > t:
      raise ValueError(f"a row of {longest} tokens does not fit length {t}")
    tokens = np.full((r, t), pad_id, np.int32)
    mask = np.zeros((r, t), bool)
    lps, plps = np.zeros((r, t), np.float32), np.zeros((r, t), np.float32)
    for i, completion in enumerate(self.completions):
      p, n = plens[i], rlens[i]
      tokens[i, :p] = self.prompts[i // self.n]
      tokens[i, p : p + n] = completion
      mask[i, p : p + n] = True
      lps[i, p : p + n] = self.logprobs[i]
      plps[i, p : p + n] = self.policy_logprobs[i]
    return PaddedRollouts(
      tokens=tokens,
      positions=np.broadcast_to(np.arange(t, dtype=np.int32), (r, t)).copy(),
      loss_mask=mask,
      sampler_logprobs=lps,
      policy_logprobs=plps,
      prompt_lens=plens,
      response_lens=rlens,
      truncated=np.array(self.truncated, bool),
    )


_ENGINES: collections.OrderedDict = collections.OrderedDict()


def engine_for(
  model: Qwen,
  *,
  slots: int,
  max_len: int,
  prefill_buckets: Sequence[int] = DEFAULT_BUCKETS,
  mesh: jax.sharding.Mesh | None = None,
) -> QwenEngine:
  """A QwenEngine for models of this structure (cached: same structure, same compiled code)."""
  graphdef = nnx.graphdef(model)
  key = (graphdef, slots, max_len, tuple(prefill_buckets), mesh)
  if key not in _ENGINES:
    _ENGINES[key] = QwenEngine(
      model,
      slots=slots,
      max_len=max_len,
      prefill_buckets=tuple(prefill_buckets),
      mesh=mesh,
      keep_params=False,
    )
    while len(_ENGINES) > 4:
      _ENGINES.popitem(last=False)
  _ENGINES.move_to_end(key)
  return _ENGINES[key]


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
    if lo < 0 or hi >= vocab_size:
      raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {lo}..{hi}")


def generate(
  model: Qwen | None,
  prompts: Sequence[Sequence[int]],
  *,
  n: int = 1,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_p: float = 1.0,
  top_k: int = 0,
  eos_token_ids: Sequence[int] = (),
  seed: int = 0,
  engine: QwenEngine | None = None,
  params=None,
  slots: int | None = None,
  max_len: int | None = None,
  prefill_buckets: Sequence[int] = DEFAULT_BUCKETS,
  mesh: jax.sharding.Mesh | None = None,
  steps_per_sync: int = 16,
) -> Generation:
  """n samples for each prompt (lists of token ids). Pass `engine` (and `params`, new weights
  each RL step) to reuse compiled code; otherwise one is built (and cached) for `model`."""
  prompts = [[int(t) for t in p] for p in prompts]
  if engine is None and model is None:
    raise ValueError("pass a model or an engine")
  cfg = engine.cfg if engine is not None else model.cfg
  _validate(prompts, n, max_new_tokens, cfg.vocab_size)
  sampling = Sampling(float(temperature), float(top_p), int(top_k), tuple(map(int, eos_token_ids)))
  if steps_per_sync < 1:
    raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
  longest = max(len(p) for p in prompts)
  if engine is None:
    buckets = tuple(sorted(prefill_buckets))
    if longest > buckets[-1]:
      raise ValueError(
        f"prompt of {longest} tokens is longer than the largest prefill bucket {buckets[-1]}"
      )
    bucket = next(b for b in buckets if b >= longest)
    rows = len(prompts) * n
    engine = engine_for(
      model,
      slots=slots or min(64, 1 << (rows - 1).bit_length()),
      max_len=max_len or bucket + max_new_tokens,
      prefill_buckets=buckets,
      mesh=mesh,
    )
  else:
    engine.bucket(longest)  # raises for a prompt longer than the largest bucket
  if longest + max_new_tokens > engine.max_len:
    raise ValueError(
      f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the cache length "
      f"{engine.max_len}"
    )
  params = engine.load_params(params if params is not None else model)
  return _run(engine, params, prompts, n, max_new_tokens, sampling, seed, steps_per_sync)


def _run(engine, params, prompts, n, max_new_tokens, sampling, seed, k) -> Generation:
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
    toks, lps, plps = jax.device_get((state.tokens, state.logprobs, state.policy_logprobs))
    for s in slots_done:
      r = slot_row[s]
      p, end = len(prompts[r // n]), int(lengths[s])
      results[r] = (toks[s, p:end].tolist(), lps[s, p:end], plps[s, p:end])
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
    completions=[c for c, _, _ in results],
    logprobs=[lp for _, lp, _ in results],
    policy_logprobs=[plp for _, _, plp in results],
    truncated=[len(c) >= max_new_tokens and c[-1] not in eos for c, _, _ in results],
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
