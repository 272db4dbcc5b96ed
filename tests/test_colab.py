"""launch/colab_smoke.ipynb runs against this checkout: its code cells, executed in order.

The notebook's IPython syntax is translated: `!cmd` runs in a shell (a `tapo_jax.main` run gets a
few small-size flags, like the other CLI tests), `%cd` changes directory, and `IPython.display`
is a stand-in whose Image checks that the file it shows exists. Cells that clone or pip-install
are skipped: the checkout is already installed.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import cli
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_smoke.ipynb"
SMALL = {
  "rl": "--config.train.steps=2 --config.rollout.batch_queries=2 --config.rollout.n=4 "
  "--config.rollout.max_new_tokens=40 --config.optim.micro_batch=4 "
  "--config.train.eval_at_start=False",
  "eval": "--config.eval.k=1 --config.eval.pass_ks=1 --config.eval.max_new_tokens=24",
}
PRELUDE = textwrap.dedent(
  """
  import os, subprocess, sys, types

  def _sh(cmd):
    print("$", cmd, flush=True)
    subprocess.run(cmd, shell=True, check=True)

  class Image:  # IPython.display.Image: what Colab would show must exist and be a PNG
    def __init__(self, path):
      with open(path, "rb") as f:
        assert f.read(8) == b"\\x89PNG\\r\\n\\x1a\\n", path
      print("shown:", path)

  display = types.ModuleType("IPython.display")
  display.Image = Image
  sys.modules["IPython"] = types.ModuleType("IPython")
  sys.modules["IPython.display"] = display
  """
)


def code_cells(notebook: pathlib.Path) -> list[str]:
  cells = json.loads(notebook.read_text())["cells"]
  return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def is_setup(cell: str) -> bool:
  return bool(re.search(r"pip install|git clone", cell))


def translate(cell: str) -> str:
  """IPython cell -> plain Python."""
  out = []
  for line in cell.splitlines():
    stripped = line.strip()
    if stripped.startswith("!"):
      cmd = stripped[1:]
      if "tapo_jax.main" in cmd:
        cmd += " " + SMALL["eval" if "--config.mode=eval" in cmd else "rl"]
      out.append(f"_sh({cmd!r})")
    elif stripped.startswith("%cd"):
      out.append(f"os.chdir({stripped[3:].strip()!r})")
    else:
      out.append(line)
  return "\n".join(out)


def test_translate_handles_shell_magics_and_python():
  assert translate("!ls runs") == "_sh('ls runs')"
  assert translate("%cd tapo_jax") == "os.chdir('tapo_jax')"
  assert translate("x = 1\n  print(x)") == "x = 1\n  print(x)"
  assert SMALL["rl"] in translate("!python -m tapo_jax.main --config=configs/tiny.py")


@pytest.mark.slow
def test_notebook_code_cells_run_against_the_checkout(tmp_path):
  cells = code_cells(NOTEBOOK)
  assert sum(is_setup(c) for c in cells) == 1  # only the install cell is skipped
  script = PRELUDE + "\n".join(translate(c) for c in cells if not is_setup(c))
  (tmp_path / "configs").symlink_to(ROOT / "configs")  # the notebook runs from the repo root
  path = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
  env = cli.env(torch=True, PYTHONPATH=str(ROOT), PATH=path)  # `python` is ours; Colab has torch
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
    timeout=900,
  )  # fmt: skip
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
  assert "shown: runs/colab/curves.png" in out.stdout
  assert "Qwen2ForCausalLM" in out.stdout
  assert (tmp_path / "runs" / "colab_eval" / "eval_summary.json").exists()
  steps = [json.loads(r)["step"] for r in open(tmp_path / "runs" / "colab" / "metrics.jsonl")]
  assert steps == [1, 2]
