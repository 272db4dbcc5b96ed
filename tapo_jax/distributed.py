"""Multi-controller runs: every host runs the same `main` on the same config (TPU pod slices, GPU
hosts, or local CPU processes), joined by `jax.distributed`.

How the work divides (one program, SPMD): the mesh spans every device of every process; the
train state, the engines' KV caches and the train batch are global arrays sharded over it (rows
and decode slots over the data axes). Every process drives the same engine calls with the same
host-side inputs, so the sampler runs on the whole slice: each host's chips decode their share of
the slots, and no weights are copied between a trainer and a sampler. What the host needs of a
global array (sampled token ids, a batch's rows) it reads gathered (`sharding.to_host`), so every
process holds every rollout: DCS and DAE groups are never split, and every process computes the
same constructions and advantages. Grading is divided: each process grades every P-th response
in its own verifier pool and the rewards are gathered (`divide`), so a verifier timeout can never
make two processes disagree. Only process 0 writes metrics, rollout dumps, eval files and
exports; Orbax saves and restores collectively; the data iterator is the same on every process.

Failing together: a process that raises reports the error through the coordination service's
key-value store before exiting; every process watches that key (and the coordinator itself) and
exits at once with that error instead of hanging in a collective until a timeout. The first report
wins: a process whose collective breaks because the failed one exited reports second and shows
the first process's error, not its own broken connection.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

FAILED_KEY = "tapo_jax/failed"


def initialize(cfg) -> None:
  """jax.distributed.initialize from config.distributed_* (empty / -1: detected, as on TPU VMs),
  with gloo collectives for CPU processes, then the failure watchdog."""
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or cfg.distributed_coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=cfg.distributed_coordinator or None,
    num_processes=cfg.distributed_num_processes if cfg.distributed_num_processes >= 0 else None,
    process_id=cfg.distributed_process_id if cfg.distributed_process_id >= 0 else None,
    heartbeat_timeout_seconds=int(cfg.distributed_heartbeat_s),
  )
  if jax.process_count() > 1:
    threading.Thread(target=_watch, name="tapo-watchdog", daemon=True).start()


def _client():
  from jax._src import distributed

  return distributed.global_state.client


def _watch(poll_s: float = 0.5) -> None:
  """Exits this process as soon as another one has reported a failure or the coordinator is gone."""
  client = _client()
  misses = 0
  while True:
    time.sleep(poll_s)
    try:
      message = client.key_value_try_get(FAILED_KEY)
      misses = 0
    except Exception as e:  # noqa: BLE001 - "not found" is the normal answer
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        misses = 0
        continue
      misses += 1
      if misses < 6:
        continue
      message = f"lost the coordinator (process 0): {str(e).splitlines()[0]}"
    exit_with(message)


def exit_with(message: str) -> None:
  """Prints `error: message` and ends this process at once with status 1, without the
  interpreter's shutdown (atexit handlers, jax.distributed's included)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(1)


def report_failure(message: str) -> str | None:
  """Tells every other process to stop with `message` (no-op in a single-process run). The first
  report wins: returns the message of a process that reported before this one (its error is the
  cause; this one's, a collective cut off by that process's exit, is only the echo), else None."""
  if jax.process_count() <= 1:
    return None
  client = _client()
  try:
    client.key_value_set(FAILED_KEY, f"process {jax.process_index()}: {message}")
    return None
  except Exception:  # noqa: BLE001 - already set by another process, or the coordinator is gone
    try:
      return client.key_value_try_get(FAILED_KEY)
    except Exception:  # noqa: BLE001
      return None


def is_main() -> bool:
  """The process that writes files (metrics, dumps, exports)."""
  return jax.process_index() == 0


def agree(value: bool) -> bool:
  """Process 0's `value` on every process (a decision taken from a shared file, say, that every
  process must take the same way: each then runs the same collectives)."""
  if jax.process_count() == 1:
    return bool(value)
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def divide(fn: Callable[[list], Sequence[float]], items: Sequence) -> np.ndarray:
  """fn over items, each process doing every P-th item, the results gathered (float32 [N])."""
  p, i = jax.process_count(), jax.process_index()
  if p == 1:
    return np.asarray(fn(list(items)), np.float32)
  from jax.experimental import multihost_utils

  mine = list(range(i, len(items), p))
  local = np.zeros(len(items), np.float32)
  if mine:
    local[mine] = np.asarray(fn([items[j] for j in mine]), np.float32)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [P, N]
  owner = np.arange(len(items)) % p
  return gathered[owner, np.arange(len(items))]


def divided(grade: Callable[[list[str], list], Sequence[float]]):
  """A `grade(texts, golds)` whose work is divided over the processes (see `divide`)."""

  def run(texts, golds):
    pairs = list(zip(texts, golds, strict=True))
    return divide(lambda part: grade([t for t, _ in part], [g for _, g in part]), pairs)

  return run
