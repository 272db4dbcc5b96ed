"""launch/: the TPU VM lifecycle and GPU launcher as --dry-run prints them; shellcheck."""

import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from tapo_jax import plan as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


@pytest.fixture
def fake_gcloud(tmp_path):
  """A gcloud on PATH that records any call: a dry run must make none."""
  marker = tmp_path / "gcloud_called"
  stub = tmp_path / "bin" / "gcloud"
  stub.parent.mkdir()
  stub.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
  stub.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env["PATH"] = f"{stub.parent}:{env['PATH']}"
  yield env
  assert not marker.exists(), "a dry run called gcloud"


def tpu_vm(env, *args):
  cmd = ["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "--name=tapo", "--zone=z1", *args]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def gcloud_lines(out):
  return [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("gcloud ")]


def remote(words):
  """The remote command of a `gcloud ... ssh --command=...` line, split into words."""
  return shlex.split(next(w for w in words if w.startswith("--command="))[len("--command=") :])


@pytest.mark.parametrize(
  "tpu_type,accel,version,workers",
  [("v5p-32", "v5p-32", "v2-alpha-tpuv5", 4), ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 1)],
)
def test_create(fake_gcloud, tpu_type, accel, version, workers):
  out = tpu_vm(fake_gcloud, "create", f"--type={tpu_type}", "--spot")
  assert out.returncode == 0, out.stderr
  assert f"{workers} worker(s)" in out.stdout
  sl = plan_lib.resolve_slice(tpu_type)  # the planner agrees on the topology
  assert f"# {tpu_type}: {sl.chips} chips, {sl.hosts} worker(s)" in out.stdout
  [create] = gcloud_lines(out)
  assert create == [
    "gcloud", "compute", "tpus", "tpu-vm", "create", "tapo", f"--accelerator-type={accel}",
    f"--version={version}", "--spot", "--zone=z1",
  ]  # fmt: skip
  out = tpu_vm(fake_gcloud, "create", f"--type={tpu_type}", "--queued", "--valid-for=6h")
  [queued] = gcloud_lines(out)
  assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "tapo"]
  assert {"--node-id=tapo", f"--runtime-version={version}", "--valid-until-duration=6h"} <= set(
    queued
  )


def test_create_can_check_the_plan_first(fake_gcloud):
  out = tpu_vm(
    fake_gcloud, "create", "--type=v5p-32", "--config=configs/qwen7b.py", "--",
    "--config.plan.shape=qwen2.5-7b",
  )  # fmt: skip
  plan = next(shlex.split(line) for line in out.stdout.splitlines() if line.startswith("python"))
  assert plan == [
    "python", "-m", "tapo_jax.main", "--config=configs/qwen7b.py", "--config.mode=plan",
    "--config.plan.device=v5p", "--config.plan.chips=16", "--config.plan.shape=qwen2.5-7b",
  ]  # fmt: skip


@pytest.mark.parametrize("tpu_type,workers", [("v5p-32", 4), ("v5e-8", 1)])
def test_run_syncs_then_starts_every_worker(fake_gcloud, tpu_type, workers):
  odd = "--config.data.pass_rate_window=(0.125, 0.875)"
  quote = "--config.data.prompt_template={problem} it's"
  out = tpu_vm(
    fake_gcloud, "run", f"--type={tpu_type}", "--config=configs/qwen7b.py",
    "--workdir=gs://b/run1", "--", "--config.rollout.n=8", odd, quote,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  lines = gcloud_lines(out)
  assert [w[4] for w in lines] == ["scp", "ssh", "ssh", "ssh"]
  assert all("--worker=all" in w for w in (lines[0], lines[1], lines[3]))
  assert "--worker=0" in lines[2]  # the memory plan runs on worker 0 before anything starts
  args = [
    "--config=configs/qwen7b.py", "--workdir=gs://b/run1", "--config.distributed=True",
    "--config.rollout.n=8", odd, quote,
  ]  # fmt: skip
  plan = remote(lines[2])
  assert plan[plan.index("tapo_jax.main") + 1 :] == args + [
    "--config.mode=plan", f"--config.plan.device={tpu_type.split('-')[0]}",
    f"--config.plan.chips={plan_lib.resolve_slice(tpu_type).chips}",
  ]  # fmt: skip
  start = remote(lines[3])
  i = start.index("nohup")
  assert start[i + 1 : i + 4] == [".venv/bin/python", "-m", "tapo_jax.main"]
  assert start[i + 4 : i + 4 + len(args)] == args
  assert start[i + 4 + len(args) :][:6] == [">", "run.log", "2>&1", "<", "/dev/null", "&"]
  assert f"started on {workers} worker(s)" in out.stdout


def test_run_on_a_pod_needs_a_shared_workdir(fake_gcloud):
  out = tpu_vm(fake_gcloud, "run", "--type=v5p-32", "--config=c.py", "--workdir=runs/x")
  assert out.returncode == 2 and "use a gs:// path they all share" in out.stderr
  out = tpu_vm(fake_gcloud, "run", "--type=v5e-8", "--config=c.py", "--workdir=runs/x")
  assert out.returncode == 0  # one worker: a local directory is fine


@pytest.mark.parametrize("tpu_type,workers", [("v5p-32", 4), ("v5e-8", 1)])
def test_logs_streams_each_worker(fake_gcloud, tpu_type, workers):
  lines = gcloud_lines(tpu_vm(fake_gcloud, "logs", f"--type={tpu_type}", "--worker=all"))
  assert [w[6] for w in lines] == [f"--worker={i}" for i in range(workers)]
  assert all(remote(w)[-1] == "tapo_jax/run.log" for w in lines)
  [one] = gcloud_lines(tpu_vm(fake_gcloud, "logs", f"--type={tpu_type}"))
  assert "--worker=0" in one


def test_setup_ssh_stop_delete(fake_gcloud):
  setup = gcloud_lines(tpu_vm(fake_gcloud, "setup"))
  install = " ".join(remote(setup[-1]))
  assert "python3 -m venv .venv" in install and "pip install -q -e . jax[tpu]" in install
  [ssh] = gcloud_lines(tpu_vm(fake_gcloud, "ssh", "--worker=all", "--", "ls", "/mnt"))
  assert "--worker=all" in ssh and remote(ssh) == ["ls", "/mnt"]
  [stop] = gcloud_lines(tpu_vm(fake_gcloud, "stop"))
  assert "--worker=all" in stop and "kill" in remote(stop)
  [delete] = gcloud_lines(tpu_vm(fake_gcloud, "delete"))
  assert delete[3:6] == ["tpu-vm", "delete", "tapo"] and "--quiet" in delete
  [delete] = gcloud_lines(tpu_vm(fake_gcloud, "delete", "--queued"))
  assert delete[3:6] == ["queued-resources", "delete", "tapo"] and "--force" in delete


def test_usage_errors(fake_gcloud):
  env = dict(fake_gcloud)
  out = subprocess.run(
    ["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "create", "--zone=z1"],
    env=env, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert out.returncode == 2 and out.stderr.strip().endswith("--name (or TPU_NAME) is required")
  for args, msg in (
    (("create",), "--type (or TPU_TYPE) is required"),
    (("create", "--type=v9-8"), "expected a v4, v5e"),
    (("frobnicate",), "unknown command frobnicate"),
    (("create", "--type=v5p-8", "--valid-for=1h"), "--valid-for needs --queued"),
  ):
    out = tpu_vm(env, *args)
    assert out.returncode == 2 and msg in out.stderr.splitlines()[-1], (args, out.stderr)


def test_gpu_multi_host_passes_the_coordinator(fake_gcloud):
  def gpu(*args):
    cmd = ["bash", os.path.join(LAUNCH, "gpu.sh"), "--dry-run", *args]
    return subprocess.run(cmd, env=fake_gcloud, capture_output=True, text=True, timeout=60)

  flags = ["--coordinator=host0:8476", "--num-processes=2", "--process-id=1"]
  out = gpu(*flags, "configs/qwen7b.py", "/shared/run1", "--config.mesh.tensor=8")
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == [
    "python", "-m", "tapo_jax.main", "--config=configs/qwen7b.py", "--workdir=/shared/run1",
    "--config.model.attention_impl=cudnn", "--config.distributed=True",
    "--config.distributed_coordinator=host0:8476", "--config.distributed_num_processes=2",
    "--config.distributed_process_id=1", "--config.mesh.tensor=8",
  ]  # fmt: skip
  assert "distributed" not in gpu("c.py", "w").stdout  # one machine: no jax.distributed
  out = gpu("--coordinator=host0:8476", "--num-processes=2", "--process-id=2", "c.py", "w")
  assert out.returncode == 2 and "--process-id=2: expected 0 <= I < 2" in out.stderr


def test_main_joins_jax_distributed_with_the_explicit_coordinator():
  """config.distributed_* reach jax.distributed.initialize (a 1-process job on a local port; a
  bad rollout.n then stops it at validation). Without them, initialize() on CPU cannot find a
  coordinator and raises."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "tapo_jax.main", "--config=configs/smoke.py"]
  base += ["--config.distributed=True", "--config.rollout.n=1"]
  explicit = [f"--config.distributed_coordinator=127.0.0.1:{port}"]
  explicit += ["--config.distributed_num_processes=1", "--config.distributed_process_id=0"]
  run = lambda args: subprocess.run(
    args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )  # noqa: E731
  out = run(base + explicit)
  assert out.returncode == 2 and "config.rollout.n=1" in out.stderr, out.stderr
  out = run(base)
  assert out.returncode not in (0, 2) and "coordinator_address" in out.stderr


def test_shellcheck_passes_on_every_launch_script():
  if shutil.which("shellcheck") is None:
    pytest.skip(
      "shellcheck is not installed (apt-get install -y shellcheck); launch/*.sh unchecked"
    )
  scripts = sorted(f for f in os.listdir(LAUNCH) if f.endswith(".sh"))
  assert {"tpu_vm.sh", "gpu.sh"} <= set(scripts)
  out = subprocess.run(
    ["shellcheck", *scripts], cwd=LAUNCH, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stdout
