"""Metric sinks: JSONL, TensorBoard event files, and a progress bar with ETA.

A run resumed from the checkpoint of step S logs steps S+1, S+2, ... again: opening the writer with
`start_step=S` first drops the rows of metrics.jsonl with step > S (left by the run that stopped
after S without checkpointing them) and starts the TensorBoard events with `purge_step=S+1`, which
tells TensorBoard to hide earlier events of steps > S, so no step is ever shown twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


def to_host(metrics: dict) -> dict[str, float]:
  """Device scalars -> Python floats (blocks; call one step late to keep dispatch async)."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    a = np.asarray(v)
    out[k] = float(a) if a.size == 1 else float(a.mean())
  return out


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drops the rows of a metrics.jsonl whose step is > `last_step` (and a torn last line);
  rewrites the file atomically only when something goes. Returns the number of rows dropped."""
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    step = row.get("step") if isinstance(row, dict) else None
    if isinstance(step, int | float) and step <= last_step:
      kept.append(line if line.endswith("\n") else line + "\n")
  dropped = len(lines) - len(kept)
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


class MetricWriter:
  """Appends one JSON object per step to metrics.jsonl and writes TensorBoard scalars.

  `start_step` (a training run starting or resuming at that step) first removes what an earlier
  run logged after it (see the module doc); None (eval) appends to whatever is there.
  Only process 0 of a multi-host run writes; on the others every method does nothing."""

  def __init__(
    self, workdir: str, *, total_steps: int, start_step: int | None = None, quiet: bool = False
  ):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    purge = None
    if start_step is not None:
      truncate_jsonl(path, start_step)
      purge = start_step + 1
    self.jsonl = open(path, "a", buffering=1)  # noqa: SIM115
    from tensorboardX import SummaryWriter

    # tensorboardX names files by the second and opens them with "wb": a second writer in the
    # same second would erase the first's events. The nanosecond suffix keeps them apart, in order.
    self.tb = SummaryWriter(
      os.path.join(workdir, "tb"), purge_step=purge, filename_suffix=f".{time.time_ns()}"
    )
    self.bar = None
    if not quiet:
      from tqdm import tqdm

      self.bar = tqdm(
        total=total_steps,
        initial=start_step or 0,
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
      )
    self.t0 = time.time()

  def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {
      f"{prefix}{k}": (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
      for k, v in metrics.items()
    }
    self.jsonl.write(json.dumps({"step": step, "time": time.time() - self.t0, **clean}) + "\n")
    for k, v in clean.items():
      if v is not None:
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def advance(self, summary: dict[str, float]) -> None:
    """One step done: moves the bar and shows a few headline numbers."""
    if self.enabled and self.bar is not None:
      self.bar.set_postfix(
        {k: f"{v:.3g}" for k, v in summary.items() if isinstance(v, float)}, refresh=False
      )
      self.bar.update(1)

  def close(self) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.close()
    self.tb.close()
    self.jsonl.close()


class CompileCounter:
  """Counts XLA compilations (and their seconds) while open: `take()` returns those since the
  last take. A compilation after the first steps means a shape or a static argument changed."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    self._listener = self._record
    jax.monitoring.register_event_duration_secs_listener(self._listener)

  def _record(self, event: str, duration: float, **_) -> None:
    if event == self.EVENT:
      self.count += 1
      self.seconds += duration

  def take(self) -> dict[str, float]:
    out = {"perf/compilations": float(self.count), "perf/compile_s": self.seconds}
    self.count, self.seconds = 0, 0.0
    return out

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)
