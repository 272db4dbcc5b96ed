r"""The paper's cold-start set for Qwen2.5-7B (stage 1 of 3): ~45k SFT rows, 30k constructions +
15k plain solutions, built from the base model's own rollouts on DeepScaleR (or DAPO-Math-17k).

python -m tapo_jax.main --config=configs/qwen7b_coldstart_data.py --workdir=/mnt/runs/cs_data \
  --config.model.path=/mnt/models/Qwen2.5-7B --config.data.train_path=/mnt/data/deepscaler.jsonl

Writes WORKDIR/coldstart.jsonl (configs/qwen7b_coldstart.py trains on it) and
WORKDIR/coldstart_summary.json; rerun the same command after a preemption to continue. One host
(a v5p-8 slice or one GPU machine); WORKDIR is a local or mounted path.
"""

from tapo_jax import config as base


def get_config():
  c = base.base_config()
  c.mode = "coldstart"
  c.model.path = "/mnt/models/Qwen2.5-7B"  # the policy whose mistakes are rewritten
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"  # sampling only: no float32 master weights
  c.model.attention_impl = "splash"  # Pallas kernel on TPU; "" or cudnn on GPU
  c.mesh = dict(data=1, fsdp=-1, tensor=4)
  c.data.train_path = "/mnt/data/deepscaler.jsonl"  # or dapo-math-17k.parquet (layout dapo)
  c.data.max_prompt_tokens = 1024
  c.rollout.n = 8  # K, as in RL
  c.rollout.max_new_tokens = 8192
  c.rollout.slots = 256
  c.rollout.prefill_buckets = (256, 512, 1024)
  c.tapo.n_pos, c.tapo.n_neg, c.tapo.m_max = 2, 4, 4  # DCS, as in RL
  c.tapo.synthesis_max_new_tokens = 9216  # a copied y- (<= 8192) + analysis and correction
  c.coldstart.constructions = 30000  # the paper's mix: 30k constructions ...
  c.coldstart.solutions = 15000  # ... + 15k plain solutions
  c.coldstart.chunk_problems = 512  # 4096 rollouts per chunk: the unit of progress on preemption
  # DCS keeps queries the model solves 2-4 times in 8 (roughly a fifth of DeepScaleR for a 7B
  # base model); each gives up to 4 pairs, of which the teacher's share that parses, anchors and
  # is right decides how many passes 30k constructions take.
  c.coldstart.passes = 4
  # OPEN: the paper does not say which model wrote its cold-start constructions. An instruction-
  # tuned model of the same family follows the format; a larger one behind an OpenAI-compatible
  # server works too: --config.coldstart.teacher_path= --config.coldstart.teacher_url=http://HOST:8000
  # --config.coldstart.teacher_model=Qwen2.5-72B-Instruct
  c.coldstart.teacher_path = "/mnt/models/Qwen2.5-7B-Instruct"
  c.coldstart.teacher_temperature = 0.7
  c.coldstart.teacher_top_p = 0.95
  return c
