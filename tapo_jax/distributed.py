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

Starting together: with an explicit coordinator, process count and id, the processes first meet
in a short handshake on the coordinator's port (process 0 listens, the others say who they are)
before `jax.distributed.initialize` takes the port: a process that never starts, a port another
program holds and a process id given twice end every process within config.distributed_timeout_s
with one `error:` line naming the coordinator, the process count and the id (JAX alone waits its
own timeout and then aborts in C++). A watchdog ends JAX's own start-up BACKSTOP_S later.

Failing together: a process that raises reports the error through the coordination service's
key-value store before exiting; every process watches that key (and the coordinator itself) and
exits at once with that error instead of hanging in a collective until a timeout. The first report
wins: a process whose collective breaks because the failed one exited reports second and shows
the first process's error, not its own broken connection. The watchdog is stopped and joined at
exit before JAX shuts jax.distributed down (atexit runs in reverse order of registration): a daemon
thread still inside a call into the coordination client when the interpreter finalizes is ended
by a forced unwind that C++ aborts on ("FATAL: exception not rethrown", exit -6).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

FAILED_KEY = "tapo_jax/failed"


GRACE_S = 0.5  # how long process 0 still listens after the last process joined
BACKSTOP_S = 5.0  # the start-up watchdog fires this long after distributed_timeout_s

_stop = threading.Event()  # set by stop_watchdog: the failure watchdog returns
_watchdog: list[threading.Thread] = []  # the running failure watchdog, if any


class StartupError(RuntimeError):
  """The processes could not start together; `status` is the exit code (2: a config error)."""

  def __init__(self, message: str, status: int = 1):
    super().__init__(message)
    self.status = status


def initialize(cfg) -> None:
  """jax.distributed.initialize from config.distributed_* (empty / -1: detected, as on TPU VMs),
  with gloo collectives for CPU processes, then the failure watchdog. Start-up is bounded by
  config.distributed_timeout_s: past it, or on a failed handshake, this process prints one
  `error:` line and exits (1, or 2 for a process id given twice or disagreeing counts)."""
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or cfg.distributed_coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address, n, i = (
    cfg.distributed_coordinator,
    cfg.distributed_num_processes,
    cfg.distributed_process_id,
  )
  timeout = float(cfg.distributed_timeout_s)
  where = (
    f"distributed start-up (coordinator {address or 'auto-detected'}, process "
    f"{i if i >= 0 else '?'} of {n if n >= 0 else '?'})"
  )
  started = threading.Event()

  def expire():  # the backstop: JAX's own start-up (after the handshake, or auto-detected)
    if not started.wait(timeout + BACKSTOP_S):
      exit_with(
        f"{where}: the processes did not all join within {timeout:g} s "
        f"(config.distributed_timeout_s) + {BACKSTOP_S:g} s"
      )

  threading.Thread(target=expire, name="tapo-startup", daemon=True).start()
  try:
    if address and n > 1 and i >= 0:
      handshake(address, n, i, timeout)
    jax.distributed.initialize(
      coordinator_address=address or None,
      num_processes=n if n >= 0 else None,
      process_id=i if i >= 0 else None,
      heartbeat_timeout_seconds=int(cfg.distributed_heartbeat_s),
      initialization_timeout=int(timeout) + 60,  # ours ends start-up first, in one line
    )
  except StartupError as e:
    exit_with(f"{where}: {e}", e.status)
  except Exception as e:  # noqa: BLE001 - JAX's start-up errors, one line
    text = str(e).strip().splitlines()
    exit_with(f"{where}: {type(e).__name__}: {text[0] if text else ''}")
  started.set()
  if jax.process_count() > 1:
    start_watchdog()


def start_watchdog(poll_s: float = 0.5) -> None:
  """Starts the failure watchdog (`_watch`) and registers `stop_watchdog` at exit. Registered
  after JAX's own clean-up (jax.distributed.shutdown, registered when jax is imported), it runs
  before it."""
  _stop.clear()
  thread = threading.Thread(target=_watch, args=(poll_s,), name="tapo-watchdog", daemon=True)
  thread.start()
  _watchdog.append(thread)
  atexit.register(stop_watchdog)


def stop_watchdog(timeout: float = 10.0) -> None:
  """Stops the failure watchdog and waits for it to leave its last call into the coordination
  client (at most `timeout` seconds); a no-op when none runs."""
  _stop.set()
  while _watchdog:
    _watchdog.pop().join(timeout)


def _split(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]") or "127.0.0.1", int(port)


def _send(conn, obj) -> None:
  conn.sendall((json.dumps(obj) + "\n").encode())


def _receive(conn, deadline: float) -> dict | None:
  """One JSON line from `conn` before `deadline`, None when it closed or sent something else."""
  data = b""
  while not data.endswith(b"\n") and len(data) < 4096:
    conn.settimeout(max(0.01, deadline - time.monotonic()))
    try:
      chunk = conn.recv(4096)
    except (TimeoutError, OSError):
      return None
    if not chunk:
      return None
    data += chunk
  try:
    obj = json.loads(data)
  except ValueError:
    return None
  return obj if isinstance(obj, dict) else None


def handshake(address: str, n: int, i: int, timeout: float) -> None:
  """Meets the other processes on the coordinator's port before JAX uses it (see the module
  doc), for at most `timeout` seconds; raises StartupError naming what is wrong."""
  host, port = _split(address)
  deadline = time.monotonic() + timeout
  within = f"within {timeout:g} s (config.distributed_timeout_s)"
  if i == 0:
    _host_handshake(port, n, deadline, within)
    return
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=max(0.01, deadline - time.monotonic()))
      break
    except OSError:
      if time.monotonic() >= deadline:
        raise StartupError(f"no coordinator (process 0) answered {within}") from None
      time.sleep(0.2)
  with conn:
    _send(conn, {"tapo_jax": 1, "id": i, "n": n})
    reply = _receive(conn, deadline)
  if reply is None:
    raise StartupError(
      "the coordinator's port did not answer as process 0 does (is process 0 running, and is "
      "the port its own?)"
    )
  if not reply.get("ok"):
    raise StartupError(str(reply.get("error", "refused by process 0")), int(reply.get("status", 1)))


def _host_handshake(port: int, n: int, deadline: float, within: str) -> None:
  """Process 0's side: waits for processes 1..n-1, each once, then answers them all."""
  try:
    server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
  except (OSError, ValueError):
    try:
      server = socket.create_server(("", port))
    except OSError as e:
      raise StartupError(
        f"port {port} is in use ({e.strerror}): another program (or another process 0) holds "
        "it; choose a free port"
      ) from None
  joined: dict[int, socket.socket] = {}
  refused: list[socket.socket] = []
  problem, status = None, 1
  grace = None  # once all have joined, a moment more for a process started twice
  with server:
    while True:
      if len(joined) == n - 1 and grace is None:
        grace = min(deadline, time.monotonic() + GRACE_S)
      server.settimeout(max(0.01, (grace or deadline) - time.monotonic()))
      try:
        conn, _ = server.accept()
      except OSError:  # the deadline (or the end of the grace)
        if grace is not None:
          break
        missing = ", ".join(str(k) for k in range(1, n) if k not in joined)
        problem = f"process {missing} did not join {within}"
        break
      hello = _receive(conn, min(deadline, time.monotonic() + 5))
      if hello is None or hello.get("tapo_jax") != 1:
        conn.close()  # not one of ours (a port scanner, a health check)
        continue
      k, their_n = hello.get("id"), hello.get("n")
      if their_n != n:
        problem, status = f"process {k} was started with {their_n} processes, this one {n}", 2
      elif not isinstance(k, int) or not 0 < k < n or k in joined:
        problem, status = f"distributed_process_id={k} was given to two processes", 2
      else:
        joined[k] = conn
        continue
      refused.append(conn)
      break
    answer = {"ok": True} if problem is None else {"error": problem, "status": status}
    for conn in [*joined.values(), *refused]:
      try:
        _send(conn, answer)
        _receive(conn, min(deadline, time.monotonic() + 5))  # it closes first: no TIME_WAIT here
      except OSError:
        pass
      conn.close()
  if problem is not None:
    raise StartupError(problem, status)


def _client():
  from jax._src import distributed

  return distributed.global_state.client


def _watch(poll_s: float = 0.5) -> None:
  """Exits this process as soon as another one has reported a failure or the coordinator is gone."""
  client = _client()
  misses = 0
  while not _stop.wait(poll_s):
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


def exit_with(message: str, status: int = 1) -> None:
  """Prints `error: message` and ends this process at once with `status`, without the
  interpreter's shutdown (atexit handlers, jax.distributed's included)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(status)


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
