"""A model out as a Hugging Face directory that transformers, vLLM or SGLang load.

  OUT/config.json, model.safetensors (or shards + index), tokenizer.json, tokenizer_config.json,
  chat_template.jinja, generation_config.json (when the source model has one)

Everything is written into a temporary directory beside OUT and renamed over it at the end, so an
interrupted export leaves the previous OUT (or none), never a half-written one. OUT is replaced
only when it is absent, an empty directory or an earlier export (files with the names an export
writes, config.json among them); a file, any other directory, the workdir, a directory holding it
or the source model is refused (CheckpointError) and left as it was.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import jax

from tapo_jax.models.qwen import Qwen
from tapo_jax.models.weights import CheckpointError, save_pretrained

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
