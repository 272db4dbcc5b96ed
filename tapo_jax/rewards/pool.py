"""Grading in worker processes with a hard per-item kill: `VerifierPool`, `grade_batch`.

Extraction and the integer fast path run in the caller (linear-time string work); everything
that touches sympy runs in a worker started from a fresh interpreter (forkserver, else spawn:
never fork, since the trainer has JAX threads running). Each worker has an address-space limit.
An item past its deadline gets its worker SIGKILLed and scores 0.0; a dead worker is replaced
and the item it held is retried once on a fresh worker (a second death scores 0.0).
"""

import atexit
import collections
import contextlib
import multiprocessing as mp
import os
import resource
import signal
import sys
import time
import types
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

from tapo_jax.rewards.extract import EXTRACT_MODES, extract_answer
from tapo_jax.rewards.math import fast_equal, is_equivalent, is_non_finite_gold

_PRELOAD = ["tapo_jax.rewards.math"]


def _worker_main(conn, memory_mb: int, check: Callable[[str, str], bool]) -> None:
  """Answer (index, answer, gold) messages with (index, ok) until told to stop."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
  if memory_mb:
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    index, answer, gold = msg
    try:
      ok = bool(check(gold, answer))
    except MemoryError:  # wrong, and this process may be left in a bad state: replace it
      conn.send((index, False))
      return
    except Exception:  # any failure to verify is a wrong answer
      ok = False
    conn.send((index, ok))


@contextlib.contextmanager
def _main_hidden():
  """Start children without re-importing the caller's __main__ (a script, or the trainer)."""
  main = sys.modules.get("__main__")
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


class _Worker:
  def __init__(self, ctx, memory_mb: int, check):
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_worker_main, args=(child, memory_mb, check), daemon=True)
    with _main_hidden():
      self.process.start()
    child.close()

  @property
  def pid(self) -> int:
    return self.process.pid

  def alive(self) -> bool:
    return self.process.is_alive()

  def kill(self) -> None:
    if self.process.is_alive():
      self.process.kill()
    self.process.join(timeout=5)
    self.conn.close()


def _context():
  methods = mp.get_all_start_methods()
  if "forkserver" in methods:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # workers fork from a server that imported sympy once
    return ctx
  return mp.get_context("spawn")


class VerifierPool:
  """A reusable set of verifier worker processes; use as a context manager or call close().

  One caller at a time (not thread-safe). `check(gold, answer) -> bool` must be a top-level
  function importable by name (it is pickled by reference).
  """

  def __init__(
    self,
    workers: int = 2,
    timeout_s: float = 5.0,
    memory_mb: int = 2048,
    check: Callable[[str, str], bool] = is_equivalent,
    depth: int = 2,
    extract: str = "boxed",
  ):
    if extract not in EXTRACT_MODES:
      raise ValueError(f"unknown answer extraction {extract!r}; expected one of {EXTRACT_MODES}")
    self.workers = max(1, int(workers))
    self.timeout_s = float(timeout_s)
    self.memory_mb = int(memory_mb)
    self.check = check  # (gold, answer) -> bool, a picklable top-level function
    self.depth = max(1, int(depth))  # items in flight per worker
    self.extract = extract  # how grade() finds the answer: "boxed" | "answer_line" (extract.py)
    self._ctx = _context()
    self._pool: list[_Worker] = []
    self._owner = os.getpid()  # a forked copy of this object must not stop the owner's workers
    self.restarts = 0  # workers replaced after a timeout or a crash

  def start(self) -> "VerifierPool":
    """Start the worker processes now (otherwise the first call that needs them does)."""
    while len(self._pool) < self.workers:
      self._pool.append(_Worker(self._ctx, self.memory_mb, self.check))
    return self

  def pids(self) -> list[int]:
    """Process ids of the current workers."""
    return [w.pid for w in self._pool]

  def _replace(self, worker: _Worker) -> _Worker:
    worker.kill()
    self.restarts += 1
    new = _Worker(self._ctx, self.memory_mb, self.check)
    self._pool[self._pool.index(worker)] = new
    return new

  def check_pairs(
    self, pairs: Sequence[tuple[str, str]], timeout_s: float | None = None
  ) -> list[bool]:
    """check(gold, answer) for each (answer, gold) pair in workers; a timeout or crash is False."""
    timeout = self.timeout_s if timeout_s is None else float(timeout_s)
    results = [False] * len(pairs)
    if not pairs:
      return results
    self.start()
    pending = collections.deque((i, 0) for i in range(len(pairs)))  # (index, tries)
    queued = {w: collections.deque() for w in self._pool}  # sent to a worker, in order
    deadline: dict[_Worker, float] = {}  # of the item at the head of a worker's queue

    def retire(worker: _Worker, crashed: bool) -> None:
      """Replace a dead or hung worker; items queued behind its current one are re-sent."""
      q = queued.pop(worker)
      deadline.pop(worker, None)
      if q:
        i, tries = q.popleft()
        pending.extendleft(reversed(q))
        if crashed and tries == 0:  # retry once: the crash may not be this item's fault
          pending.appendleft((i, 1))
      queued[self._replace(worker)] = collections.deque()

    while pending or any(queued.values()):
      for worker in list(self._pool):
        q = queued[worker]
        if not q and pending and not worker.alive():  # died while idle (killed from outside)
          retire(worker, crashed=False)
          continue
        while pending and len(q) < self.depth:  # a second item hides the round trip
          i, tries = pending.popleft()
          try:
            worker.conn.send((i, *pairs[i]))
          except (OSError, ValueError):
            pending.appendleft((i, tries))
            retire(worker, crashed=True)
            break
          if not q:
            deadline[worker] = time.monotonic() + timeout
          q.append((i, tries))
      busy = [w for w in self._pool if queued[w]]
      if not busy:
        continue
      wait_s = max(0.0, min(deadline[w] for w in busy) - time.monotonic())
      ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], wait_s))
      for worker in busy:
        q = queued[worker]
        try:
          while q and worker.conn.poll():
            index, ok = worker.conn.recv()
            i, _ = q.popleft()
            results[i] = bool(ok) and index == i
            if q:
              deadline[worker] = time.monotonic() + timeout
        except (EOFError, OSError):
          pass  # it died; the sentinel tells
        if q and worker.process.sentinel in ready:
          retire(worker, crashed=True)
        elif q and time.monotonic() >= deadline[worker]:
          retire(worker, crashed=False)  # hard kill; the item stays False
    return results

  def grade(
    self,
    responses: Sequence[str],
    golds: Sequence[str],
    timeout_s: float | None = None,
    extract: str | None = None,
  ) -> list[float]:
    """1.0 / 0.0 per (response, gold); integer golds with plain integer answers skip the pool.

    `extract` overrides the pool's extraction mode for this call.
    """
    if len(responses) != len(golds):
      raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    extract = self.extract if extract is None else extract
    scores = [0.0] * len(responses)
    todo, where = [], []
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
      answer = extract_answer(response, extract)
      if answer is None or gold is None or is_non_finite_gold(gold):
        continue
      fast = fast_equal(str(gold), answer)
      if fast is not None:
        scores[i] = float(fast)
        continue
      todo.append((answer, str(gold)))
      where.append(i)
    for i, ok in zip(where, self.check_pairs(todo, timeout_s), strict=True):
      scores[i] = float(ok)
    return scores

  def close(self) -> None:
    """Stop every worker (politely, then by force)."""
    if os.getpid() != self._owner:
      return
    for worker in self._pool:
      try:
        worker.conn.send(None)
      except (OSError, ValueError):
        pass
    deadline = time.monotonic() + 1.0
    for worker in self._pool:
      worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
      worker.kill()
    self._pool = []

  def __enter__(self) -> "VerifierPool":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


_DEFAULT: VerifierPool | None = None


def _close_default() -> None:
  global _DEFAULT
  if _DEFAULT is not None:
    _DEFAULT.close()
    _DEFAULT = None


atexit.register(_close_default)


def grade_batch(
  responses: Sequence[str],
  golds: Sequence[str],
  *,
  timeout_s: float = 5.0,
  workers: int = 2,
  memory_mb: int = 2048,
  extract: str = "boxed",
) -> list[float]:
  """grade() over a batch in a module-level VerifierPool (kept between calls, closed at exit);
  extract: "boxed" | "answer_line" (see extract.py)."""
  global _DEFAULT
  if _DEFAULT is not None and (_DEFAULT.workers, _DEFAULT.memory_mb) != (workers, memory_mb):
    _close_default()
  if _DEFAULT is None:
    _DEFAULT = VerifierPool(workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
  return _DEFAULT.grade(responses, golds, timeout_s=timeout_s, extract=extract)
