r"""Cold-start SFT of Qwen2.5-7B on construction-format examples before TAPO RL.

python -m tapo_jax.main --config=configs/qwen7b_coldstart.py --workdir=gs://BUCKET/coldstart \
  --config.model.path=/mnt/models/Qwen2.5-7B --config.sft.path=/mnt/data/coldstart.jsonl
"""

from tapo_jax import config as base


def get_config():
  c = base.base_config()
  c.mode = "sft"
  c.model.path = "/mnt/models/Qwen2.5-7B"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.model.attention_impl = "splash"  # Pallas kernel on TPU; [B, heads, T, T] scores do not fit
  c.mesh = dict(data=1, fsdp=-1, tensor=4)
  c.sft.path = "/mnt/data/coldstart.jsonl"  # ~45k {prompt, response} or {messages} rows
  c.sft.batch_size = 64
  c.sft.max_len = 8192
  c.sft.epochs = 1
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 20
  c.optim.micro_batch = 4
  c.train.checkpoint_every = 200
  return c
