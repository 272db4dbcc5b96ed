r"""The policy out as a Hugging Face directory that transformers, vLLM or SGLang load.

  OUT/config.json, model.safetensors (or shards + index), tokenizer.json, tokenizer_config.json,
  chat_template.jinja, generation_config.json (when the source model has one)

`export_model(model, tokenizer, out)` writes a live model (the end of an RL or SFT run);
`export_checkpoint(workdir, step)` rebuilds the policy of any kept checkpoint from the run's
recorded config (WORKDIR/config.json: the model directory gives the architecture and tokenizer) and
reads only the params subtree of the checkpoint, never the optimizer state.

Everything is written into a temporary directory beside OUT and renamed over it at the end, so an
interrupted export leaves the previous OUT (or none), never a half-written one. OUT is replaced
only when it is absent, an empty directory or an earlier export (files with the names an export
writes, config.json among them); a file, any other directory, the workdir, a directory holding it
or the source model is refused (CheckpointError) and left as it was.

  python -m tapo_jax.export WORKDIR [--step=N] [--out=DIR] [--model=HF_DIR]

exports step N (default: the newest kept) to DIR (default: WORKDIR/export/step_N); --model names
the base model directory for workdirs written before runs recorded their config.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from tapo_jax import toy
from tapo_jax.models import CheckpointError, load_config, save_pretrained
from tapo_jax.models.qwen import Qwen
from tapo_jax.train import checkpoint
from tapo_jax.train import workdir as workdir_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COPIED = ("generation_config.json", "chat_template.jinja")  # from the source model, when absent
# The names an export (save_pretrained + a tokenizer's save_pretrained + COPIED) writes.
EXPORT_NAME = re.compile(
  r"config\.json|generation_config\.json|chat_template\.jinja|tokenizer(_config)?\.json|"
  r"special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|"
  r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)


def check_out(out: str | os.PathLike, *, protect: tuple = ()) -> None:
  """Raises CheckpointError unless `out` may be replaced by an export: absent, an empty directory
  or an earlier export, and neither one of the `protect`ed directories (the workdir, the source
  model) nor a directory holding one."""
  out = Path(out)
  where = os.path.realpath(out)
  for p in protect:
    if p and os.path.exists(p):
      real = os.path.realpath(p)
      if where == real or real.startswith(where.rstrip(os.sep) + os.sep):
        what = "is" if where == real else "holds"
        raise CheckpointError(
          f"--out={out}: {what} {p}, which an export would replace; choose a new directory"
        )
  if not os.path.lexists(out):
    return
  if not out.is_dir() or out.is_symlink():
    raise CheckpointError(
      f"--out={out}: exists and is not a directory; an export replaces its output whole, so "
      "choose a new or empty directory"
    )
  names = os.listdir(out)
  foreign = [n for n in names if not (EXPORT_NAME.fullmatch(n) and (out / n).is_file())]
  if foreign or (names and "config.json" not in names):
    why = f"{foreign[0]!r} is not a file an export writes" if foreign else "no config.json"
    raise CheckpointError(
      f"--out={out}: not an earlier export ({why}); an export replaces its output whole, so "
      "choose a new or empty directory"
    )


def export_model(model: Qwen, tokenizer, out: str | os.PathLike, *, source_dir=None) -> Path:
  """Writes `model` and `tokenizer` as a Hugging Face directory at `out` (replacing it whole).

  `source_dir` (the model the run started from) supplies generation_config.json and a chat
  template file the tokenizer did not write. Every process of a multi-host run must call this;
  process 0 writes. Raises CheckpointError (nothing written) unless `check_out` allows `out`."""
  out = Path(out)
  check_out(out, protect=(source_dir,))
  writer = jax.process_index() == 0
  tmp = out.parent / f".{out.name}.export-tmp"
  if writer:
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
  save_pretrained(model, tmp)
  if not writer:
    return out
  try:
    tokenizer.save_pretrained(str(tmp))
    for name in COPIED:
      src = Path(source_dir, name) if source_dir else None
      if src is not None and src.is_file() and not (tmp / name).exists():
        shutil.copyfile(src, tmp / name)
    old = out.parent / f".{out.name}.export-old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
      os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def model_dir(cfg: dict) -> str:
  """The base model directory of a recorded config (model.path, else the shipped toy)."""
  model = cfg.get("model", {})
  if model.get("path"):
    return model["path"]
  if model.get("toy") in toy.DOMAINS:
    return str(toy.checkpoint_dir(model["toy"]))
  raise CheckpointError("the recorded config names no model (model.path and model.toy are empty)")


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
  base = model_path or model_dir(cfg)
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
