"""The RL step in-process: `setup` then `rl_step` twice gives the metrics `run` writes for the same
config and seed (the `policy` construction: select -> requests -> sample -> rows -> grade)."""

import json

import cli
import jax

from tapo_jax.toy import arith
from tapo_jax.train import loop

# timings, and compile counts (the second setup in one process finds programs compiled)
VARYING = ("time", "perf/compil", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s")


def _config(train):
  return cli.config(
    "ci",
    **{
      "data.train_path": str(train),
      "tapo.construction": "policy",
      "tapo.synthesis_template": "{query}|{incorrect}|{correct}|",  # fits the toy's 256 positions
      "tapo.synthesis_max_new_tokens": 48,
      "optim.micro_batch": 8,
      "train.steps": 2,
      "train.checkpoint_every": 2,
      "train.eval_every": 0,
      "train.eval_at_start": False,
    },
  )


def test_setup_and_two_steps_in_process_equal_the_loop(tmp_path):
  train = tmp_path / "train.jsonl"
  with open(train, "w") as f:
    for p in arith.make_problems(8, seed=1):
      f.write(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n")
  cfg = _config(train)
  loop.run(cfg, str(tmp_path / "loop"))
  want = [json.loads(x) for x in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]

  run, state, start = loop.setup(cfg, str(tmp_path / "steps"))
  try:
    assert start == 0 and run.template is not None
    got = []
    for step in range(2):
      state, out = loop.rl_step(run, state, step)
      got.append(out)
  finally:
    run.close()
  assert int(jax.device_get(state.step)) == 2
  assert got[0]["tapo/constructions_attempted"] > 0  # the synthesis engine sampled
  assert [m["perf/weight_syncs"] for m in got] == [1.0, 1.0]
  for w, g in zip(want, got, strict=True):
    keys = {k for k in w if k != "step" and not k.startswith(VARYING)}
    assert keys == {k for k in g if not k.startswith(VARYING)}
    assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, w["step"]
