"""A PNG of a run's curves from its metrics.jsonl: `python -m tapo_jax.plot WORKDIR`.

One panel per group of metrics that the run logged (a panel with no data is left out):

  reward            reward/accuracy, reward/mean (fraction of rollouts graded correct)
  held-out eval     eval/<set>/avg@k, pass@k, maj@k, greedy (periodic eval during RL, or eval
                    mode), first_pass and fix_rate (tapo_jax/eval/reflection.py)
  response length   response/len_mean, response/len_max (tokens)
  loss              loss, loss/orig, loss/ref (RL) or nll (SFT)
  TAPO constructions  tapo/constructions_attempted, _parsed, _correct (per step)
  TAPO statistics   tapo/eligible_rate, tapo/anchored_fraction, tapo/adv_ref_mean
  OPSD divergence   opsd/divergence, opsd/agreement, opsd/logprob_gap (algorithm=opsd)
  OPSD rows         opsd/rows_from_group, _from_reference, _without_solution (per step)

Runs longer than 30 steps show each series faintly with its moving average (window ~ steps/20)
on top. The figure is drawn with matplotlib's Agg canvas (no display, no pyplot global state) and
written beside the metrics atomically (a temporary file renamed over WORKDIR/curves.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("reward", (r"reward/accuracy", r"reward/mean")),
  (
    "held-out eval",
    (r"eval/.+/(avg|pass|maj)@\d+", r"eval/.+/greedy", r"eval/.+/first_pass", r"eval/.+/fix_rate"),
  ),
  ("response length (tokens)", (r"response/len_mean", r"response/len_max")),
  ("loss", (r"loss", r"loss/orig", r"loss/ref", r"nll")),
  (
    "TAPO constructions per step",
    (r"tapo/constructions_attempted", r"tapo/constructions_parsed", r"tapo/constructions_correct"),
  ),
  ("TAPO statistics", (r"tapo/eligible_rate", r"tapo/anchored_fraction", r"tapo/adv_ref_mean")),
  ("OPSD divergence", (r"opsd/divergence", r"opsd/agreement", r"opsd/logprob_gap")),
  (
    "OPSD rows per step",
    (r"opsd/rows_from_group", r"opsd/rows_from_reference", r"opsd/rows_without_solution"),
  ),
)
SMOOTH_ABOVE = 30  # points; longer series get a moving average drawn over them


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl (a torn last line, from a killed run, or a damaged one that is
  not JSON or not UTF-8 is skipped)."""
  rows = []
  with open(path, "rb") as f:
    for line in f:
      try:
        row = json.loads(line.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int | float):
        rows.append(row)
  return rows


def series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
  """(steps, values) of `key`, skipping rows without a finite value; the last row wins a step."""
  by_step = {}
  for row in rows:
    v = row.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
      by_step[row["step"]] = float(v)
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def panel_keys(rows: Sequence[dict]) -> list[tuple[str, list[str]]]:
  """[(title, keys)] of the panels that have data, keys in the order of PANELS' patterns."""
  present = sorted({k for row in rows for k in row})
  out = []
  for title, patterns in PANELS:
    keys = []
    for pattern in patterns:
      keys += [k for k in present if re.fullmatch(pattern, k) and k not in keys]
    keys = [k for k in keys if series(rows, k)[0]]
    if keys:
      out.append((title, keys))
  return out


def moving_average(values: Sequence[float], window: int) -> list[float]:
  """Trailing mean over the last `window` values (fewer at the start)."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v
    if i >= window:
      total -= values[i - window]
    out.append(total / min(i + 1, window))
  return out


def plot_rows(rows: Sequence[dict], out: str, title: str = "") -> str:
  """Draws the panels of `rows` into the PNG `out`; returns `out`."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  panels = panel_keys(rows)
  if not panels:
    raise ValueError("no plottable metrics (reward, eval, length, loss or TAPO keys)")
  if os.path.isdir(out):
    raise ValueError(f"{out}: is a directory; expected a PNG file path")
  cols = 2 if len(panels) > 1 else 1
  nrows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(6.0 * cols, 3.2 * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  for i, (name, keys) in enumerate(panels):
    ax = fig.add_subplot(nrows, cols, i + 1)
    for key in keys:
      steps, values = series(rows, key)
      label = key.removeprefix("eval/")
      if len(values) > SMOOTH_ABOVE:
        (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
        window = max(2, len(values) // 20)
        ax.plot(steps, moving_average(values, window), color=line.get_color(), label=label)
      else:
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  if title:
    fig.suptitle(title, fontsize=11)
  tmp = f"{out}.tmp.png"
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, out)
  return out


def plot_run(workdir: str, out: str | None = None) -> str:
  """Writes WORKDIR/curves.png (or `out`) from WORKDIR/metrics.jsonl; returns its path."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file (has the run logged a step yet?)")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: not a file")
  rows = read_metrics(path)
  last = max((r["step"] for r in rows), default=0)
  name = os.path.basename(os.path.normpath(workdir))
  try:
    return plot_rows(rows, out or os.path.join(workdir, "curves.png"), f"{name} (step {last:g})")
  except ValueError as e:
    raise ValueError(f"{path}: {e}" if str(e).startswith("no plottable") else str(e)) from None


def plot_if_logged(workdir: str) -> str | None:
  """plot_run at the end of a run: WORKDIR/curves.png, or None when there is nothing to draw
  (train.steps=0, a rerun after metrics.jsonl was removed)."""
  try:
    return plot_run(workdir)
  except (FileNotFoundError, ValueError):
    return None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m tapo_jax.plot", description="Draw a run's curves into WORKDIR/curves.png."
  )
  parser.add_argument("workdir")
  parser.add_argument("--out", default=None, help="PNG path (default: WORKDIR/curves.png)")
  args = parser.parse_args(argv)
  try:
    print(plot_run(args.workdir, args.out))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {e.filename or args.workdir}: {e.strerror or e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
