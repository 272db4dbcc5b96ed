r"""TAPO on Qwen2.5-7B (or Qwen3-8B), the paper's recipe, TPU v5p-32 / v5e pod slices.

python -m tapo_jax.main --config=configs/qwen7b.py --workdir=gs://BUCKET/run1 \
  --config.model.path=/mnt/models/Qwen2.5-7B --config.data.train_path=/mnt/data/dapo17k.parquet
"""

from tapo_jax import config as base


def get_config():
  c = base.base_config()
  c.model.path = "/mnt/models/Qwen2.5-7B"  # a local HF directory; Qwen3-8B works the same way
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.model.attention_impl = "splash"  # Pallas kernel on TPU; [B, heads, T, T] scores do not fit
  c.mesh = dict(data=1, fsdp=-1, tensor=4)
  c.data.train_path = "/mnt/data/dapo-math-17k.parquet"
  c.data.layout = "dapo"
  c.data.max_prompt_tokens = 1024
  c.rollout.n = 8  # K
  c.rollout.batch_queries = 64
  c.rollout.max_new_tokens = 8192
  c.rollout.slots = 256
  c.rollout.prefill_buckets = (256, 512, 1024)
  c.tapo.n_pos, c.tapo.n_neg, c.tapo.m_max = 2, 4, 4  # DCS
  c.tapo.lam = 1.0
  c.tapo.construction = "policy"  # needs the cold-start model (configs/qwen7b_coldstart.py)
  c.tapo.ref_baseline = "group"  # the paper's DAE: constructions normalized within G_ref
  c.tapo.synthesis_max_new_tokens = 9216  # a copied y- (<= 8192) + analysis and correction
  c.tapo.max_len = 10240  # prompt (1024) + the longest construction
  c.optim.lr = 1e-6
  c.optim.micro_batch = 8
  c.optim.minibatches = 4
  c.train.steps = 500
  c.train.checkpoint_every = 20
  c.train.eval_every = 50
  c.eval.paths = "/mnt/data/aime24.jsonl,/mnt/data/aime25.jsonl,/mnt/data/hmmt25.jsonl"
  c.eval.k = 16
  c.eval.max_new_tokens = 8192
  c.eval.pass_ks = (1, 16)
  return c
