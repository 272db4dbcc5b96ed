"""Imports JetStream's Engine API under a lean install (google-jetstream --no-deps).

`jetstream.engine.engine_api` imports `token_utils`, which imports `seqio.vocabularies` (and with
it TensorFlow) and, through the llama3 tokenizer, `tiktoken`; we use none of them. When such an
import fails, a minimal stand-in is registered in `sys.modules` (never when the real package
imports). The root logger's handlers and level are restored after the import, so nothing JetStream
or its dependencies configure on import changes our logging.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

STUBBED: list[str] = []  # names of the stand-ins registered in this process


class _Missing:
  """Base of stand-in classes: defining or subclassing works, using fails with a clear error."""

  _package = "?"

  def __init__(self, *args, **kwargs):
    raise ImportError(
      f"{type(self).__name__} needs the real `{self._package}` package, which is not installed "
      "(google-jetstream was installed without its dependencies)"
    )


def _drop_partial(name: str) -> None:
  for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
    del sys.modules[mod]


def _can_import(name: str) -> bool:
  try:
    importlib.import_module(name)
    return True
  except ImportError:
    _drop_partial(name)
    return False


def _stub_seqio() -> None:
  """seqio.vocabularies: token_utils and mock_utils use `Vocabulary` (subclassed, annotations)
  and `SentencePieceVocabulary` (only inside `load_vocab`)."""
  seqio = types.ModuleType("seqio")
  seqio.__path__ = []  # a package, so `import seqio.vocabularies` resolves from sys.modules
  vocabularies = types.ModuleType("seqio.vocabularies")

  class Vocabulary(_Missing):
    _package = "seqio"

  class SentencePieceVocabulary(Vocabulary):
    pass

  vocabularies.Vocabulary = Vocabulary
  vocabularies.SentencePieceVocabulary = SentencePieceVocabulary
  seqio.vocabularies = vocabularies
  sys.modules["seqio"] = seqio
  sys.modules["seqio.vocabularies"] = vocabularies
  STUBBED.append("seqio")


def _stub_tiktoken() -> None:
  """tiktoken: jetstream's llama3 tokenizer imports `tiktoken.Encoding` and
  `tiktoken.load.load_tiktoken_bpe` at module level and uses them only when built."""
  tiktoken = types.ModuleType("tiktoken")
  tiktoken.__path__ = []
  load = types.ModuleType("tiktoken.load")

  class Encoding(_Missing):
    _package = "tiktoken"

  def load_tiktoken_bpe(*args, **kwargs):
    raise ImportError("load_tiktoken_bpe needs the real `tiktoken` package")

  tiktoken.Encoding = Encoding
  tiktoken.load = load
  load.load_tiktoken_bpe = load_tiktoken_bpe
  sys.modules["tiktoken"] = tiktoken
  sys.modules["tiktoken.load"] = load
  STUBBED.append("tiktoken")


def import_engine_api() -> types.ModuleType:
  """`jetstream.engine.engine_api`, with stand-ins for missing optional dependencies."""
  if "jetstream.engine.engine_api" in sys.modules:
    return sys.modules["jetstream.engine.engine_api"]
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  try:
    if not _can_import("seqio"):
      _stub_seqio()
    if not _can_import("tiktoken"):
      _stub_tiktoken()
    return importlib.import_module("jetstream.engine.engine_api")
  finally:
    root.handlers[:] = handlers
    root.setLevel(level)


engine_api = import_engine_api()
