"""`python -m tapo_jax.main` for the tests: the configs, the command in a process, and the same
entry point in this process (for what ends before any work: bad flags and configs, the planner).

tests/ci_config.py is the CI config: configs/smoke.py cut to the smallest real RL run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CI = "tests/ci_config.py"


def config(name: str = "smoke", **overrides):
  """configs/NAME.py's get_config() (NAME "ci": tests/ci_config.py) with dotted `overrides`
  (pass them as a dict: `config("smoke", **{"rollout.n": 2})`)."""
  path = ROOT / CI if name == "ci" else ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    node[leaf] = value
  return cfg


# A directory whose sitecustomize.py hides torch from the Python that starts with it on its path.
WITHOUT_TORCH = str(ROOT / "tests" / "without_torch")


def env(devices: int = 1, *, torch: bool = False, **extra: str) -> dict:
  """os.environ (and `extra`) for a child on `devices` fake CPU devices (1: like a user's
  laptop), with this process's other XLA flags (conftest's FAST_COMPILE); without torch unless
  `torch` (tests/without_torch: torch is installed for the tests' references only, a user's
  install has none, and transformers imports it whenever it can: ~1.2 s of CPU a process)."""
  out = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
  if not torch:
    out["PYTHONPATH"] = os.pathsep.join(p for p in (WITHOUT_TORCH, out.get("PYTHONPATH")) if p)
  count = "--xla_force_host_platform_device_count"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
  flags += [f"{count}={devices}"] if devices > 1 else []
  out["XLA_FLAGS"] = " ".join(flags)
  return out


def with_ctrl_c(module: str, *args: str) -> list[str]:
  """`python -m MODULE ARGS` with Ctrl-C set up as a shell starts a foreground command: SIGINT
  unblocked and Python's KeyboardInterrupt handler. A test worker late in the suite hands its
  children SIGINT blocked or ignored (tests/test_teachers.py), and Python keeps an ignored one."""
  code = (
    "import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    f"sys.argv = [{module!r}, *sys.argv[1:]]; runpy.run_module({module!r}, run_name='__main__')"
  )
  return [sys.executable, "-c", code, *args]


def command(workdir, *flags, config: str = CI) -> list[str]:
  """The CLI on `config` (a path from the repository root) in `workdir`, then `flags`."""
  return [
    sys.executable,
    "-m",
    "tapo_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *flags,
  ]


def run(workdir, *flags, config: str = CI, devices: int = 1, timeout: float = 600):
  """`command` in a child process; the CompletedProcess (text stdout and stderr)."""
  return subprocess.run(
    command(workdir, *flags, config=config), cwd=ROOT, env=env(devices), capture_output=True,
    text=True, timeout=timeout,
  )  # fmt: skip


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


def main_in_process(*args: str) -> Result:
  """tapo_jax.main's flag parsing and main() in this process, on its 8 devices, as `python -m
  tapo_jax.main ARGS` from the repository root: the exit status and what was printed. For runs
  that end before any work and small single-process runs (an SFT of two steps); an exception
  other than SystemExit (a traceback) propagates."""
  from absl import flags
  from absl import logging as absl_logging

  from tapo_jax import main as main_lib

  argv = ["tapo_jax.main", *args]
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the previous call's --config.KEY overrides
  flags.FLAGS.unparse_flags()
  out, err = io.StringIO(), io.StringIO()
  saved = sys.argv, sys.unraisablehook, absl_logging.get_verbosity(), os.getcwd()
  sys.argv = argv  # config_flags reads the --config.KEY overrides from sys.argv
  os.chdir(ROOT)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        main_lib.main(main_lib._parse_flags(argv))
        status = 0
      except SystemExit as e:
        status = 0 if e.code is None else e.code
  finally:
    sys.argv, sys.unraisablehook = saved[0], saved[1]
    absl_logging.set_verbosity(saved[2])
    os.chdir(saved[3])
  return Result(status, out.getvalue(), err.getvalue())
