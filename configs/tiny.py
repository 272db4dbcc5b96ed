r"""TAPO on the built-in cold-started toy model, on CPU in a few minutes (the default smoke test).

python -m tapo_jax.main --config=configs/tiny.py
"""

from tapo_jax import config as base
from tapo_jax.toy import teacher


def get_config():
  c = base.base_config()
  c.workdir = "runs/tiny"
  c.model.toy = "chain"  # the cold-started checkpoint shipped in tapo_jax/toy/chain
  c.data.prompt_template = "{problem}"
  c.data.max_prompt_tokens = 64
  c.rollout.n = 8
  c.rollout.batch_queries = 8
  c.rollout.max_new_tokens = 96
  c.rollout.slots = 64
  c.rollout.prefill_buckets = (64,)
  c.tapo.construction = "policy"
  c.tapo.synthesis_template = teacher.SYNTHESIS_TEMPLATE
  c.tapo.synthesis_max_new_tokens = 320
  c.tapo.ref_baseline = "group"  # the paper's DAE for policy constructions
  c.tapo.max_len = 384
  c.loss.vocab_chunk = 128
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 2
  c.optim.micro_batch = 32
  c.train.steps = 20
  c.train.checkpoint_every = 10
  c.train.eval_at_start = True
  c.train.eval_every = 20
  c.eval.k = 4
  c.eval.temperature = 1.0
  c.eval.greedy = True
  c.eval.max_new_tokens = 96
  return c
