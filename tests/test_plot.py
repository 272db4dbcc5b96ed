"""curves.png from metrics.jsonl: the panels that have data, a valid PNG, the command."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from tapo_jax import plot

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_metrics(workdir, steps=40, with_eval=True):
  rows = []
  for s in range(1, steps + 1):
    rows.append(
      {
        "step": s,
        "time": 1.0 * s,
        "reward/accuracy": 0.5 + s / 100,
        "reward/mean": 0.5 + s / 100,
        "loss": 0.1 / s,
        "response/len_mean": 30.0 + s,
        "response/len_max": 48.0,
        "tapo/constructions_parsed": 3.0,
        "tapo/constructions_correct": 2.0,
        "tapo/eligible_rate": 0.25,
        "tapo/adv_ref_mean": None if s == 3 else 0.1,  # a non-finite value is logged as null
        "perf/rollout_tokens_per_s": 100.0,
      }
    )
    if with_eval and s % 10 == 0:
      rows.append(
        {"step": s, "time": 1.0 * s, "eval/arith/avg@4": 0.7, "eval/arith/n_problems": 64}
      )
  os.makedirs(workdir, exist_ok=True)
  text = "".join(json.dumps(r) + "\n" for r in rows)
  pathlib.Path(workdir, "metrics.jsonl").write_text(text + '{"step": 41, "loss"')  # torn line


def test_panels_follow_the_keys_present(tmp_path):
  write_metrics(tmp_path)
  rows = plot.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert len(rows) == 44  # the torn last line is skipped
  panels = dict(plot.panel_keys(rows))
  assert list(panels) == [
    "reward", "held-out eval", "response length (tokens)", "loss",
    "TAPO constructions per step", "TAPO statistics",
  ]  # fmt: skip
  assert panels["held-out eval"] == ["eval/arith/avg@4"]  # n_problems is not a curve
  assert panels["TAPO statistics"] == ["tapo/eligible_rate", "tapo/adv_ref_mean"]
  steps, values = plot.series(rows, "tapo/adv_ref_mean")
  assert 3 not in steps and len(values) == 39
  write_metrics(tmp_path / "grpo", with_eval=False)
  rows = plot.read_metrics(str(tmp_path / "grpo" / "metrics.jsonl"))
  assert "held-out eval" not in dict(plot.panel_keys(rows))


def test_moving_average_by_hand():
  assert plot.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_run_writes_a_png(tmp_path):
  write_metrics(tmp_path)
  out = plot.plot_run(str(tmp_path))
  assert out == str(tmp_path / "curves.png")
  assert pathlib.Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  pixels = image.imread(out)
  assert pixels.shape == (960, 1200, 4)  # 3 rows x 2 columns of panels at 100 dpi
  assert np.unique(pixels.reshape(-1, 4), axis=0).shape[0] > 50  # drawn, not blank
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp.png")]


def test_plot_command(tmp_path):
  write_metrics(tmp_path)
  run = lambda *a: subprocess.run(  # noqa: E731
    [sys.executable, "-m", "tapo_jax.plot", *a], cwd=ROOT, capture_output=True, text=True
  )
  out = run(str(tmp_path), f"--out={tmp_path / 'c.png'}")
  assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "c.png"), out.stderr
  out = run(str(tmp_path / "missing"))
  assert out.returncode == 2 and out.stderr.startswith("error:") and "metrics.jsonl" in out.stderr


def test_nothing_to_plot_is_an_error(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.5}\n')
  with pytest.raises(ValueError, match="no plottable metrics"):
    plot.plot_run(str(tmp_path))


def test_damaged_inputs_are_one_line_errors(tmp_path, capsys):
  """Issue 24.7: metrics.jsonl a directory, an --out that is a directory, a metrics file of
  non-UTF-8 bytes: one `error:` line, exit 2, nothing written (they were tracebacks)."""
  (tmp_path / "a" / "metrics.jsonl").mkdir(parents=True)
  write_metrics(tmp_path / "b")
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n\x80\n")
  cases = {
    (str(tmp_path / "a"),): "metrics.jsonl: not a file",
    (str(tmp_path / "b"), f"--out={tmp_path / 'a'}"): "a: is a directory",
    (str(tmp_path / "c"),): "metrics.jsonl: no plottable metrics",
  }
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  for args, message in cases.items():
    assert plot.main(list(args)) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_damaged_line_is_skipped_like_a_torn_one(tmp_path):
  write_metrics(tmp_path)
  with open(tmp_path / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 99, "loss": \xff}\n')
  rows = plot.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert rows and max(r["step"] for r in rows) < 99


def test_end_of_run_plot_skips_a_run_with_nothing_logged(tmp_path):
  """train.steps=0 (or a rerun after metrics.jsonl was removed) ended the run in a traceback."""
  assert plot.plot_if_logged(str(tmp_path)) is None
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.5}\n')
  assert plot.plot_if_logged(str(tmp_path)) is None
  write_metrics(tmp_path)
  assert plot.plot_if_logged(str(tmp_path)) == str(tmp_path / "curves.png")
