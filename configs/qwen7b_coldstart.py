r"""Cold-start SFT of Qwen2.5-7B on construction-format examples before TAPO RL (stage 2 of 3).

python -m tapo_jax.main --config=configs/qwen7b_coldstart.py --workdir=gs://BUCKET/coldstart \
  --config.model.path=/mnt/models/Qwen2.5-7B --config.sft.path=/mnt/runs/cs_data/coldstart.jsonl

sft.path is what stage 1 (configs/qwen7b_coldstart_data.py, mode=coldstart) wrote; the model
lands in WORKDIR/hf, the model.path of stage 3 (configs/qwen7b.py).
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
  c.sft.path = "/mnt/runs/cs_data/coldstart.jsonl"  # ~45k rows from mode=coldstart
  c.sft.batch_size = 64
  c.sft.max_len = 8192
  c.sft.epochs = 1
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 20
  c.optim.micro_batch = 4
  c.train.checkpoint_every = 200
  return c
