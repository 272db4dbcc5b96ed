"""A deterministic, resumable batch iterator: its whole state is three integers saved as JSON."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tapo_jax.data.datasets import DataError


class BatchIterator:
  """Yields fixed-size batches from `items`, reshuffled every epoch from (seed, epoch)."""

  def __init__(self, items: Sequence, batch_size: int, *, seed: int = 0, shuffle: bool = True):
    if not items:
      raise ValueError("no items to iterate over")
    self.items, self.batch_size, self.shuffle = list(items), int(batch_size), shuffle
    self.seed, self.epoch, self.index = int(seed), 0, 0

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.items)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, epoch]).permutation(n)

  def next(self) -> list:
    """The next batch; wraps into the next epoch (a new order) when one runs out."""
    out = []
    while len(out) < self.batch_size:
      order = self._order(self.epoch)
      take = min(self.batch_size - len(out), len(order) - self.index)
      out.extend(self.items[i] for i in order[self.index : self.index + take])
      self.index += take
      if self.index == len(order):
        self.epoch, self.index = self.epoch + 1, 0
    return out

  def state(self) -> dict:
    return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "n": len(self.items)}

  def restore(self, s: dict) -> None:
    if s.get("n") != len(self.items):
      raise DataError(
        f"data changed since the checkpoint: {s.get('n')} items then, {len(self.items)} now; "
        "restore the data or use a new --workdir"
      )
    self.seed, self.epoch, self.index = int(s["seed"]), int(s["epoch"]), int(s["index"])
