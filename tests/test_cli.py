"""The real CLI: bad configs (in this process, and once in a subprocess), then in subprocesses a
run, a clean resume, kill -9 and exact resume. The runs use the CI config (tests/ci_config.py);
every subprocess shares the run's persistent compilation cache (tests/conftest.py)."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import time

import cli
import numpy as np
import pytest

ROOT = cli.ROOT


def _final_params(workdir, step):
  import orbax.checkpoint as ocp

  path = pathlib.Path(workdir, "checkpoints", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(path.resolve())
  return tree["params"]


def _flat(tree):
  import jax

  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


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
  (["--config.mode=eval", "--config.eval.k=2"], "config.eval.pass_ks=(1, 4)"),
  (["--config.data.pass_rate_window=(0.5, 0.2)"], "config.data.pass_rate_window=(0.5, 0.2)"),
  (["--config.tapo.ref_baseline=group"], "config.tapo.ref_baseline='group' with tapo.constru"),
  (["--config.tapo.synthesis_max_new_tokens=16"], "config.tapo.synthesis_max_new_tokens=16"),
  (["--config.tapo.min_anchor=1.5"], "config.tapo.min_anchor=1.5"),
  # Non-finite or absurd hyper-parameters, rejected before any work.
  (["--config.optim.lr=nan"], "config.optim.lr=nan: must be a finite number"),
  (["--config.optim.lr=1e6"], "config.optim.lr=1000000.0: a learning rate above 1"),
  (["--config.optim.b1=inf"], "config.optim.b1=inf: must be a finite number"),
  (["--config.optim.b2=nan"], "config.optim.b2=nan"),
  (["--config.optim.weight_decay=-inf"], "config.optim.weight_decay=-inf"),
  (["--config.optim.grad_clip=nan"], "config.optim.grad_clip=nan"),
  (["--config.loss.eps_low=nan"], "config.loss.eps_low=nan"),
  (["--config.loss.eps_high=inf"], "config.loss.eps_high=inf"),
  (["--config.tapo.lam=nan"], "config.tapo.lam=nan"),
  (["--config.rollout.temperature=inf"], "config.rollout.temperature=inf"),
  (["--config.eval.temperature=nan"], "config.eval.temperature=nan"),
  # Counts and lengths that crashed mid-run.
  (["--config.optim.micro_batch=0"], "config.optim.micro_batch=0: must be an integer >= 1"),
  (["--config.optim.ppo_epochs=0"], "config.optim.ppo_epochs=0"),
  (["--config.optim.minibatches=0"], "config.optim.minibatches=0"),
  (["--config.optim.micro_batch_tokens=64"], "config.optim.micro_batch_tokens=64: less than one"),
  (["--config.rollout.prefill_buckets=()"], "config.rollout.prefill_buckets=(): expected a non"),
  (["--config.rollout.prefill_buckets=(0, 64)"], "config.rollout.prefill_buckets=(0, 64)"),
  (["--config.reward.timeout_s=0"], "config.reward.timeout_s=0.0: must be > 0"),
  (["--config.reward.workers=0"], "config.reward.workers=0"),
  (["--config.data.prompt_template={problem} {answer}"], "unknown field {answer}"),
  (["--config.tapo.max_len=100"], "config.tapo.max_len=100: must be >= data.max_prompt_tokens"),
  (["--config.data.train_path=tests"], "config.data.train_path='tests': is a directory"),
]


def _one_error_line(out, status=2):
  """The run ended with `status`, its last stderr line an error and no traceback; that line."""
  assert out.returncode == status, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") or "FATAL" in last or "Error" in last, last
  return last


@pytest.mark.parametrize("flags,message", BAD, ids=[m[:60] for _, m in BAD])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, flags, message):
  """main() in this process, on 8 devices: everything here ends before any work."""
  workdir = tmp_path / "wd"
  out = cli.main_in_process(f"--config={cli.CI}", f"--workdir={workdir}", *flags)
  assert message in _one_error_line(out), out.stderr[-2000:]
  assert not workdir.exists()


def test_bad_config_in_a_real_process_exits_2_with_one_line(tmp_path):
  """The same through `python -m tapo_jax.main` on one device (absl's app.run around main)."""
  workdir = tmp_path / "wd"
  out = cli.run(workdir, "--config.rollout.n=1", "--config.optim.lr=nan", timeout=120)
  assert (
    _one_error_line(out) == "error: config.rollout.n=1: GRPO/TAPO need K >= 2 samples per query"
  )
  assert not workdir.exists()


def test_bad_data_is_one_line_and_leaves_no_workdir(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"problem": "1+1", "answer": 2}\n{"problem": "0/0", "answer": NaN}\n')
  workdir = tmp_path / "wd"
  out = cli.run(workdir, f"--config.data.train_path={data}", timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {data}: line 2: field 'answer'") and "NaN" in last
  assert "Traceback" not in out.stderr and not workdir.exists()


def test_a_config_file_that_cannot_load_is_one_line(tmp_path):
  """Issue 24.7: a missing --config file was a traceback (so was a config that raises)."""
  (tmp_path / "raises.py").write_text("def get_config():\n  return undefined_name\n")
  cases = {
    str(tmp_path / "nope.py"): f"error: --config={tmp_path / 'nope.py'}: no such file",
    str(tmp_path): f"error: --config={tmp_path}: is a directory",
    str(tmp_path / "raises.py"): "NameError: name 'undefined_name' is not defined",
  }
  for config, message in cases.items():
    out = cli.main_in_process(f"--config={config}", f"--workdir={tmp_path}/w")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_zero_steps_ends_cleanly(tmp_path):
  """Issue 24.7: train.steps=0 exported the model and then died plotting an empty metrics.jsonl."""
  out = cli.run(tmp_path / "wd", "--config.train.steps=0", timeout=300)
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert (tmp_path / "wd" / "hf" / "model.safetensors").exists()


def test_second_run_on_a_busy_workdir_exits_2_naming_the_holder(tmp_path):
  from tapo_jax.train import workdir as workdir_lib

  workdir = tmp_path / "wd"
  with workdir_lib.hold(str(workdir)):
    out = cli.run(workdir, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last == (
    f"error: {workdir} is in use by another run (pid {os.getpid()}); wait for it to finish, "
    "stop it, or use another --workdir"
  )
  assert sorted(os.listdir(workdir)) == [".lock"]  # nothing else written


def test_unwritable_workdir_is_one_line_exit_1(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  out = cli.main_in_process(f"--config={cli.CI}", f"--workdir={blocker / 'wd'}")  # under a file
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1] == f"error: {blocker / 'wd'}: Not a directory"
  assert "Traceback" not in out.stderr


@pytest.fixture
def full_disk(tmp_path):
  """A 1 MiB tmpfs filled up (skipped where mounting is not allowed)."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if (
    os.geteuid() != 0
    or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode
  ):
    pytest.skip("mounting a tmpfs needs root")
  try:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
      while True:
        os.write(fd, b"x" * 4096)
    os.close(fd)
    yield mnt
  finally:
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_one_line_exit_1(full_disk):
  workdir = full_disk / "wd"
  out = cli.run(workdir, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "No space left on device; free some space" in last
  assert "Traceback" not in out.stderr and not workdir.exists()


def test_full_disk_during_an_orbax_save_is_named(full_disk):
  from tapo_jax import main
  from tapo_jax.train import checkpoint

  ck = checkpoint.Checkpointer(str(full_disk / "wd"), 1, 2)
  state = {"w": np.ones((256, 1024), np.float32)}  # 1 MiB: more than the disk has left
  with pytest.raises(Exception) as e:  # noqa: B017 (Orbax re-raises as ValueError today)
    ck.save(1, state, {"data": {}})
    ck.close()
  line = main.io_error(e.value, str(full_disk / "wd"))
  assert line is not None and "No space left on device; free some space" in line
  assert line.startswith(str(full_disk / "wd"))
  assert checkpoint.steps(str(full_disk / "wd")) == []  # no finished step: only Orbax's tmp dir


def test_a_failed_save_stops_the_run_before_another_update(full_disk, tmp_path):
  """Issue 24.8: checkpoints on a full disk (WORKDIR/checkpoints links there), metrics beside:
  the step-1 save fails asynchronously, and the run stops before step 2 updates (it used to
  train step 2 and fail at its save)."""
  workdir = tmp_path / "wd"
  workdir.mkdir()
  (full_disk / "ckpts").mkdir()
  (workdir / "checkpoints").symlink_to(full_disk / "ckpts")
  out = cli.run(workdir, "--config.train.steps=3", timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "No space left on device" in out.stderr.strip().splitlines()[-1], out.stderr[-3000:]
  assert _steps_logged(workdir) == [1]


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_current_step_and_exits_0(tmp_path):
  workdir = tmp_path / "wd"
  proc = subprocess.Popen(
    cli.command(workdir, "--config.train.steps=40", "--config.train.checkpoint_every=100"),
    cwd=ROOT, env=cli.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  deadline = time.time() + 600
  while not (workdir / "metrics.jsonl").exists() or not _steps_logged(workdir):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  last = _steps_logged(workdir)[-1]
  assert last < 40 and sorted(int(p) for p in os.listdir(workdir / "checkpoints")) == [last]


def _wait_for_checkpoint(proc, workdir, step, deadline_s=600):
  """Blocks until checkpoint `step` is on disk; False if the process ended first."""
  deadline = time.time() + deadline_s
  while not pathlib.Path(workdir, "checkpoints", str(step)).exists():
    if proc.poll() is not None:
      return False
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.1)
  return True


@pytest.mark.slow
def test_run_resume_and_kill9_are_bit_identical(tmp_path):
  env = cli.env()
  straight, chain = tmp_path / "straight", tmp_path / "chain"
  # An uninterrupted 3-step run (also warms the compilation cache for the rest), with an eval
  # before the first step and a periodic one at step 2 (greedy too), which must not perturb
  # training; dynamic sampling draws extra queries from the data iterator, which resume must
  # replay exactly.
  dynamic = "--config.rollout.dynamic=True"
  out = cli.run(
    straight,
    dynamic,
    "--config.train.steps=3",
    "--config.train.eval_every=2",
    "--config.train.eval_at_start=True",
    "--config.eval.greedy=True",
    "--config.eval.k=2",
    "--config.eval.pass_ks=1,2",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert _steps_logged(straight) == [0, 1, 2, 2, 3]  # each eval summary is its own line
  assert (straight / "eval" / "step_2" / "arith.jsonl").exists()
  rows = map(json.loads, (straight / "metrics.jsonl").open())
  evals = [m for m in rows if "eval/arith/avg@2" in m]
  assert [m["step"] for m in evals] == [0, 2]
  assert all(0.0 <= m["eval/arith/greedy"] <= 1.0 for m in evals)
  change = (
    f"held-out arith greedy: {evals[0]['eval/arith/greedy']:.3f} (step 0) -> "
    f"{evals[1]['eval/arith/greedy']:.3f} (step 2)"
  )
  assert change in out.stderr
  assert any(pathlib.Path(straight, "tb").iterdir())  # a TensorBoard event file
  assert not (straight / "curves.png").exists()  # train.curves=False (the CI config)

  def start():
    return subprocess.Popen(
      cli.command(chain, dynamic, "--config.train.steps=3"),
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

  # The same run, killed with SIGKILL once its first checkpoint is on disk ...
  proc = start()
  assert _wait_for_checkpoint(proc, chain, 1), proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # ... resumed, and preempted with SIGTERM after one more checkpoint (it saves and exits 0) ...
  proc = start()
  if _wait_for_checkpoint(proc, chain, 2):
    proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "resumed from" in err
  # ... its newest checkpoint truncated on disk (set aside: the run falls back one step) ...
  newest = max(int(p) for p in os.listdir(chain / "checkpoints") if p.isdigit())
  data = [p for p in (chain / "checkpoints" / str(newest) / "state").rglob("*") if p.is_file()]
  biggest = max(data, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  # ... and resumed again to the end.
  out = cli.run(chain, dynamic, "--config.train.steps=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"warning: checkpoint step {newest} does not restore" in out.stderr
  assert (chain / "checkpoints" / f"{newest}.broken").is_dir()

  a, b = _flat(_final_params(straight, 3)), _flat(_final_params(chain, 3))
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # The run really trained: the params moved between checkpoints (the newest two are kept).
  before = _flat(_final_params(straight, 2))
  assert any(not np.array_equal(before[key], a[key]) for key in a)
  assert _steps_logged(chain) == [1, 2, 3]  # rows logged after a checkpoint were dropped on resume

  # A finished workdir given more steps resumes where it stopped.
  out = cli.run(straight, dynamic, "--config.train.steps=4")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr and "at step 3" in out.stderr
  assert _steps_logged(straight) == [0, 1, 2, 2, 3, 4]


def test_eval_mode_reads_every_layout(tmp_path):
  from tapo_jax.toy import arith

  probs = arith.make_problems(3, seed=5)
  dapo_t = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    '{}\n\nRemember to put your answer on its own line after "Answer:".'
  )
  rows = {
    "dapo.jsonl": [
      {
        "prompt": [{"role": "user", "content": dapo_t.format(p.problem)}],
        "reward_model": {"ground_truth": p.answer},
      }
      for p in probs
      for _ in range(2)
    ],  # fmt: skip
    "deepscaler.jsonl": [{"problem": p.problem, "answer": p.answer} for p in probs],
    "math.jsonl": [{"problem": p.problem, "solution": p.solution} for p in probs],
    "aime.json": [{"Problem": p.problem, "Answer": int(p.answer)} for p in probs],
    "hmmt.jsonl": [
      {"problem_idx": i, "problem": p.problem, "answer": p.answer} for i, p in enumerate(probs)
    ],  # fmt: skip
  }
  paths = []
  for name, content in rows.items():
    path = tmp_path / name
    if name.endswith(".json"):
      path.write_text(json.dumps(content))
    else:
      path.write_text("".join(json.dumps(r) + "\n" for r in content))
    paths.append(str(path))
  workdir = tmp_path / "wd"
  out = cli.run(
    workdir, "--config.mode=eval", f"--config.eval.paths={','.join(paths)}",
    "--config.eval.k=2", "--config.eval.pass_ks=1,2",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((workdir / "eval_summary.json").read_text())
  for name in rows:
    stem = name.split(".")[0]
    assert summary[f"{stem}/n_problems"] == 3  # dapo's duplicates are dropped
    assert summary[f"{stem}/n_responses"] == 6
    assert 0.0 <= summary[f"{stem}/pass@1"] <= summary[f"{stem}/pass@2"] <= 1.0
    lines = (workdir / "eval" / f"{stem}.jsonl").read_text().splitlines()
    assert len(lines) == 3
  # Same problems, same seed, same sampler: every layout reads the same set, so same scores.
  assert len({summary[f"{n.split('.')[0]}/avg@2"] for n in rows}) == 1


def test_sft_mode_trains_and_exports_a_loadable_model(tmp_path):
  """(With sft.stop_at: a 3-step run stopped after 2 steps, as build_toy replays an interrupted
  phase: it still checkpoints and exports.)"""
  import torch
  import transformers

  from tapo_jax.toy import arith

  data = tmp_path / "sft.jsonl"
  rows = [{"prompt": p.problem, "response": p.solution} for p in arith.make_problems(8, seed=3)]
  rows[1] = {"messages": [{"role": "user", "content": "Compute 1+1."},
                          {"role": "assistant", "content": "1+1=2\n\\boxed{2}"}]}  # fmt: skip
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  workdir = tmp_path / "wd"
  before = signal.getsignal(signal.SIGINT)
  # in this process (its 8 devices): the run gives the caller's Ctrl-C handler back at the end
  out = cli.main_in_process(
    f"--config={cli.CI}", f"--workdir={workdir}", "--config.mode=sft", f"--config.sft.path={data}",
    "--config.sft.steps=3", "--config.sft.stop_at=2", "--config.sft.batch_size=4",
    "--config.optim.micro_batch=2", "--config.sft.max_len=64", "--config.train.curves=True",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  assert signal.getsignal(signal.SIGINT) is before
  assert _steps_logged(workdir) == [1, 2]
  assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
  nll = [json.loads(line)["nll"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(nll)) and all(v > 0 for v in nll)
  hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf")
  tok = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
  ids = tok("Compute 1+2.", return_tensors="pt").input_ids
  with torch.no_grad():
    assert torch.isfinite(hf(ids).logits).all()


@pytest.mark.slow
def test_difficulty_filter_measures_once_and_keeps_the_window(tmp_path):
  from tapo_jax.toy import arith

  easy = arith.make_problems(4, seed=11, min_terms=2, max_terms=2)
  hard = arith.make_problems(2, seed=12, min_terms=6, max_terms=6)  # never seen: always wrong
  data = tmp_path / "train.jsonl"
  rows = [
    {"id": f"p{i}", "problem": p.problem, "answer": p.answer} for i, p in enumerate(easy + hard)
  ]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  workdir = tmp_path / "wd"
  flags = [f"--config.data.train_path={data}", "--config.data.pass_rate_window=(0.1, 1.0)"]
  out = cli.run(workdir, *flags, "--config.train.steps=1")
  assert out.returncode == 0, out.stderr[-3000:]
  rates = json.loads((workdir / "pass_rates.json").read_text())
  assert sorted(rates) == [f"p{i}" for i in range(6)]
  assert rates["p4"] == rates["p5"] == 0.0
  kept = sum(0.1 <= r <= 1.0 for r in rates.values())
  assert f"kept {kept} of 6 problems" in out.stderr and kept >= 1
  out = cli.run(workdir, *flags, "--config.train.steps=2")  # resumes on the cached rates
  assert out.returncode == 0, out.stderr[-3000:]
  assert "measuring pass rates" not in out.stderr and f"kept {kept} of 6" in out.stderr


@pytest.mark.slow
def test_policy_construction_on_a_step_without_eligible_queries(tmp_path):
  """A step where DCS finds no query (here: never, n_pos + n_neg > K) prompts the policy with
  nothing and trains on the originals alone."""
  from tapo_jax.toy import arith

  train = tmp_path / "train.jsonl"
  with open(train, "w") as f:
    for p in arith.make_problems(8, seed=5):
      f.write(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n")
  workdir = tmp_path / "wd"
  out = cli.run(
    workdir, "--config.tapo.construction=policy",
    "--config.tapo.ref_baseline=group", f"--config.data.train_path={train}",
    "--config.train.steps=1", "--config.tapo.n_pos=4", "--config.tapo.n_neg=4",
    "--config.tapo.synthesis_max_new_tokens=48",  # the arith toy has 256 positions
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  (row,) = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert row["tapo/eligible_rate"] == 0 and row["tapo/constructions_attempted"] == 0
  assert row["tapo/ref_rows"] == 0 and row["skipped"] == 0
