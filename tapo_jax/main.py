r"""Entry point: python -m tapo_jax.main --config=configs/NAME.py [--config.key=value] [--workdir=D]

Modes (config.mode): rl (algorithm grpo | tapo), sft (cold start), eval, plan (memory per device,
tapo_jax.plan), coldstart (builds the cold-start SFT set: tapo_jax.coldstart). Bad flags
or config values print one line naming the key and exit with status 2 before anything is written.

User errors end in one `error:` line and no traceback (tracebacks stay for bugs):
  exit 2  a bad config, bad data (DataError), a checkpoint or model directory that cannot be used
          (CheckpointError), a workdir holding another run (ResumeError) or in use (WorkdirBusy);
  exit 1  the file system refused (OSError: read-only or full disk, permissions);
  exit 130  Ctrl-C pressed twice (once checkpoints after the current step and exits 0).
A run that fails this way before doing any work removes the workdir it created. In a
multi-process run a failing process stops the others with its error (tapo_jax.distributed).
"""

from __future__ import annotations

import errno
import importlib.util
import logging as std_logging
import os
import re
import shutil
import sys

# google-jetstream's full install (the `jetstream` extra) imports TensorFlow, which logs from C++.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# transformers (tokenizers and chat templates only here) warns at import that torch is absent.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tapo_jax import validate as validate_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (overrides config.workdir).")
ConfigError = validate_lib.ConfigError
validate = validate_lib.validate


def _fail(msg: str, status: int = 2) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(status)


def _config_path(argv) -> str | None:
  """The file of --config=PATH[:ARGS] (or --config PATH) in `argv`, else None."""
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      return a[len("--config=") :].split(":", 1)[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _parse_flags(argv):
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    _fail(f"--config={path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_first_line(e) if "Error whilst parsing config file" not in str(e) else _in_config(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags raises these for an override of a key the locked config does not have.
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    name = str(e).strip("\"'")
    bad = next((a for a in overrides if a[len("--config.") :].split("=")[0].endswith(name)), None)
    if bad:
      _fail(f"unknown config key {name!r} in {bad}")
    if "get_config" in str(e):
      _fail(f"--config={path}: defines no get_config()")
    _fail(f"bad flag: {_first_line(e)}")
  except Exception as e:  # noqa: BLE001 - the config file itself raised (SyntaxError, NameError...)
    _fail(f"--config={path}: {type(e).__name__}: {_last_line(e)}")


def _in_config(e: Exception) -> str:
  """One line for an error raised while a config file ran: where, and its last traceback line."""
  return f"{_first_line(e).split(': Error whilst')[0]}: {_last_line(e)}"


def _last_line(e: Exception) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def _dispatch_reporting(cfg, workdir: str) -> None:
  """_dispatch; in a multi-process run an error here is first reported to the other processes,
  which then stop with it instead of waiting in a collective."""
  try:
    _dispatch(cfg, workdir)
  except Exception as e:
    if cfg.distributed:
      from tapo_jax import distributed

      first = distributed.report_failure(f"{type(e).__name__}: {_first_line(e)}")
      if first is not None:  # another process failed first; this error is its echo
        distributed.exit_with(first)
    raise


def _first_line(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e) else ""


def _dispatch(cfg, workdir: str) -> None:
  if cfg.mode == "rl":
    from tapo_jax.train import loop

    loop.run(cfg, workdir)
  elif cfg.mode == "coldstart":
    from tapo_jax.coldstart import build as coldstart
    from tapo_jax.data import DataError

    try:
      coldstart.run(cfg, workdir)
    except (coldstart.BuildError, DataError) as e:
      _fail(str(e))
    except coldstart.TeacherError as e:
      _fail(f"{e}; rerun to resume from the last finished chunk", status=1)
  elif cfg.mode == "sft":
    from tapo_jax.train import sft

    sft.run(cfg, workdir)
  else:
    from tapo_jax.eval import mode as eval_mode

    eval_mode.run(cfg, workdir)


_IO_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)


def io_error(e: BaseException, workdir: str = "") -> str | None:
  """One line for a file-system failure anywhere in `e`'s chain (Orbax and TensorStore re-raise
  them as other types, keeping the OS message), naming the file, else `workdir`; None when `e`
  is not one."""
  seen = set()
  fallback = f"{workdir}: " if workdir else ""
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.strerror:
      where = f"{e.filename}: " if e.filename else fallback
      return f"{where}{e.strerror}{_io_hint(e.errno)}"
    text = str(e)
    for code in _IO_ERRNOS:
      if os.strerror(code) in text:
        path = re.search(r'"(/[^"]+)"', text)  # TensorStore quotes the file it failed on
        where = f"{path.group(1)}: " if path else fallback
        return f"{where}{os.strerror(code)}{_io_hint(code)}"
    e = e.__cause__ or e.__context__
  return None


def _io_hint(code) -> str:
  if code in (errno.ENOSPC, errno.EDQUOT):
    return "; free some space and rerun: the run resumes from its newest finished checkpoint"
  if code in (errno.EROFS, errno.EACCES, errno.EPERM):
    return "; pass a writable --workdir"
  return ""


def _quiet_orbax_thread_errors(record) -> bool:
  """A logging filter: Orbax's background threads log each failure with a full traceback (a full
  disk: hundreds of lines) and then re-raise it in the main thread, where main() reports it."""
  from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
  return not (from_orbax and record.levelno >= std_logging.ERROR and record.exc_info)


def _drop_closed_loop_callbacks(unraisable) -> None:
  """sys.unraisablehook: after a failed Orbax write, TensorStore completes the other pending writes
  into Orbax's already closed event loop, one 'Event loop is closed' traceback each (a hundred for
  a full disk); the failure itself is raised in the main thread. Everything else is printed."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def _silence_orphaned_tasks() -> None:
  """After a reported error, asyncio's 'Task exception was never retrieved' at shutdown repeats it
  for each write Orbax left pending."""
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)


def _discard_if_untouched(workdir: str, existed: bool) -> None:
  """Removes a workdir this run created when it holds nothing but the lock and config record."""
  if existed or not os.path.isdir(workdir):
    return
  if set(os.listdir(workdir)) <= {".lock", "config.json"}:
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv) -> None:
  del argv
  import jax

  from tapo_jax.data import DataError
  from tapo_jax.models import CheckpointError
  from tapo_jax.train import workdir as workdir_lib

  cfg = _CONFIG.value
  if cfg is None:
    _fail("--config is required, e.g. --config=configs/tiny.py")
  workdir = _WORKDIR.value or cfg.workdir or os.path.join("runs", "default")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and absl INFO chatter; -v 0 brings it back
    std_logging.getLogger("absl").addFilter(_quiet_orbax_thread_errors)
    sys.unraisablehook = _drop_closed_loop_callbacks
  if cfg.mode == "plan":  # abstract shapes only: no devices, weights or data needed
    from tapo_jax import plan

    try:
      validate(cfg, 0)  # the planned slice stands in for the devices
    except ConfigError as e:
      _fail(str(e))
    sys.exit(plan.run(cfg))
  if cfg.distributed:
    from tapo_jax import distributed

    try:
      validate_lib.validate_distributed(cfg)
    except ConfigError as e:
      _fail(str(e))
    distributed.initialize(cfg)
  try:
    validate(cfg, jax.device_count())
  except ConfigError as e:
    _fail(str(e))
  if cfg.mode in ("rl", "eval") and importlib.util.find_spec("jetstream") is None:
    _fail(
      "google-jetstream is not installed: run `make install`, or "
      "`pip install --no-deps google-jetstream==0.2.2` (README: Install)"
    )
  logging.info("mode=%s algorithm=%s workdir=%s", cfg.mode, cfg.algorithm, workdir)
  user_errors = (ConfigError, DataError, CheckpointError, workdir_lib.ResumeError)
  existed = os.path.exists(workdir)
  try:
    with workdir_lib.hold(workdir, process_index=jax.process_index()):
      if cfg.mode in ("rl", "sft") and jax.process_index() == 0 and workdir_lib.is_local(workdir):
        workdir_lib.record_config(workdir, cfg)  # cloud workdirs (gs://) keep no record yet
      _dispatch_reporting(cfg, workdir)
  except KeyboardInterrupt:
    _discard_if_untouched(workdir, existed)
    print("\nerror: interrupted; the workdir keeps its newest finished checkpoint", file=sys.stderr)
    sys.exit(130)
  except workdir_lib.WorkdirBusy as e:
    _fail(str(e))
  except user_errors as e:
    _discard_if_untouched(workdir, existed)
    _silence_orphaned_tasks()
    _fail(str(e))
  except Exception as e:
    line = io_error(e, workdir)
    if line is None:
      raise  # a bug: keep the traceback
    _discard_if_untouched(workdir, existed)
    _silence_orphaned_tasks()
    print(f"error: {line}", file=sys.stderr)
    sys.exit(1)


def entry() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry()
