r"""A kept checkpoint of an RL or SFT workdir out as a Hugging Face directory (the format:
tapo_jax/models/export.py, which also writes the live policy at the end of a run).

`export_checkpoint(workdir, step)` rebuilds the policy of any kept checkpoint from the run's
recorded config (WORKDIR/config.json: the model directory gives the architecture and tokenizer) and
reads only the params subtree of the checkpoint, never the optimizer state.

  python -m tapo_jax.export WORKDIR [--step=N] [--out=DIR] [--model=HF_DIR]

exports step N (default: the newest kept) to DIR (default: WORKDIR/export/step_N); --model names
the base model directory for workdirs written before runs recorded their config.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from tapo_jax import policy
from tapo_jax.models import CheckpointError, load_config
from tapo_jax.models.export import check_out, export_model
from tapo_jax.models.qwen import DTYPES, Qwen
from tapo_jax.train import checkpoint
from tapo_jax.train import workdir as workdir_lib


def load_checkpoint_policy(
  workdir: str, step: int | None = None, *, model_path: str | None = None
) -> tuple[Qwen, object, str, int]:
  """(model with the params of checkpoint `step`, tokenizer, base model directory, step).

  The params are restored as host arrays (no device memory, any device count)."""
  import transformers

  cfg = workdir_lib.read_config(workdir) or {}
  if not cfg and not model_path:
    raise CheckpointError(
      f"{os.path.join(workdir, workdir_lib.CONFIG_NAME)}: missing (the run predates config "
      "records); pass --model=DIR, the model directory the run started from"
    )
  try:
    base = model_path or policy.model_dir(cfg)
  except ValueError as e:
    raise CheckpointError(f"the recorded config names {e}") from None
  kept = checkpoint.steps(workdir)
  if not kept:
    raise CheckpointError(f"{os.path.join(workdir, 'checkpoints')}: no checkpoints to export")
  step = kept[-1] if step is None else int(step)
  if step not in kept:
    raise CheckpointError(f"{workdir}: no checkpoint at step {step} (kept: {kept})")
  dtype = DTYPES.get(cfg.get("model", {}).get("param_dtype", "float32"), jnp.float32)
  abstract = nnx.eval_shape(
    lambda: Qwen(load_config(base), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  )
  graphdef, params = nnx.split(abstract, nnx.Param)
  params = checkpoint.restore_params(workdir, step, params)
  tokenizer = transformers.AutoTokenizer.from_pretrained(base)
  return nnx.merge(graphdef, params), tokenizer, base, step


def export_checkpoint(
  workdir: str,
  step: int | None = None,
  out: str | os.PathLike | None = None,
  *,
  model_path: str | None = None,
) -> Path:
  """Exports checkpoint `step` (default: the newest) of an RL or SFT workdir; returns OUT.

  An `out` that `check_out` refuses (the workdir, a directory holding it, a file, a directory
  that is not an earlier export) raises CheckpointError before anything is read or written."""
  if out is not None:
    check_out(out, protect=(workdir, model_path))
  model, tokenizer, base, step = load_checkpoint_policy(workdir, step, model_path=model_path)
  out = out or os.path.join(workdir, "export", f"step_{step}")
  check_out(out, protect=(workdir, base))
  return export_model(model, tokenizer, out, source_dir=base)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m tapo_jax.export",
    description="Export a kept checkpoint of an RL or SFT workdir as a Hugging Face directory.",
  )
  parser.add_argument("workdir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument(
    "--out", default=None, help="output directory (default: WORKDIR/export/step_N)"
  )
  parser.add_argument("--model", default=None, help="base model directory (default: recorded)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    print(f"error: {args.workdir}: no such workdir", file=sys.stderr)
    return 2
  try:
    out = export_checkpoint(args.workdir, args.step, args.out, model_path=args.model)
  except (CheckpointError, workdir_lib.ResumeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
