"""Metric sinks: JSONL, TensorBoard event files, and a progress bar with ETA."""

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


class MetricWriter:
  """Appends one JSON object per step to metrics.jsonl and writes TensorBoard scalars.

  Only process 0 of a multi-host run writes; on the others every method does nothing."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, quiet: bool = False):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
    from tensorboardX import SummaryWriter

    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.bar = None
    if not quiet:
      from tqdm import tqdm

      self.bar = tqdm(
        total=total_steps,
        initial=start_step,
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
