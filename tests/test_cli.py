"""The real CLI in subprocesses: bad configs, a run, a clean resume, kill -9 and exact resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small enough for CI; every subprocess shares one persistent compilation cache.
FAST = [
  "--config.rollout.batch_queries=2",
  "--config.rollout.n=4",
  "--config.rollout.slots=8",
  "--config.rollout.max_new_tokens=40",
  "--config.tapo.n_pos=1",
  "--config.tapo.n_neg=1",
  "--config.tapo.m_max=2",
  "--config.optim.micro_batch=4",
  "--config.train.checkpoint_every=1",
]


def _env(tmp_root):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(tmp_root / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    TF_CPP_MIN_LOG_LEVEL="3",
  )
  return env


def _cmd(workdir, *extra):
  return [
    sys.executable, "-m", "tapo_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
    *FAST, *extra,
  ]  # fmt: skip


def _run(env, workdir, *extra, timeout=600):
  return subprocess.run(
    _cmd(workdir, *extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def _final_params(workdir, step):
  import orbax.checkpoint as ocp

  path = pathlib.Path(workdir, "checkpoints", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(path.resolve())
  return tree["params"]


def _flat(tree):
  import jax

  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _steps_logged(workdir):
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines]


BAD = [
  (["--config.mesh.data=3"], "mesh"),
  (["--config.rollout.n=1"], "config.rollout.n=1"),
  (["--config.algorithm=ppo"], "config.algorithm='ppo'"),
  (["--config.mode=serve"], "config.mode='serve'"),
  (["--config.model.path=/nonexistent/model"], "config.model.path='/nonexistent/model'"),
  (["--config.data.train_path=/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
  (["--config.no_such_key=1"], "no_such_key"),
  (["--config.mode=sft"], "config.sft.path"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, flags, message):
  workdir = tmp_path / "wd"
  out = _run(_env(tmp_path), workdir, *flags, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert message in last, out.stderr[-2000:]
  assert last.startswith("error:") or "FATAL" in last or "Error" in last
  assert not workdir.exists()


def test_run_resume_and_kill9_are_bit_identical(tmp_path):
  env = _env(tmp_path)
  straight, chain = tmp_path / "straight", tmp_path / "chain"
  # An uninterrupted 3-step run (also warms the compilation cache for the rest).
  out = _run(env, straight, "--config.train.steps=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert _steps_logged(straight) == [1, 2, 3]
  assert any(pathlib.Path(straight, "tb").iterdir())  # a TensorBoard event file

  # The same run, killed with SIGKILL once its first checkpoint is on disk...
  proc = subprocess.Popen(
    _cmd(chain, "--config.train.steps=3"),
    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  deadline = time.time() + 600
  while not pathlib.Path(chain, "checkpoints", "1").exists():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # ... resumed for 2 steps (a clean stop), then resumed again to the end.
  out = _run(env, chain, "--config.train.steps=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed" in out.stderr
  out = _run(env, chain, "--config.train.steps=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr and "at step 2" in out.stderr

  a, b = _flat(_final_params(straight, 3)), _flat(_final_params(chain, 3))
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # The run really trained: the params moved away from the shipped checkpoint's.
  first = _flat(_final_params(straight, 1))
  assert any(not np.array_equal(first[key], a[key]) for key in a)
