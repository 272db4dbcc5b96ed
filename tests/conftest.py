"""Eight fake CPU devices for every test; set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer():
  """Qwen2's real BPE tokenizer (151,646 ids), built offline; see tests/qwen_tokenizer.py."""
  from qwen_tokenizer import qwen2_tokenizer

  return qwen2_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def one_compilation_cache_per_worker(tmp_path_factory):
  """Every `python -m tapo_jax.main` (or notebook) a test starts inherits, through os.environ, one
  persistent compilation cache per test worker: the many CLI runs of the smoke config compile each
  program once per worker instead of once per test. This process's JAX read its configuration at
  import (during collection) and keeps its in-memory caches only."""
  os.environ.update(
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
