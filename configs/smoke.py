r"""The fastest whole RL run: TAPO (divergence) on the small `arith` toy, ~1 minute on CPU. The
tests run this config; users start with configs/tiny.py.

python -m tapo_jax.main --config=configs/smoke.py
"""

from tapo_jax import config as base


def get_config():
  c = base.base_config()
  c.workdir = "runs/smoke"
  c.model.toy = "arith"  # the tiny checkpoint shipped in tapo_jax/toy/arith
  c.data.prompt_template = "{problem}"
  c.data.max_prompt_tokens = 64
  c.rollout.n = 8
  c.rollout.batch_queries = 4
  c.rollout.max_new_tokens = 48
  c.rollout.slots = 32
  c.rollout.prefill_buckets = (32, 64)
  # The toy model solves ~90% at T=1 and ~74% at T=1.3, where 58% of its queries have 2-6 of 8
  # right: DCS keeps pass rates 25-75% here instead of the paper's 25-50%.
  c.rollout.temperature = 1.3
  c.tapo.n_pos, c.tapo.n_neg = 2, 2
  c.tapo.construction = "divergence"  # no cold start needed (ref_baseline orig, the default)
  c.tapo.max_len = 160
  # algorithm=opsd: the built-in English teacher template does not fit the toy's 256 positions
  c.opsd.teacher_template = "{solution}\n{problem}"
  c.loss.vocab_chunk = 64
  c.optim.lr = 2e-5
  c.optim.warmup_steps = 2
  c.optim.micro_batch = 16
  c.train.steps = 20
  c.train.checkpoint_every = 10
  c.eval.k = 4
  c.eval.max_new_tokens = 48
  return c
