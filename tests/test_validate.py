"""Every config check that runs before any work (tapo_jax.validate, what main() calls first),
in-process: each bad value is refused with one line naming its key, and the shipped configs pass."""

import math
import os
import re

import cli
import pytest

from tapo_jax import toy
from tapo_jax import validate as validate_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_config = cli.config


def _refused(cfg, devices=8) -> str:
  with pytest.raises(validate_lib.ConfigError) as e:
    validate_lib.validate(cfg, devices)
  line = str(e.value)
  assert "\n" not in line
  return line


@pytest.mark.parametrize("config", ["smoke", "tiny"])
def test_shipped_configs_pass(config):
  validate_lib.validate(_config(config), 8)
  validate_lib.validate(_config(config), 1)


# Issue 24.5: each of these failed mid-run (a traceback, a workdir left behind) or was silently
# accepted (async_steps=5 ran as 1, a negative or NaN max_update_ratio turned the guard off).
LATE = [
  ({"rollout.top_k": -1}, "config.rollout.top_k=-1: must be an integer >= 0"),
  ({"loss.vocab_chunk": 0}, "config.loss.vocab_chunk=0: must be an integer >= 1"),
  ({"sft.batch_size": 0}, "config.sft.batch_size=0: must be an integer >= 1"),
  ({"sft.max_len": 0}, "config.sft.max_len=0: must be an integer >= 1"),
  ({"eval.max_new_tokens": 0}, "config.eval.max_new_tokens=0: must be an integer >= 1"),
  ({"eval.toy_problems": 0}, "config.eval.toy_problems=0: must be an integer >= 1"),
  ({"rollout.async_steps": 5}, "config.rollout.async_steps=5: expected 0"),
  ({"rollout.async_steps": -1}, "config.rollout.async_steps=-1: expected 0"),
  ({"optim.max_update_ratio": -1.0}, "config.optim.max_update_ratio=-1.0: must be a finite"),
  ({"optim.max_update_ratio": math.nan}, "config.optim.max_update_ratio=nan: must be a finite"),
  ({"rollout.n": 100000}, "config.rollout.n=100000: more than 1024 samples per query"),
  ({"rollout.n": 1024, "rollout.batch_queries": 128}, "1024 x 128 = 131072: more than 65536"),
  ({"rollout.sampler_devices": 8}, "config.rollout.sampler_devices=8: must be an integer in [0, 7"),
  ({"rollout.sampler_devices": -1}, "config.rollout.sampler_devices=-1: must be an integer in"),
  (
    {"rollout.sampler_devices": 2, "mesh.fsdp": 4},
    "mesh: product of {'data': 1, 'fsdp': 4, 'tensor': 1} is 4, but there are 6 devices (the 6",
  ),
  (
    {"rollout.sampler_devices": 2, "rollout.decode_tensor": 4},
    "config.rollout.decode_tensor=4: does not divide the samplers' 2 devices",
  ),
]


@pytest.mark.parametrize("overrides,message", LATE, ids=[m[:50] for _, m in LATE])
def test_values_that_failed_late_are_refused_up_front(overrides, message):
  assert message in _refused(_config(**overrides))


def test_sampler_devices_leave_the_trainer_its_mesh():
  validate_lib.validate(_config(**{"rollout.sampler_devices": 2}), 8)  # 2 sample, 6 train
  validate_lib.validate(_config(**{"rollout.sampler_devices": 4, "mesh.fsdp": 4}), 8)


def test_teacher_timeout_must_be_finite():
  cfg = _config(mode="coldstart", **{"coldstart.teacher_timeout_s": math.nan})
  assert "config.coldstart.teacher_timeout_s=nan: must be a finite number > 0" in _refused(cfg)
  cfg.coldstart.teacher_timeout_s = math.inf
  assert "teacher_timeout_s=inf" in _refused(cfg)


def test_periodic_eval_of_a_model_path_needs_eval_paths(tmp_path):
  """configs/tiny.py evaluates at the start and every 20 steps; with a model.path and no
  eval.paths the run trained and then failed at its first eval (`no toy domain ''`)."""
  train = tmp_path / "train.jsonl"
  train.write_text('{"problem": "1+1", "answer": "2"}\n')
  cfg = _config("tiny", **{"model.path": str(toy.checkpoint_dir("chain")), "model.toy": ""})
  cfg.data.train_path = str(train)
  assert "config.eval.paths is empty with train.eval_every=20, eval_at_start=True" in _refused(cfg)
  cfg.mode = "eval"
  assert "config.eval.paths is empty with mode=eval" in _refused(cfg)
  cfg.mode, cfg.train.eval_every, cfg.train.eval_at_start = "rl", 0, False
  validate_lib.validate(cfg, 8)  # no eval: nothing to evaluate on
  cfg.train.eval_every, cfg.eval.paths = 20, str(train)
  validate_lib.validate(cfg, 8)


# mode=plan used to run before any validation.
PLAN = [
  ({"plan.chips": -4}, "config.plan.chips=-4: must be an integer >= 0"),
  ({"rollout.n": 0}, "config.rollout.n=0: GRPO/TAPO need K >= 2"),
  ({"plan.device": "v5p-0"}, "config.plan.device='v5p-0': a slice of 0 chips"),
  ({"plan.device": "tpu9"}, "config.plan.device='tpu9': expected one of"),
  ({"optim.micro_batch": 0}, "config.optim.micro_batch=0: must be an integer >= 1"),
  ({"plan.usable": 0.0}, "config.plan.usable=0.0: must be a fraction of HBM in (0, 1]"),
  ({"plan.usable": math.nan}, "config.plan.usable=nan"),
  ({"plan.usable": 5.0}, "config.plan.usable=5.0"),
  ({"plan.mode": "eval"}, "config.plan.mode='eval': expected rl or sft"),
  ({"plan.device": "v5p-8", "mesh.tensor": 3}, "(planning for 4 chips of v5p)"),
  ({"plan.mode": "sft", "sft.batch_size": 0}, "config.sft.batch_size=0"),
]


@pytest.mark.parametrize("overrides,message", PLAN, ids=[m[:50] for _, m in PLAN])
def test_plan_configs_are_validated(overrides, message):
  assert message in _refused(_config(mode="plan", **overrides), devices=0)


def test_plan_of_the_shipped_configs_passes():
  validate_lib.validate(_config(mode="plan"), 0)
  cfg = _config("qwen7b", mode="plan")
  cfg.plan.shape = "qwen2.5-7b"
  validate_lib.validate(cfg, 0)  # model.path names a directory of the target machine: not read


# Issue 24.7: prompt plus generation beyond the model's positions was accepted silently (RoPE
# extrapolates); the arith toy has 256 positions, the chain toy 768.
POSITIONS = [
  (
    {"rollout.prefill_buckets": (64, 128), "rollout.max_new_tokens": 150, "tapo.max_len": 256},
    "config: max(rollout.prefill_buckets) + rollout.max_new_tokens = 128 + 150 = 278 positions",
  ),
  ({"tapo.max_len": 300}, "config: tapo.max_len = 300 positions > the model's max_position_emb"),
  ({"train.eval_every": 10, "eval.max_new_tokens": 193}, "eval.max_new_tokens = 64 + 193 = 257"),
  ({"mode": "eval", "eval.max_new_tokens": 193}, "eval.max_new_tokens = 64 + 193 = 257"),
  ({"tapo.construction": "policy", "tapo.ref_baseline": "group"}, "192 + 1072 = 1264 positions"),
]


@pytest.mark.parametrize("overrides,message", POSITIONS, ids=[m[:40] for _, m in POSITIONS])
def test_sequences_beyond_the_model_positions_are_refused(overrides, message):
  line = _refused(_config(**overrides))
  assert message in line and "toy/arith/config.json" in line


def test_sft_rows_beyond_the_model_positions_are_refused(tmp_path):
  data = tmp_path / "sft.jsonl"
  data.write_text('{"prompt": "1+1", "response": "2"}\n')
  cfg = _config(mode="sft", **{"sft.path": str(data)})
  assert "config: sft.max_len = 2048 positions > the model's max_position_embeddings=256" in (
    _refused(cfg)
  )
  cfg.sft.max_len = 256
  validate_lib.validate(cfg, 8)


DISTRIBUTED = [
  ({"distributed_timeout_s": 0.0}, "config.distributed_timeout_s=0.0: must be a finite number"),
  ({"distributed_timeout_s": math.inf}, "config.distributed_timeout_s=inf"),
  ({"distributed_heartbeat_s": -1}, "config.distributed_heartbeat_s=-1"),
  ({"distributed_num_processes": 2, "distributed_process_id": 2}, "expected 0 <= id < processes"),
  ({"distributed_num_processes": 0}, "distributed_num_processes=0: expected"),
  ({"distributed_coordinator": "localhost"}, "config.distributed_coordinator='localhost': expect"),
]


@pytest.mark.parametrize("overrides,message", DISTRIBUTED, ids=[m[:40] for _, m in DISTRIBUTED])
def test_distributed_keys_are_checked_before_joining(overrides, message):
  """Issue 24.6: the start-up bound (distributed_timeout_s) and the coordinates, before
  jax.distributed.initialize uses them."""
  with pytest.raises(validate_lib.ConfigError, match=re.escape(message)):
    validate_lib.validate_distributed(_config(distributed=True, **overrides))
  validate_lib.validate_distributed(
    _config(distributed_coordinator="10.0.0.1:1234", distributed_num_processes=2)
  )
