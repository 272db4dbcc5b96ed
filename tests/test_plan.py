"""The memory planner: exact parameter bytes, hand-checked per-device terms, the real shardings."""

import json
import os

import cli
import jax
import pytest
import tiny
from flax import nnx

from tapo_jax import config as base
from tapo_jax import plan as plan_lib
from tapo_jax import sharding
from tapo_jax.models import Qwen, load_config
from tapo_jax.sampling import engines as engines_lib
from tapo_jax.sharding import make_mesh
from tapo_jax.toy import arith

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN25_7B_PARAMS = 7_615_616_512


def _terms(report, phase):
  return {t.name.split(" (")[0].split(",")[0]: t.bytes for t in report.phases[phase]}


@pytest.mark.parametrize("param_dtype,itemsize", [("float32", 4), ("bfloat16", 2)])
def test_qwen7b_parameter_bytes_are_the_exact_count(param_dtype, itemsize):
  cfg = base.base_config()
  cfg.plan.shape, cfg.model.param_dtype, cfg.mesh = "qwen2.5-7b", param_dtype, dict(fsdp=-1)
  one = plan_lib.plan(cfg, device="v5p", chips=1)
  assert one.num_params == QWEN25_7B_PARAMS
  assert _terms(one, "update")["params"] == QWEN25_7B_PARAMS * itemsize
  assert _terms(one, "update")["AdamW moments"] == 2 * QWEN25_7B_PARAMS * itemsize
  # v5p-32 = 16 chips, fsdp 4 x tensor 4: all but the norm scales and biases split 16 ways
  cfg.mesh = dict(data=1, fsdp=-1, tensor=4)
  sliced = _terms(plan_lib.plan(cfg, device="v5p-32"), "update")["params"]
  assert QWEN25_7B_PARAMS * itemsize / 16 < sliced < 1.001 * QWEN25_7B_PARAMS * itemsize / 16


def test_slice_names():
  cases = {
    "v5p-32": (16, 4),
    "v5e-8": (8, 1),
    "v5e-64": (64, 16),
    "v4-32": (16, 4),
    "v6e-8": (8, 1),
    "v5p-8": (4, 1),
  }
  for name, (chips, hosts) in cases.items():
    sl = plan_lib.resolve_slice(name)
    assert (sl.chips, sl.hosts) == (chips, hosts), name
  assert plan_lib.resolve_slice("h100", 16).hosts == 2
  assert plan_lib.resolve_slice("v5p").chips == 4  # one host by default
  for bad, msg in (("v5p-31", "cores per chip"), ("tpu9", "expected one of")):
    with pytest.raises(plan_lib.PlanError, match=msg):
      plan_lib.resolve_slice(bad)
  with pytest.raises(plan_lib.PlanError, match="disagrees"):
    plan_lib.resolve_slice("v5p-32", 8)


# A qwen2 model small enough to check every per-device number by hand: V=64, D=16, F=32, L=2,
# N=4, K=2, H=4, untied, float32 everywhere, on 4 chips as data 1 x fsdp 2 x tensor 2.
SMALL = tiny.hf_config("plan")


@pytest.fixture
def small_cfg(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(SMALL))
  cfg = base.base_config()
  cfg.model.path = str(tmp_path)
  cfg.model.attention_impl = "blockwise"
  cfg.mesh = dict(data=1, fsdp=2, tensor=2)
  cfg.plan.device, cfg.plan.chips = "v5p", 4
  cfg.rollout.slots, cfg.rollout.prefill_buckets, cfg.rollout.max_new_tokens = 4, (8,), 8
  cfg.rollout.batch_queries, cfg.rollout.n, cfg.tapo.m_max = 2, 2, 4
  cfg.tapo.max_len, cfg.optim.micro_batch, cfg.loss.vocab_chunk = 32, 4, 16
  return cfg


def test_small_config_per_device_numbers_by_hand(small_cfg):
  report = plan_lib.plan(small_cfg)
  assert report.num_params == 6800  # 2·64·16 + 16 + 2 · 2368 (per layer, below)
  update = _terms(report, "update")
  prefill, decode = _terms(report, "rollout prefill"), _terms(report, "rollout decode")
  # embed [64, 16] vocab/tensor, embed/fsdp: 32·8 = 256; lm_head the same 256; final norm 16;
  # per layer: 2 norms 32, q [16,4,4] 8·2·4 = 64, k and v [16,2,4] 8·1·4 = 32 each, o 64,
  # biases 8 + 4 + 4, gate/up [16,32] and down [32,16] 8·16 = 128 each -> 624.
  params = (256 + 256 + 16 + 2 * 624) * 4
  assert update["params"] == params == 7104
  assert update["AdamW moments"] == update["gradients"] == 2 * params
  # one layer in f32, split by tensor only: 32 + 128 + 64 + 64 + 128 + 16 + 3·256 = 1200
  assert update["2 layers' weights gathered over fsdp"] == 2 * 1200 * 4
  assert update["lm_head gathered over fsdp"] == 16 * 64 // 2 * 4
  # R = Q·(K + m_max) = 12 rows of 32 tokens of Rollouts (14 bytes a token) on one device, and
  # the packed minibatch: M = 3 micro-batches (12 sequences, at worst one a row) of m = 4 rows
  # (4 x 32 tokens), 2 rows a device, 39 bytes a token (the TrainBatch's 12 fields)
  assert update["rollout batch + packed minibatches"] == 12 * 32 * 14 + 3 * 2 * 32 * 39
  # b = 4 rows / (data·fsdp = 2) = 2, T = 32, n = 2, k = 1, f = 16, H = 4, e = 4, β = 32, C = 16
  a_saved = 2 * 2 * 32 * 4  # lse
  a_peak = 2 * 2 * 32 * (4 + 16) + 2 * 2 * 1 * 32 * 4 * 4 + 5 * 2 * 2 * 32 * 32 * 4
  layer = 2 * 32 * ((4 * 16 + 3 * 2 * 4 + 3 * 1 * 4 + 3 * 16) * 4 + 8 * 16) + a_saved
  layer_bwd = 2 * 32 * (2 * 16 + 2 * 16 + 2 * 2 * 4) * 4 + a_peak - a_saved
  head = 2 * 32 * (16 * 8 + 3 * 16 * 4 + 4 * 16)
  assert (layer, layer_bwd, head) == (46592, 106496, 24576)
  assert update["activations"] == 2 * layer + layer_bwd + head == 224256
  small_cfg.model.remat = True
  remat = _terms(plan_lib.plan(small_cfg), "update")["activations"]
  assert remat == 2 * 2 * 32 * 16 * 4 + layer + layer_bwd + head == 185856
  # The decode layout: 4 chips as data 2 x tensor 2 (2 kv heads, one host), weights in bf16 over
  # tensor, replicated over data: embed and lm_head 32·16 each, norm 16, a layer 1200 (as above)
  weights = (2 * 512 + 16 + 2 * 1200) * 2
  assert _terms(report, "weight sync") == {
    "params": params, "AdamW moments": 2 * params, "sampler weights": weights,
    "weight sync temporaries": weights,
  }  # fmt: skip
  assert update["sampler weights"] == prefill["sampler weights"] == decode["sampler weights"]
  assert _terms(report, "logprobs")["sampler weights"] == weights == 6880
  # KV: 2 (k, v) · L · (4 slots / data 2) · (2 kv-heads / tensor 2) · (S = 8 + 8) · H · 4 bytes
  assert prefill["KV cache"] == decode["KV cache"] == 2 * 2 * 2 * 1 * 16 * 4 * 4 == 2048
  assert prefill["decode rows"] == decode["decode rows"] == 8 * 2 * 16
  assert "decode window in the loop's layout" not in decode  # no window below S = 16
  assert decode["weights in the compute dtype"] == weights * 4 // 2  # bf16 copy, f32 compute
  assert decode["decode step logits"] == 2 * 64 // 2 * 4
  # prefill: 16 prompts of 8 (8 per replica): their KV, one layer (f 16, n 2, k 1), the
  # blockwise score block of 8 x 8
  kv = 2 * 2 * 4 * 8 * 1 * 8 * 4
  acts = 8 * 8 * (2 * 16 + 2 * 16 + 2 * 4 + 2 * 1 * 4) * 4 + 8 * 2 * 8 * 8 * 4
  assert prefill["prefill of 16 x 8 tokens"] == kv + acts == 28672
  assert "logprobs" in report.phases  # the pi_old pass runs every step, a micro-batch at a time
  assert report.fits


def test_opsd_counts_the_teacher_forward_by_hand(small_cfg):
  """algorithm=opsd: the update holds the teacher's forward (m = 4 rows of U = 64, 2 a device)
  and its side of the divergence scan; the batch its rows and slots; no π_old without GRPO."""
  tapo_update = _terms(plan_lib.plan(small_cfg), "update")
  small_cfg.algorithm, small_cfg.opsd.max_len = "opsd", 64
  report = plan_lib.plan(small_cfg)
  update = _terms(report, "update")
  # b = 2, U = 64, D = 16, n = 2, k = 1, f = 16, H = 4, e = 4, blockwise with β = min(512, 64)
  a_peak = 2 * 2 * 64 * (4 + 16) + 2 * 2 * 1 * 64 * 4 * 4 + 5 * 2 * 2 * 64 * 64 * 4
  layer = 2 * 64 * ((3 * 16 + 2 * 2 * 4 + 2 * 1 * 4 + 3 * 16) * 4 + 4 * 16) + a_peak
  # ... beyond the student's activations (224256, test_small_config_per_device_numbers_by_hand)
  assert update["OPSD teacher forward"] == 2 * 64 * 16 * 4 + layer - 224256 == 190464
  assert update["OPSD teacher side of the divergence scan"] == 2 * 32 * (16 * 4 + 2 * 16 * 4)
  # R = Q·K = 4 sequences: M = 1 micro-batch of 4 rows; + teacher rows 12 bytes a token and the
  # T = 32 distilled slots of a row, 17 bytes each
  batch = 4 * 32 * 14 + 2 * 32 * 39 + 2 * (64 * 12 + 32 * 17)
  assert update["rollout batch + packed minibatches"] == batch == 6912
  assert update["activations"] == tapo_update["activations"]  # the student's: the same rows
  assert "logprobs" not in report.phases  # pure distillation reads no π_old
  small_cfg.opsd.grpo_coef = 0.5
  assert "logprobs" in plan_lib.plan(small_cfg).phases


def test_params_and_kv_cache_match_the_real_shardings():
  """The planner's per-device bytes equal the shards the train state and the engine really hold
  on 8 devices (toy model, trainer data 2 x fsdp 2 x tensor 2; the engine's decode layout data 4
  x tensor 2: its 2 kv-heads split over tensor, 6 slots not over data 4), weights in bf16 and
  f32."""
  cfg = base.base_config()
  cfg.model.toy, cfg.mesh = "arith", dict(data=2, fsdp=2, tensor=2)
  cfg.plan.device, cfg.plan.chips = "v5p", 8
  cfg.rollout.slots, cfg.rollout.prefill_buckets, cfg.rollout.max_new_tokens = 6, (16, 32), 32
  mesh = make_mesh(dict(cfg.mesh))
  model = Qwen(load_config(arith.CHECKPOINT_DIR), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  shard_bytes = lambda xs: sum(x.addressable_shards[0].data.nbytes for x in xs)  # noqa: E731
  for weight_dtype in ("bfloat16", "float32"):
    cfg.rollout.weight_dtype = weight_dtype
    report = plan_lib.plan(cfg)
    decode = _terms(report, "rollout decode")
    assert _terms(report, "update")["params"] == shard_bytes(jax.tree.leaves(params))
    engine = engines_lib.rollout_engine(cfg, model, mesh)
    copy = jax.tree.leaves(engine.load_params(params))
    assert decode["sampler weights"] == shard_bytes(copy)
    state = engine.init_decode_state()
    kv = shard_bytes(state.cache.k + state.cache.v)
    assert decode["KV cache"] == kv == engine.cache_bytes // 2  # 2 ways on kv-heads only
    assert decode["decode rows"] == shard_bytes((state.tokens, state.logprobs))
    assert engine.windows == plan_lib.decode_windows(16, 64)


def test_memory_efficient_attention_removes_the_quadratic_term():
  cfg = base.base_config()
  cfg.plan.shape, cfg.mesh, cfg.model.dtype = "qwen2.5-7b", dict(fsdp=-1, tensor=4), "bfloat16"
  cfg.model.remat = True

  def acts(impl, t):
    cfg.model.attention_impl, cfg.tapo.max_len = impl, t
    return _terms(plan_lib.plan(cfg, device="v5p-32"), "update")["activations"]

  assert acts("", 8192) / acts("", 4096) > 3  # the T² scores dominate
  assert acts("splash", 8192) / acts("splash", 4096) == pytest.approx(2.0, rel=1e-6)
  assert acts("blockwise", 8192) / acts("blockwise", 4096) < 2.1
  assert acts("", 8192) > 4 * acts("splash", 8192)


def test_bad_plans_are_one_line_errors(small_cfg, capsys):
  small_cfg.model.path = "/nonexistent/Qwen2.5-7B"
  assert plan_lib.run(small_cfg) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: config.model.path='/nonexistent/")
  assert err.strip().endswith("set --config.plan.shape to one of " + str(sorted(plan_lib.SHAPES)))
  small_cfg.plan.shape, small_cfg.model.attention_impl = "qwen2.5-7b", "cudnn"
  assert plan_lib.run(small_cfg) == 2
  assert "attention_impl=cudnn needs an NVIDIA GPU" in capsys.readouterr().err
  small_cfg.model.attention_impl, small_cfg.plan.chips = "", 3
  assert plan_lib.run(small_cfg) == 2
  assert capsys.readouterr().err.count("\n") == 1  # mesh 1 x 2 x 2 != 3 chips, one line


def _main(config, *args):
  """The CLI's plan mode, in this process (it only computes shapes)."""
  return cli.main_in_process(config, "--config.mode=plan", *args)


def test_cli_qwen7b_on_v5e_64_does_not_fit_and_says_what_to_change():
  """As shipped it fits (a micro-batch of 8 rows is rounded up to one row per device, 16); with
  micro-batches of 64 rows (4 a device) the update does not."""
  out = _main(
    "--config=configs/qwen7b.py", "--config.plan.shape=qwen2.5-7b", "--config.plan.device=v5e-64",
    "--config.optim.micro_batch_tokens=655360",
  )  # fmt: skip
  assert out.returncode == 2, out.stderr
  assert "mesh    data=1 fsdp=16 tensor=4" in out.stdout and "DOES NOT FIT" in out.stdout
  err = out.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: does not fit: ") and "optim." in err[0]


def test_cli_tiny_fits():
  out = _main("--config=configs/smoke.py", "--config.plan.device=v5e-8")
  assert out.returncode == 0, out.stderr
  assert "toy arith checkpoint: " in out.stdout and out.stdout.rstrip().endswith(": fits")


def test_cli_validates_the_config_before_planning():
  """Issue 24.5: mode=plan ran before validation (plan.chips=-4 printed negative GiB and fits)."""
  out = _main("--config=configs/smoke.py", "--config.plan.chips=-4")
  assert out.returncode == 2, out.stdout
  err = out.stderr.strip().splitlines()
  assert err == ["error: config.plan.chips=-4: must be an integer >= 0 (0: from the name)"], err
  assert "GiB" not in out.stdout


def test_qwen7b_numbers_documented_in_docs():
  """docs/plan.md quotes the planner's peaks for configs/qwen7b.py: keep them current."""
  text = open(os.path.join(REPO, "docs", "plan.md")).read()
  cfg = cli.config("qwen7b")
  cfg.plan.shape = "qwen2.5-7b"
  for device in ("v5p-32", "v5e-64"):
    report = plan_lib.plan(cfg, device=device)
    assert f"peak    {report.peak_phase}: {report.peak / plan_lib.GiB:.2f} GiB" in text, device


def test_qwen3_8b_in_bfloat16_on_8_gpus():
  cfg = base.base_config()
  cfg.plan.shape, cfg.model.param_dtype, cfg.model.dtype = "qwen3-8b", "bfloat16", "bfloat16"
  report = plan_lib.plan(cfg, device="h200", chips=8)
  assert report.num_params == 8_190_735_360
  params = _terms(report, "update")["params"]
  assert 8_190_735_360 * 2 / 8 < params < 1.001 * 8_190_735_360 * 2 / 8  # fsdp 8
