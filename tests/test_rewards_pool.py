"""The verifier pool: hard timeouts, killed and crashed workers, memory limit, fast path."""

import os
import signal
import threading
import time

import pytest

from tapo_jax.rewards import pool as pool_lib
from tapo_jax.rewards.math import is_equivalent
from tapo_jax.rewards.pool import VerifierPool, grade_batch


def hooked_check(gold: str, answer: str) -> bool:
  """is_equivalent, plus test hooks: crash, hang, slow (then grade the rest), allocate."""
  if answer == "crash":
    os._exit(3)
  if answer == "hang":
    while True:
      pass
  if answer == "allocate":
    return len(bytearray(3 * 2**30)) > 0  # over the worker's address-space limit
  if answer.startswith("slow "):
    time.sleep(0.6)
    answer = answer[5:]
  return is_equivalent(gold, answer)


@pytest.fixture(scope="module")
def pool():
  import jax.numpy as jnp

  assert float(jnp.ones(4).sum()) == 4.0  # like the trainer: JAX loaded, its threads running
  with VerifierPool(workers=2, timeout_s=10.0, memory_mb=1024, check=hooked_check) as p:
    yield p


def test_workers_are_not_forked_from_the_parent(pool):
  assert pool._ctx.get_start_method() in ("forkserver", "spawn")
  assert len(set(pool.pids())) == 2 and os.getpid() not in pool.pids()


def test_check_pairs_in_workers(pool):
  pairs = [(r"\frac{1}{2}", "0.5"), ("0.333", r"\frac13"), ("x > 3", r"(3, \infty)"), ("7", "7")]
  assert pool.check_pairs(pairs) == [True, False, True, True]


def test_hang_is_killed_and_the_batch_goes_on(pool):
  before = pool.restarts
  pids = set(pool.pids())
  out = pool.check_pairs([("1", "1"), ("hang", "1"), ("2", "2"), ("3", "4")], timeout_s=0.5)
  assert out == [True, False, True, False]
  assert pool.restarts == before + 1
  assert len(pids - set(pool.pids())) == 1  # the hung worker was replaced


def test_crash_is_replaced_and_scores_zero(pool):
  before = pool.restarts
  pairs = [("crash", "5"), ("5", "5"), ("crash", "1"), ("7", "7")]
  assert pool.check_pairs(pairs) == [False, True, False, True]
  assert pool.restarts == before + 4  # each crashing item is retried once
  assert pool.check_pairs([("9", "9")]) == [True]


def test_worker_killed_between_calls(pool):
  os.kill(pool.pids()[0], signal.SIGKILL)
  time.sleep(0.05)
  assert pool.check_pairs([("5", "5"), ("6", "5"), ("1/2", "0.5")]) == [True, False, True]


def test_worker_killed_during_a_call(pool):
  victim = pool.pids()[0]
  killer = threading.Timer(0.2, os.kill, (victim, signal.SIGKILL))
  killer.start()
  out = pool.check_pairs([("slow 5", "5"), ("slow 6", "6"), ("slow 7", "8")])
  killer.join()
  assert out == [True, True, False]  # the interrupted item was retried on a fresh worker
  assert victim not in pool.pids()


def test_memory_limit(pool):
  assert pool.check_pairs([("allocate", "1"), ("2", "2")]) == [False, True]


def test_grade_uses_the_fast_path_without_workers():
  p = VerifierPool(workers=1)
  scores = p.grade(
    [r"\boxed{7,425,000}", r"\boxed{12}", "no box 5", r"\boxed{013}"], ["7425000"] * 2 + ["5", "13"]
  )
  assert scores == [1.0, 0.0, 0.0, 1.0]
  assert p.pids() == []  # never started
  p.close()


ADVERSARIAL_RESPONSES = [
  r"\boxed{9^{9^{9^9}}}",
  r"\boxed{" + "{" * 5000 + "5" + "}" * 5000 + "}",
  r"\boxed{(" * 5000 + "5" + ")}" * 5000,
  "5" * 100_000,
  "x" * 100_000 + r"\boxed{4}",
  r"\boxed{__import__('os').system('touch /tmp/pwned')}",
  r"\boxed{(10^{1000})!}",
  r"\boxed{2^{2^{2^{2^{2^{2}}}}}}",
  r"\boxed{(1+\sqrt{2})^{64} - (1+\sqrt{2})^{64} + 5.0001}",
  r"\boxed{\sin(10^{999})}",
  "<think>" + r"\boxed{5}" * 1000 + "</think>",
]


def test_adversarial_responses_score_zero_within_the_timeout():
  responses = ADVERSARIAL_RESPONSES + [r"the answer is \boxed{\frac{10}{2}}"]
  golds = ["5"] * len(responses)
  scores = grade_batch(responses, golds, timeout_s=3.0, workers=1)
  assert scores == [0.0] * len(ADVERSARIAL_RESPONSES) + [1.0]
  default = pool_lib._DEFAULT
  assert default.restarts == 0  # screened in the worker: nothing needed killing
  assert grade_batch([r"\boxed{0.5}"], [r"\frac12"], timeout_s=3.0, workers=1) == [1.0]
  assert pool_lib._DEFAULT is default  # reused across calls
  pool_lib._close_default()
  assert pool_lib._DEFAULT is None


def test_grade_checks_lengths():
  with pytest.raises(ValueError):
    VerifierPool().grade(["a"], [])


def test_extraction_mode_and_non_finite_golds_in_the_pool(pool):
  responses = ["x\nAnswer: $0.5$", r"\boxed{0.5}", r"\boxed{nan}", r"\boxed{\infty}", "Answer: 7"]
  golds = [r"\frac12", r"\frac12", float("nan"), "Infinity", "7"]
  assert pool.grade(responses, golds) == [0.0, 1.0, 0.0, 0.0, 0.0]
  assert pool.grade(responses, golds, extract="answer_line") == [1.0, 0.0, 0.0, 0.0, 1.0]
  p = VerifierPool(workers=1, extract="answer_line")
  assert p.grade(["Answer: 13"], ["13"]) == [1.0]  # the fast path, no worker started
  assert p.pids() == []
  p.close()
  with pytest.raises(ValueError, match="answer_line"):
    VerifierPool(extract="last_number")
  batch = grade_batch(["x\nAnswer: 0.5"], ["1/2"], timeout_s=3.0, workers=1, extract="answer_line")
  assert batch == [1.0]
  pool_lib._close_default()
