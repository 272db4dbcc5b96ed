"""What a workdir records about its run, and who may write to it.

  WORKDIR/config.json   {"config": the run's config as JSON, "data": {path: fingerprint}}
  WORKDIR/.lock         fcntl.flock'ed for the whole run; holds the pid of the holder

`record_config(workdir, cfg)` writes config.json (atomically: a temporary file, then a rename) and,
when the workdir already holds checkpoints, compares the stored config and data with this run's
first, so a resumed run is the run it claims to continue:

  - keys in BREAKING (another mode, model, data file or data order) raise `ResumeError`: the
    checkpoint's parameters or the data iterator's position would mean something else;
  - keys in EXPECTED (the step budget, eval and logging cadence, throughput knobs) change silently;
  - any other change (learning rate, K, loss settings, ...) is allowed with one warning naming each
    changed key with its old and new value, and config.json then records the new config;
  - a changed data file (size, then SHA-256 when the size or mtime differ) raises `ResumeError`.

The fix offered is always the same: restore what changed, use a new --workdir, or remove
WORKDIR/config.json to accept the change.

`hold(workdir)` takes the lock; a second run on the same workdir gets `WorkdirBusy` naming the
holder's pid. Only process 0 of a multi-host run locks (the others share its workdir), and cloud
paths (gs://...) have no flock, so they are not locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

CONFIG_NAME = "config.json"
LOCK_NAME = ".lock"

# Changing one of these under existing checkpoints breaks resume.
BREAKING = (
  "mode",
  "seed",
  "model.path",
  "model.toy",
  "data.train_path",
  "data.layout",
  "data.shuffle",
  "data.pass_rate_window",
  "sft.path",
)
# Changing one of these is what resuming is for (more steps) or does not touch the result.
EXPECTED = (
  "workdir",
  "distributed",
  "train.steps",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.log_every",
  "train.eval_every",
  "eval.",
  "reward.workers",
  "rollout.slots",
  "sft.steps",
  "sft.epochs",
  "sft.stop_at",
)


class ResumeError(ValueError):
  """A workdir whose checkpoints belong to another config or other data; main() exits 2."""


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock; main() exits 2."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; tuples become lists (JSON's view of them)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value))
  return out


def config_dict(cfg) -> dict[str, Any]:
  """The config as plain JSON-able nested dicts."""
  tree = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return json.loads(json.dumps(tree, default=list))


def data_paths(cfg) -> list[str]:
  """The files whose contents a run of `cfg` depends on (train or SFT data)."""
  if cfg.mode == "sft":
    return [cfg.sft.path] if cfg.sft.path else []
  return [cfg.data.train_path] if cfg.data.train_path else []


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fingerprint(path: str, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """{size, mtime_ns, sha256} of a file; reuses `known`'s hash when size and mtime agree."""
  st = os.stat(path)
  out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
  if known and known.get("size") == out["size"] and known.get("mtime_ns") == out["mtime_ns"]:
    out["sha256"] = known.get("sha256")
  else:
    out["sha256"] = _sha256(path)
  return out


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} of every key whose value differs (missing = None)."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _matches(key: str, names: tuple[str, ...]) -> bool:
  return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a finished step directory (a name that is an integer)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def _write_json(path: str, obj: Any) -> None:
  """Writes `obj` beside `path` and renames it over `path`: readers see old or new, never half."""
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
  umask = os.umask(0)
  os.umask(umask)
  os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; config.json is not
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def read_config(workdir: str) -> dict[str, Any] | None:
  """The config recorded in WORKDIR/config.json (nested dicts), or None when there is none."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  record, why = _read_record(path)
  if why:
    raise ResumeError(f"{path}: unreadable ({why}); remove it to record this run's config")
  return record["config"]


def _read_record(path: str) -> tuple[dict | None, str | None]:
  """(the record in config.json, None) or (None, why it is not one): not UTF-8, not JSON, or not
  {"config": {...}, "data": {path: {...}}}."""
  try:
    with open(path, "rb") as f:
      record = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    return None, str(e)
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    return None, 'not {"config": {...}, "data": {...}}'
  data = record.setdefault("data", {})
  if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
    return None, '"data" is not {path: fingerprint}'
  return record, None


def _format(value: Any) -> str:
  return json.dumps(value) if not isinstance(value, str) else repr(value)


def record_config(workdir: str, cfg, *, warn=None) -> dict[str, tuple[Any, Any]]:
  """Writes WORKDIR/config.json; on resume checks the stored config and data (see the module doc).

  Returns the changed keys that were accepted (EXPECTED ones included); `warn(msg)` (default:
  print to stderr) gets the one-line warning about the others."""
  warn = warn or (lambda msg: print(msg, file=sys.stderr))
  path = os.path.join(workdir, CONFIG_NAME)
  new = config_dict(cfg)
  stored = None
  if os.path.exists(path):
    # A torn file cannot exist (atomic writes), but a hand-edited one can: beside checkpoints it
    # is the only record of their config, so it is not silently replaced.
    stored, why = _read_record(path)
    if why and has_checkpoints(workdir):
      raise ResumeError(
        f"{path}: unreadable ({why}); it records the config of the checkpoints in {workdir}: "
        "restore it, or remove it to resume without the config check"
      )
  resuming = stored is not None and has_checkpoints(workdir)
  known = stored.get("data", {}) if resuming else {}
  data = {}
  for p in data_paths(cfg):
    key = os.path.abspath(p)
    data[key] = fingerprint(p, known.get(key))
  changes: dict[str, tuple[Any, Any]] = {}
  if resuming:
    changes = changed_keys(stored.get("config", {}), new)
    breaking = {k: v for k, v in changes.items() if _matches(k, BREAKING)}
    if breaking:
      what = ", ".join(f"{k} {_format(a)} -> {_format(b)}" for k, (a, b) in breaking.items())
      raise ResumeError(
        f"{workdir} holds checkpoints of another run ({what}): use a new --workdir, restore "
        f"the old value, or remove {path} to resume anyway"
      )
    for p, fp in data.items():
      old = known.get(p)
      if old is not None and old.get("sha256") != fp["sha256"]:
        raise ResumeError(
          f"{p}: data file changed since {workdir} was started (size {old.get('size')} -> "
          f"{fp['size']} bytes, new SHA-256): restore it, use a new --workdir, or remove "
          f"{path} to resume anyway"
        )
    noted = {k: v for k, v in changes.items() if not _matches(k, EXPECTED)}
    if noted:
      what = ", ".join(f"{k} {_format(a)} -> {_format(b)}" for k, (a, b) in noted.items())
      warn(f"warning: resuming {workdir} with a changed config: {what}")
  os.makedirs(workdir, exist_ok=True)
  _write_json(path, {"config": new, "data": data})
  return changes


class Lock:
  """An exclusive flock on WORKDIR/.lock, released by `release()` or when the process dies."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.fd: int | None = None

  def acquire(self) -> Lock:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        raise
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      workdir = os.path.dirname(self.path)
      raise WorkdirBusy(
        f"{workdir} is in use by another run (pid {holder}); wait for it to finish, stop it, "
        "or use another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


def is_local(workdir: str) -> bool:
  return "://" not in workdir


@contextlib.contextmanager
def hold(workdir: str, *, process_index: int = 0) -> Iterator[Lock | None]:
  """Holds WORKDIR/.lock for the block (process 0, local paths only); WorkdirBusy if taken."""
  if process_index != 0 or not is_local(workdir):
    yield None
    return
  lock = Lock(workdir).acquire()
  try:
    yield lock
  finally:
    lock.release()
