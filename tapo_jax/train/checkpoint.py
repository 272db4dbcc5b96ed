"""Orbax checkpoints of the train state plus the data iterator's JSON state; exact resume."""

from __future__ import annotations

import os
import signal
import sys

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps under `workdir/checkpoints`, keeping the newest `keep`."""

  def __init__(self, workdir: str, every: int, keep: int):
    self.every = max(1, int(every))
    self.manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether save(step, ..., force=force) would write a checkpoint."""
    return (force or step % self.every == 0) and self.manager.latest_step() != step

  def save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); `extra` is JSON (data iterator, metrics)."""
    if not force and step % self.every:
      return False
    if self.manager.latest_step() == step:
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int, state_sharding, state_like) -> tuple:
    """(state, extra) of checkpoint `step`, placed with `state_sharding`."""

    def spec(sharding, subtree):  # the sharding tree is a prefix of the state (nnx.Variable)
      return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), subtree
      )

    abstract = jax.tree.map(spec, state_sharding, state_like)
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["extra"]

  def resume(self, state, state_sharding, iterator) -> tuple:
    """(state, start step, extra): the newest checkpoint's, with the iterator moved to its
    position; (state, 0, {}) when the workdir has none."""
    start = self.latest_step() or 0
    extra = {}
    if start:
      state, extra = self.restore(start, state_sharding, state)
      iterator.restore(extra["data"])
      print(f"resumed from {self.manager.directory} at step {start}", file=sys.stderr)
    return state, start, extra

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionGuard:
  """SIGTERM (TPU preemption) sets `requested`; the loop checkpoints after the step and exits."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True
