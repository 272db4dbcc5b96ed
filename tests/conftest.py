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
