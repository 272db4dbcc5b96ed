"""Rollouts as RL users expect them: dynamic sampling fills the batch with mixed groups, and the
one-step-off overlap samples step t+1 with step t's params on its own devices, resuming exactly
after kill -9 (real CLI processes on 8 fake CPU devices: 4 sample, 4 train)."""

import json
import pathlib
import signal
import subprocess
import time

import cli
import numpy as np
import pytest

from tapo_jax import config as config_lib
from tapo_jax.data import Problem
from tapo_jax.train import rollouts

ROOT = pathlib.Path(__file__).resolve().parents[1]


class FakeIterator:
  def __init__(self, batches):
    self.batches, self.drawn = list(batches), 0

  def next(self):
    self.drawn += 1
    return self.batches.pop(0)


class ScriptedSampler(rollouts.Sampler):
  """Sampler whose rounds return scripted rewards (the rest of collect() is the real code)."""

  def __init__(self, cfg, rewards_by_round):
    super().__init__(cfg, None, None, None, (0,), None)
    self.rewards_by_round = list(rewards_by_round)

  def _round(self, params, problems, seed, times):
    k = self.cfg.rollout.n
    rewards = np.asarray(self.rewards_by_round.pop(0), np.float32)
    gen = type("G", (), {})()
    gen.completions = [[seed, i] for i in range(len(problems) * k)]
    gen.logprobs = [np.zeros(2, np.float32)] * (len(problems) * k)
    gen.truncated = [False] * (len(problems) * k)
    times["time/rollout"] += 0.0
    return [[len(p.id)] for p in problems], gen, rewards


def _cfg(dynamic, rounds=2):
  c = config_lib.base_config()
  c.rollout.n, c.rollout.batch_queries = 2, 2
  c.rollout.dynamic, c.rollout.resample_rounds = dynamic, rounds
  return c


def _problems(*names):
  return [Problem(id=n, problem=n, answer="1") for n in names]


def test_dynamic_sampling_keeps_mixed_groups_in_draw_order_and_fills_up():
  it = FakeIterator([_problems("a", "b"), _problems("c", "d"), _problems("e", "f")])
  # round 0: a flat, b mixed; round 1: c flat, d mixed -> 2 mixed groups: stop
  s = ScriptedSampler(_cfg(True), [[1, 1, 0, 1], [0, 0, 1, 0]])
  r = s.collect(None, it, step=3)
  assert [p.id for p in r.problems] == ["b", "d"] and it.drawn == 2
  assert r.rewards.tolist() == [0, 1, 1, 0]
  assert r.stats["rollout/groups_sampled"] == 4 and r.stats["rollout/rounds"] == 2
  assert r.stats["rollout/groups_mixed"] == 2
  # budget spent (1 extra round): one mixed group, filled with the first flat one
  it = FakeIterator([_problems("a", "b"), _problems("c", "d")])
  s = ScriptedSampler(_cfg(True, rounds=1), [[1, 1, 0, 0], [0, 1, 1, 1]])
  r = s.collect(None, it, step=0)
  assert [p.id for p in r.problems] == ["c", "a"] and r.stats["rollout/groups_mixed"] == 1
  # off: the first batch as drawn, one round
  it = FakeIterator([_problems("a", "b")])
  r = ScriptedSampler(_cfg(False), [[1, 1, 0, 0]]).collect(None, it, step=0)
  assert [p.id for p in r.problems] == ["a", "b"] and r.stats["rollout/groups_mixed"] == 0


def test_step_rollouts_survive_json_exactly():
  r = rollouts.StepRollouts(
    problems=_problems("a"),
    prompts=[[1, 2]],
    completions=[[3, 4, 5], [6]],
    logprobs=[np.asarray([-0.1, -1e-8, -3.3], np.float32), np.asarray([-7.0], np.float32)],
    truncated=[False, True],
    rewards=np.asarray([1.0, 0.0], np.float32),
    stats={"rollout/rounds": 1.0},
  )
  back = rollouts.StepRollouts.from_json(json.loads(json.dumps(r.to_json())))
  assert back.problems == r.problems and back.completions == r.completions
  for a, b in zip(back.logprobs, r.logprobs, strict=True):
    assert a.dtype == np.float32 and (a == b).all()
  assert (back.rewards == r.rewards).all() and back.truncated == r.truncated


# ------------------------------------------------------------------ one-step-off, real processes

# The CI config (tests/ci_config.py) and:
ASYNC = [
  "--config.rollout.async_steps=1",
  "--config.rollout.sampler_devices=4",
  "--config.loss.rollout_is=token-tis",
  "--config.optim.lr=1e-4",  # one update moves the confident toy visibly (the lag shows)
  "--config.train.steps=4",
  "--config.train.keep_checkpoints=10",
  "--config.train.dump_rollouts_every=1",
]


def _start(workdir):
  log = open(f"{workdir}.log", "a")  # noqa: SIM115
  return subprocess.Popen(
    cli.command(workdir, *ASYNC), cwd=ROOT, env=cli.env(8), stdout=log, stderr=subprocess.STDOUT
  )


def _params(workdir, step):
  import orbax.checkpoint as ocp

  path = pathlib.Path(workdir, "checkpoints", str(step), "state").resolve()
  tree = ocp.StandardCheckpointer().restore(path)["params"]
  return tree


def _flat(tree):
  import jax

  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


@pytest.mark.slow
def test_one_step_off_samples_with_the_previous_params_and_resumes_exactly(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  proc = _start(straight)
  assert proc.wait(timeout=900) == 0, pathlib.Path(f"{straight}.log").read_text()[-3000:]
  log = pathlib.Path(f"{straight}.log").read_text()
  # the 4 sampler devices in the decode layout (2 replicas x the 2 kv heads)
  assert "engine rollout:" in log and "decode layout data=2 x tensor=2" in log
  metrics = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
  assert [m["rollout/staleness"] for m in metrics] == [0, 1, 1, 1]
  assert all(m["perf/weight_syncs"] == 1 for m in metrics)

  # step 3's rollouts (0-based step 2) came from the params after 1 update (checkpoint 1),
  # sampled again here with the run's engine settings and seed
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tapo_jax import policy as policy_lib
  from tapo_jax.data.prompts import format_prompts
  from tapo_jax.data.text import decode_responses, default_eos_ids
  from tapo_jax.sampling import QwenEngine, Sampling, generate
  from tapo_jax.toy import arith

  cfg = config_lib.base_config()
  cfg.model.toy = "arith"
  _, model, tok = policy_lib.load_policy(cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  as_params = lambda tree: jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(tree))  # noqa: E731
  params = as_params(_params(straight, 1))  # the values of checkpoint 1, in the model's tree
  rows = [json.loads(x) for x in (straight / "rollouts" / "step_3.jsonl").read_text().splitlines()]
  originals = [r for r in rows if not r["constructed"]]
  toy = arith.make_problems(4096, seed=12345)  # the run's training problems (ids "arith-i")
  ids = list(dict.fromkeys(r["query"] for r in originals))
  problems = [Problem(id=i, problem=toy[int(i.split("-")[1])].problem, answer="") for i in ids]
  prompts = format_prompts(problems, "{problem}", tok, True, 64)
  engine = QwenEngine(  # the run's weight copy: bf16 (rollout.weight_dtype), here on one device
    model, slots=8, max_len=64 + 40, prefill_buckets=(32, 64), weight_dtype=jnp.bfloat16
  )
  eos = default_eos_ids(tok)
  settings = Sampling(1.3, 1.0, 0, tuple(eos))  # configs/smoke.py's rollout.temperature
  gen = generate(engine, params, prompts, settings, n=4, max_new_tokens=40, seed=2)  # step 2
  assert decode_responses(tok, gen.completions, eos) == [r["response"] for r in originals]
  # the sampler really lagged: its logprobs differ from the trainer's pi_old beyond numerics
  assert max(m["rollout_is/orig_ratio_max"] for m in metrics[1:]) > 1.001

  # kill -9 once checkpoint 2 is on disk, restart: the same final params as the straight run
  proc = _start(killed)
  deadline = time.time() + 900
  while not (killed / "checkpoints" / "2").exists():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc = _start(killed)
  assert proc.wait(timeout=900) == 0, pathlib.Path(f"{killed}.log").read_text()[-3000:]
  a, b = _flat(_params(straight, 4)), _flat(_params(killed, 4))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
