"""Imported by every Python started with this directory on PYTHONPATH (tests/cli.py's `env`): the
tests' child processes run as a user's install does, without torch. torch is installed for the
tests' references only, and transformers imports it whenever it can be found (its tokenizer's
config module), ~1.2 s of CPU in every child. A None entry in sys.modules makes
`importlib.util.find_spec("torch")` return None and `import torch` raise ImportError."""

import sys

sys.modules.setdefault("torch", None)
