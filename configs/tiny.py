r"""TAPO on the built-in cold-started `chain` toy, on CPU in 1-2 minutes (the default run): the
paper's construction (the policy rewrites its own wrong answer, guided by a right one), held-out
avg@4 and greedy accuracy before and after 20 steps, curves in WORKDIR/curves.png.

python -m tapo_jax.main --config=configs/tiny.py
python -m tapo_jax.main --config=configs/tiny.py --config.tapo.construction=divergence \
  --config.tapo.ref_baseline=orig    # the rule-based construction (no generation)
python -m tapo_jax.main --config=configs/tiny.py --config.algorithm=grpo   # the GRPO arm
python -m tapo_jax.main --config=configs/tiny.py --config.algorithm=opsd   # the OPSD arm
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
  # policy: the shipped checkpoint copies (docs/toy.md): in 20-step runs of this config, 0.75-0.79
  # of its constructions reach the gold answer (seeds 0-2) and keep ~0.40 of y⁻ (a perfect copier
  # of the same pairs: ~0.42).
  c.tapo.construction = "policy"
  c.tapo.ref_baseline = "group"
  c.tapo.synthesis_template = teacher.SYNTHESIS_TEMPLATE  # the toy's short template (policy)
  c.tapo.synthesis_max_new_tokens = 320
  c.tapo.max_len = 384
  # algorithm=opsd: the toy model never saw English; of the templates tried it predicts the gold
  # solution best after this one (-0.39 nats/token vs the built-in's -1.21; the student without
  # any solution: -0.03; docs/study.md)
  c.opsd.teacher_template = "{solution}\n{problem}"
  c.loss.vocab_chunk = 128
  c.optim.lr = 3e-5
  c.optim.warmup_steps = 2
  # one packed row of tapo.max_len a micro-batch: a step's trained sequences (~5k real tokens)
  # fill ~14 rows, ~10% of the processed tokens padding (a micro-batch of 32 rows held them all,
  # most of it empty)
  c.optim.micro_batch_tokens = 384
  c.train.steps = 20
  c.train.checkpoint_every = 10
  c.train.eval_at_start = True
  c.train.eval_every = 20
  c.eval.k = 4
  c.eval.temperature = 1.0
  c.eval.greedy = True
  c.eval.max_new_tokens = 96
  return c
