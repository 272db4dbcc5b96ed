r"""The tests' RL run: configs/smoke.py cut to the smallest real step (2 queries x 4 samples, one
construction each side, a checkpoint every step), so a CLI test costs seconds of compute.

python -m tapo_jax.main --config=tests/ci_config.py --workdir=/tmp/ci [--config.train.steps=2]
"""

import importlib.util
import pathlib

SMOKE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py"


def get_config():
  spec = importlib.util.spec_from_file_location("smoke", SMOKE)
  smoke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(smoke)
  c = smoke.get_config()
  c.rollout.batch_queries = 2
  c.rollout.n = 4
  c.rollout.slots = 8
  c.rollout.max_new_tokens = 40
  c.tapo.n_pos, c.tapo.n_neg, c.tapo.m_max = 1, 1, 2
  c.optim.micro_batch = 4
  c.train.checkpoint_every = 1
  c.train.curves = False  # matplotlib: ~1 s of CPU a run (tests that read curves.png set it)
  return c
