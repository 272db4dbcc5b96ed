"""Orbax checkpoints of the train state plus the data iterator's JSON state; exact resume.

  WORKDIR/checkpoints/<step>/state   the TrainState (params, opt_state, step, skipped)
  WORKDIR/checkpoints/<step>/extra   JSON: the data iterator's position and the state's checksum

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and renames it to `<step>` when
complete, so a process killed during a save (SIGKILL, a second Ctrl-C) leaves the previous steps and
an ignored temporary directory, never a half-written `<step>`.

Restore is checked, newest step first:
  1. the step's metadata must read and describe the same tree and shapes as this run's state
     (a mismatch is another model or optimizer: `CheckpointError`, no fallback);
  2. the arrays must read (truncated data, a broken manifest or a missing `state/` fail here);
  3. the checksum saved with the step must match the restored arrays (bit rot, a bad copy) and
     the params must be finite (a poisoned update that was saved); a step without its checksum
     or its data-iterator state (an edited `extra`) is unverified and counts as broken.
A step failing 2 or 3 is renamed `<step>.broken` with a one-line warning and the previous step is
tried; when none is left, `CheckpointError` names the directory to remove.

Checksum: per array, sum_i bits(x_i) * (2i + 1) mod 2^32 over the flattened array's raw bits. The
weights are odd, hence invertible mod 2^32, so changing any single element (one flipped bit
included) always changes the sum; integer addition makes it independent of the reduction order
and the sharding.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tapo_jax.models.weights import CheckpointError

BROKEN_SUFFIX = ".broken"


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of every element as uint32."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if width is None:  # 8-byte types only exist with jax_enable_x64; fold both halves in
    return jax.lax.bitcast_convert_type(x, jnp.uint32).sum(-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
  bits = _bits(x).reshape(-1)
  weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_array_checksum, tree))


def checksum(state) -> dict[str, int]:
  """{array path: 32-bit checksum} of every array in `state` (see the module doc)."""
  sums = jax.device_get(_checksums(state))
  return {jax.tree_util.keystr(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(sums)}


def _finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _inspect(state, params):
  """(checksums of `state`, all-finite flags of `params`) in one program: many small eager
  reductions over sharded arrays, dispatched asynchronously, can deadlock XLA:CPU collectives."""
  return jax.tree.map(_array_checksum, state), jax.tree.map(_finite, params)


def inspect_state(state) -> tuple[dict[str, int], str | None]:
  """(checksum of every array, the path of the first non-finite param or None)."""
  sums, finite = jax.device_get(_inspect(state, getattr(state, "params", {})))
  sums = {jax.tree_util.keystr(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(sums)}
  bad = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(finite) if not v]
  return sums, (f"params{bad[0]}" if bad else None)


@contextlib.contextmanager
def _quiet():
  """Silences Orbax's absl warnings while a step is tried: its failure is reported in one line."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = (str(e).strip().splitlines() or [""])[0]
  text = text.split(" See full TensorStore details")[0]
  text = text if len(text) <= limit else text[: limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _flat_shapes(tree) -> dict[tuple, tuple]:
  """{on-disk key path: shape} of a state (serialized as Orbax stores it) or of its metadata."""
  flat = ocp.tree.to_flat_dict(tree)
  return {k: tuple(getattr(v, "shape", ()) or ()) for k, v in flat.items()}


def _abstract(state_sharding, state_like):
  def spec(sharding, subtree):  # the sharding tree is a prefix of the state (nnx.Variable)
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), subtree
    )

  return jax.tree.map(spec, state_sharding, state_like)


class Checkpointer:
  """Saves every `every` steps under `workdir/checkpoints`, keeping the newest `keep`."""

  def __init__(self, workdir: str, every: int, keep: int, *, warn=None):
    self.every = max(1, int(every))
    self.warn = warn or (lambda msg: print(msg, file=sys.stderr))
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether save(step, ..., force=force) would write a checkpoint."""
    return (force or step % self.every == 0) and self.manager.latest_step() != step

  def save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); `extra` is JSON (data iterator, metrics).

    Non-finite params are never saved: CheckpointError, so that rotation cannot delete the last
    good checkpoints in favour of a diverged one."""
    if not force and step % self.every:
      return False
    if self.manager.latest_step() == step:
      return False
    sums, bad = inspect_state(state)
    if bad:
      raise CheckpointError(
        f"step {step}: non-finite values in {bad}, not saved (the newest checkpoint in "
        f"{self.directory} is step {self.manager.latest_step()}): lower optim.lr or check the data"
      )
    extra = {**extra, "checksum": sums}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
    return self.manager.save(step, args=args, force=True)

  def check_structure(self, step: int, state_like) -> None:
    """Raises CheckpointError when step's metadata describes another tree than `state_like`;
    lets an unreadable metadata file through (restore then fails and counts as broken)."""
    where = os.path.join(self.directory, str(step))
    try:
      meta = ocp.PyTreeCheckpointer().metadata(os.path.join(where, "state")).item_metadata.tree
    except Exception:  # noqa: BLE001 (unreadable metadata is corruption, handled by restore)
      return
    stored = _flat_shapes(meta)
    ours = _flat_shapes(ocp.tree.serialize_tree(state_like, keep_empty_nodes=True))
    if set(stored) != set(ours):
      diff = sorted(set(stored) ^ set(ours))[0]
      side = "only in the checkpoint" if diff in stored else "missing from the checkpoint"
      raise CheckpointError(
        f"{where}: holds another model or optimizer state ({'/'.join(diff)} {side}): use the "
        "config it was written with, or another --workdir"
      )
    for key, shape in ours.items():
      if stored[key] != shape:
        raise CheckpointError(
          f"{where}: {'/'.join(key)} has shape {stored[key]}, this run's is {shape}: use the "
          "config it was written with, or another --workdir"
        )

  def restore(self, step: int, state_sharding, state_like) -> tuple:
    """(state, extra) of checkpoint `step`, placed with `state_sharding` and verified; raises
    CheckpointError for another model's checkpoint and other exceptions for a broken one."""
    self.check_structure(step, state_like)
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state_sharding, state_like)),
        extra=ocp.args.JsonRestore(),
      ),
    )
    state, extra = out["state"], out["extra"]
    if not isinstance(extra, dict) or not isinstance(extra.get("data"), dict):
      raise ValueError("its extra metadata holds no data-iterator state")
    verify(state, extra)
    return state, extra

  def _set_aside(self, step: int) -> str:
    """Renames a broken step directory so that saves and rotation never see it again."""
    src = os.path.join(self.directory, str(step))
    dst, n = src + BROKEN_SUFFIX, 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}{BROKEN_SUFFIX}{n}"
    if jax.process_index() == 0:
      os.replace(src, dst)
    return dst

  def restore_newest(self, state_sharding, state_like) -> tuple[int, object, dict] | None:
    """(step, state, extra) of the newest intact checkpoint, None when there is none at all.

    Broken newer steps are set aside with a one-line warning each; CheckpointError when every
    step is broken (naming the directory to remove) or belongs to another config."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    broken: list[tuple[int, str]] = []
    for step in steps:
      try:
        with _quiet():
          state, extra = self.restore(step, state_sharding, state_like)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 (Orbax/TensorStore/JSON raise many types)
        broken.append((step, _first_line(e)))
        continue
      for bad, why in broken:
        dst = self._set_aside(bad)
        self.warn(
          f"warning: checkpoint step {bad} does not restore ({why}); resuming from step {step} "
          f"(the broken one is kept as {dst})"
        )
      if broken:
        self.manager.reload()
      return step, state, extra
    steps_text = ", ".join(str(s) for s, _ in broken)
    raise CheckpointError(
      f"{self.directory}: no checkpoint restores (step {broken[0][0]}: {broken[0][1]}); remove "
      f"{self.directory if len(broken) > 1 else os.path.join(self.directory, steps_text)} "
      "to start over"
    )

  def resume(self, state, state_sharding, iterator) -> tuple:
    """(state, start step, extra): the newest intact checkpoint's, with the iterator moved to
    its position; (state, 0, {}) when the workdir has none."""
    from tapo_jax.data import DataError

    found = self.restore_newest(state_sharding, state)
    if found is None:
      return state, 0, {}
    start, state, extra = found
    try:
      iterator.restore(extra["data"])
    except DataError:
      raise
    except (KeyError, TypeError, ValueError) as e:
      where = os.path.join(self.directory, str(start), "extra")
      raise CheckpointError(
        f"{where}: damaged data-iterator state ({type(e).__name__}: {e}); restore it or remove "
        f"{os.path.join(self.directory, str(start))}"
      ) from None
    print(f"resumed from {self.directory} at step {start}", file=sys.stderr)
    return state, start, extra

  def wait(self):
    """Waits for the save in flight; raises its error when it failed (the loops call this before
    each update, so no step trains past a checkpoint that could not be written)."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def verify(state, extra: dict) -> None:
  """Raises ValueError when `state` has a non-finite parameter, differs from the checksum saved
  with it, or has no checksum (unverified: the key was removed, or another tool wrote it)."""
  ours, non_finite = inspect_state(state)
  if non_finite:
    raise ValueError(f"non-finite values in {non_finite}")
  saved = extra.get("checksum") if isinstance(extra, dict) else None
  if not isinstance(saved, dict) or not saved:
    raise ValueError("no checksum saved with it: unverified")
  bad = sorted(k for k in saved if ours.get(k) != saved[k])
  if bad or set(ours) != set(saved):
    raise ValueError(f"checksum mismatch in {bad[0] if bad else 'the array list'}")


def steps(workdir: str) -> list[int]:
  """The finished checkpoint steps of a workdir, oldest first."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def restore_params(workdir: str, step: int, params_like, params_sharding=None):
  """Only the params subtree of checkpoint `step` (Orbax partial restore: the optimizer state is
  never read). `params_like` is an nnx.State of the model's params (abstract is fine);
  `params_sharding` a prefix tree of shardings, or None for host numpy arrays."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint (steps kept: {steps(workdir) or 'none'})")
  if params_sharding is None:
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_like)
    restore_args = jax.tree.map(
      lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), params_like
    )
  else:
    item = _abstract(params_sharding, params_like)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  try:
    with _quiet():
      out = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(
          item={"params": item}, restore_args={"params": restore_args}, partial_restore=True
        ),
      )
  except Exception as e:  # noqa: BLE001 (Orbax/TensorStore/JSON raise many types)
    raise CheckpointError(f"{path}: does not restore ({_first_line(e)})") from None
  return out["params"]


class PreemptionGuard:
  """SIGTERM (TPU preemption) and Ctrl-C (SIGINT) set `requested`: the loop checkpoints after the
  current step and exits cleanly. A second Ctrl-C raises KeyboardInterrupt at once; a save cut
  short that way leaves only Orbax's ignored temporary directory (see the module doc)."""

  def __init__(self):
    self.requested = False
    self.reason = ""  # "SIGTERM" or "SIGINT"
    self.previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self.previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested, self.reason = True, name
    if signum == signal.SIGINT:
      print(
        "\nCtrl-C: checkpointing after this step, then exiting (Ctrl-C again to abort now)",
        file=sys.stderr,
      )

  def restore(self) -> None:
    """Puts back the handlers that were installed before."""
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)
