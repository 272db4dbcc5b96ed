"""The whole RL loop on an 8-device mesh vs one device, real CLI processes: every engine a run
builds decodes in the decode layout over all the devices, one weight sync per step, and the first
step's rollouts and losses do not depend on how the mesh is cut. Both constructions, the
difficulty filter and periodic eval are on."""

import json
import pathlib
import re
import subprocess

import cli
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _problems(path, n, seed):
  from tapo_jax.toy import arith

  with open(path, "w") as f:
    for i, p in enumerate(arith.make_problems(n, seed=seed)):
      f.write(json.dumps({"id": f"t{i}", "problem": p.problem, "answer": p.answer}) + "\n")
  return str(path)


def _run(tmp_path, name, devices, construction, *mesh):
  workdir = tmp_path / name
  cmd = cli.command(
    workdir, f"--config.data.train_path={_problems(tmp_path / 'train.jsonl', 8, 1)}",
    f"--config.eval.paths={_problems(tmp_path / 'held.jsonl', 4, 2)}",
    "--config.data.pass_rate_window=(0.0, 1.0)", "--config.train.eval_every=2",
    "--config.eval.k=2", "--config.eval.pass_ks=(1, 2)", "--config.eval.max_new_tokens=32",
    "--config.train.steps=2",
    "--config.train.checkpoint_every=2", "--config.train.dump_rollouts_every=1",
    f"--config.tapo.construction={construction}",
    "--config.tapo.synthesis_template={query}|{incorrect}|{correct}|",
    "--config.tapo.synthesis_max_new_tokens=48", *mesh,
  )  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, env=cli.env(devices), capture_output=True, text=True,
                       timeout=900)  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  rollouts = (workdir / "rollouts" / "step_1.jsonl").read_text().splitlines()
  layout = r"^engine (\w+): .*decode layout (data=\d+ x tensor=\d+)"
  engines = re.findall(layout, out.stderr, re.M)
  return metrics, [json.loads(r) for r in rollouts], dict(engines)


@pytest.mark.parametrize("construction", ["divergence", "policy"])
@pytest.mark.slow
def test_rl_loop_on_eight_devices_matches_one_device(tmp_path, construction):
  m1, r1, e1 = _run(tmp_path, "one", 1, construction)
  m8, r8, e8 = _run(tmp_path, "eight", 8, construction, "--config.mesh.fsdp=4",
                    "--config.mesh.tensor=2")  # fmt: skip
  want = {"rollout", "eval"} | ({"synthesis"} if construction == "policy" else set())
  assert set(e8) == set(e1) == want
  # every engine decodes in the decode layout: the 8 devices as 4 replicas x 2 (the kv heads)
  assert set(e8.values()) == {"data=4 x tensor=2"}
  assert set(e1.values()) == {"data=1 x tensor=1"}
  for m in (m1, m8):  # one decode copy per step (the eval's copy serves the next step)
    assert [s["perf/weight_syncs"] for s in m if "loss" in s] == [1.0, 1.0]
  assert r8 == r1  # the first step's rollouts, rewards and constructions
  assert sum(not r["constructed"] for r in r1) == 8
  if construction == "divergence":
    assert any(r["constructed"] for r in r1)
  step1 = [m for m in m1 if m["step"] == 1 and "loss" in m][0]
  step8 = [m for m in m8 if m["step"] == 1 and "loss" in m][0]
  for key in ("loss", "loss/orig", "loss/ref", "reward/accuracy"):  # abs: loss/orig is 0 in theory
    assert step8[key] == pytest.approx(step1[key], rel=1e-5, abs=1e-6), key
  assert step8["grad_norm"] == pytest.approx(step1["grad_norm"], rel=1e-4)  # sharded reductions
  evals = [m for m in m8 if any(k.startswith("eval/") for k in m)]
  assert [m["step"] for m in evals] == [2] and "eval/held/avg@2" in evals[0]
