"""bench aot: the HLO collective counts on hand-written modules, and deviceless TPU compiles of a
small model (skipped where libtpu is not installed)."""

import json
import os
import subprocess
import sys

import pytest
import tiny

from tapo_jax import config as base
from tapo_jax import plan as plan_lib
from tapo_jax.bench import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def no_persistent_compilation_cache():
  """TPU programs compiled here have no TPU client to load them back from the run's shared
  persistent cache (JAX warns 'PjRtCompiler must be constructed with a Client' and compiles
  again): this module compiles without it."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  jax.config.update("jax_enable_compilation_cache", False)
  cc.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  cc.reset_cache()


# A decode-like module: an all-gather before the loop; in the loop body an async all-gather
# (start/done), an all-reduce over 4 of 8 devices, a called computation with a reduce-scatter
# and an async-wrapped all-to-all; the condition's all-reduce; a collective-permute after it.
HLO = """\
HloModule jit_generate, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%inner (p: f32[64,128]) -> f32[16,128] {
  %p = f32[64,128]{1,0:T(8,128)} parameter(0)
  ROOT %reduce-scatter.1 = f32[16,128]{1,0} reduce-scatter(%p), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}

%wrapped_all_to_all (a: bf16[8,256]) -> bf16[8,256] {
  %a = bf16[8,256]{1,0} parameter(0)
  ROOT %all-to-all.1 = bf16[8,256]{1,0} all-to-all(%a), channel_id=5, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
}

%body (param: (s32[], bf16[128,512], f32[64,128])) -> (s32[], bf16[128,512], f32[64,128]) {
  %param = (s32[], bf16[128,512]{1,0}, f32[64,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %w = bf16[128,512]{1,0:T(8,128)(2,1)} get-tuple-element(%param), index=1
  %h = f32[64,128]{1,0} get-tuple-element(%param), index=2
  %all-gather-start.1 = (bf16[128,512]{1,0}, bf16[1024,512]{1,0}) all-gather-start(%w), channel_id=1, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}, metadata={op_name="jit(f)/while/body/calls=%nothing"}
  %all-gather-done.1 = bf16[1024,512]{1,0} all-gather-done(%all-gather-start.1)
  %all-reduce.2 = f32[64,128]{1,0} all-reduce(%h), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %call.1 = f32[16,128]{1,0} call(%all-reduce.2), to_apply=%inner
  %b = bf16[8,256]{1,0} get-tuple-element(%param), index=3
  %async-start.1 = ((bf16[8,256]{1,0}), bf16[8,256]{1,0}, u32[]) async-start(%b), calls=%wrapped_all_to_all
  %async-done.1 = bf16[8,256]{1,0} async-done(%async-start.1), calls=%wrapped_all_to_all
  ROOT %tuple.1 = (s32[], bf16[128,512], f32[64,128]) tuple(%i, %w, %h)
}

%cond (param.1: (s32[], bf16[128,512], f32[64,128])) -> pred[] {
  %param.1 = (s32[], bf16[128,512]{1,0}, f32[64,128]{1,0}) parameter(0)
  %flag = pred[] constant(true)
  ROOT %all-reduce.3 = pred[] all-reduce(%flag), channel_id=4, replica_groups={}, to_apply=%add
}

ENTRY %main (w0: bf16[128,512], h0: f32[64,128]) -> f32[64,128] {
  %w0 = bf16[128,512]{1,0} parameter(0)
  %h0 = f32[64,128]{1,0} parameter(1)
  %all-gather.9 = bf16[1024,512]{1,0} all-gather(%w0), channel_id=6, replica_groups=[1,8]<=[8], dimensions={0}
  %zero = s32[] constant(0)
  %tuple.0 = (s32[], bf16[128,512], f32[64,128]) tuple(%zero, %w0, %h0)
  %while.1 = (s32[], bf16[128,512], f32[64,128]) while(%tuple.0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"16"}}
  %out = f32[64,128]{1,0} get-tuple-element(%while.1), index=2
  ROOT %collective-permute-start.1 = (f32[64,128]{1,0}, f32[64,128]{1,0}, u32[], u32[]) collective-permute-start(%out), channel_id=7, source_target_pairs={{0,1},{1,0}}
}
"""  # noqa: E501

KB = 1024
GATHER = 1024 * 512 * 2  # the gathered bf16[1024, 512]
SHARD = 128 * 512 * 2


def test_collectives_in_the_loop_are_the_body_condition_and_what_they_call():
  got = aot.collectives(HLO, in_loop=True)
  assert set(got) == {"all-gather", "all-reduce", "reduce-scatter", "all-to-all"}
  ag = got["all-gather"]  # the async pair counts once; received = result - operand
  assert (ag.count, ag.bytes, ag.received) == (1, GATHER, GATHER - SHARD)
  ar = got["all-reduce"]  # body: f32[64,128] over 4 devices; condition: one pred over all 8
  assert ar.count == 2
  assert ar.bytes == 64 * 128 * 4 + 1
  assert ar.received == int(2 * 3 / 4 * 64 * 128 * 4) + int(2 * 7 / 8 * 1)
  rs = got["reduce-scatter"]  # operand - result
  assert (rs.count, rs.bytes, rs.received) == (1, 16 * 128 * 4, 48 * 128 * 4)
  a2a = got["all-to-all"]  # groups of 2: half of the operand leaves
  assert (a2a.count, a2a.received) == (1, 8 * 256 * 2 // 2)


def test_whole_program_adds_what_is_outside_the_loop():
  got = aot.collectives(HLO, in_loop=False)
  assert got["all-gather"].count == 2  # the one before the loop too
  assert got["all-gather"].received == 2 * (GATHER - SHARD)
  cp = got["collective-permute"]  # async start: the result is the tuple's second element
  assert (cp.count, cp.bytes, cp.received) == (1, 64 * 128 * 4, 64 * 128 * 4)


def test_a_module_without_loops_has_nothing_in_a_loop():
  text = HLO.replace("while(%tuple.0), condition=%cond, body=%body", "tuple(%tuple.0)")
  assert aot.collectives(text, in_loop=True) == {}
  assert aot.collectives(text, in_loop=False)["all-gather"].count == 1


def test_types_and_groups():
  assert aot.type_bytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, /*index=1*/f32[4], pred[], s4[8])") == 33
  assert aot.tuple_elements("((f32[2], f32[3]), bf16[4]{0}, u32[])") == [
    "(f32[2], f32[3])", "bf16[4]{0}", "u32[]",
  ]  # fmt: skip
  group = aot.group_size
  assert group("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=4] {'axis_0','axis_2'}", 16) == 8
  assert group("replica_groups=[4,4]<=[16]", 16) == 4
  assert group("replica_groups=[2,8]<=[4,4]T(1,0)", 16) == 8
  assert group("replica_groups={{0,2},{1,3}}", 4) == 2
  assert group("replica_groups={}", 16) == 16


def test_topology_names():
  assert aot.parse_topology("v5p:2x2x4") == ("v5p", 16)
  assert aot.parse_topology("v5e:8x8") == ("v5e", 64)
  with pytest.raises(ValueError, match="expected e.g. v5p:2x2x4"):
    aot.parse_topology("v5p-32")


# ---- deviceless compiles ------------------------------------------------------------------------

needs_libtpu = pytest.mark.skipif(
  bool(aot.libtpu_missing()), reason=f"deviceless TPU compiles: {aot.libtpu_missing()}"
)

# A 4-layer model whose dims are whole TPU tiles (so the compiled sizes carry no layout padding):
# D 256, 4 q-heads and 2 kv-heads of 128, F 1024, V 8192.
SMALL = tiny.hf_config("tpu")


def small_config(path, **mesh):
  (path / "config.json").write_text(json.dumps(SMALL))
  cfg = base.base_config()
  cfg.model.path = str(path)
  cfg.model.dtype, cfg.model.param_dtype = "bfloat16", "float32"
  cfg.model.attention_impl = "blockwise"
  cfg.mesh = mesh or dict(data=1, fsdp=8, tensor=1)
  cfg.rollout.slots, cfg.rollout.prefill_buckets = 64, (128, 256)
  cfg.rollout.max_new_tokens, cfg.rollout.n, cfg.rollout.batch_queries = 768, 8, 8
  cfg.tapo.construction, cfg.tapo.ref_baseline = "policy", "group"
  cfg.tapo.max_len, cfg.tapo.synthesis_max_new_tokens = 1024, 1024
  cfg.data.max_prompt_tokens = 256
  cfg.train.eval_every, cfg.eval.max_new_tokens = 10, 512  # a third engine
  cfg.optim.micro_batch, cfg.loss.vocab_chunk = 8, 2048
  return cfg


def _engine_programs(tmp_path_factory, **rollout):
  cfg = small_config(tmp_path_factory.mktemp("small"))
  for key, value in rollout.items():
    cfg.rollout[key] = value
  if rollout:
    cfg.train.eval_every = 0  # the planner does not plan the eval engine
  s = aot.setup(cfg, "v5p:2x2x2")
  with aot.tpu_kernels():
    return s, {**aot.sync_programs(s), **aot.engine_programs(s)}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
  """The small config's weight sync and engines on a v5p:2x2x2 (8 chips), trainer mesh fsdp=8;
  the engines decode as data 4 x tensor 2 (one kv head per chip)."""
  return _engine_programs(tmp_path_factory)


@pytest.fixture(scope="module")
def two_heads_run(tmp_path_factory):
  """The same with rollout.decode_tensor=1: both kv heads on every chip."""
  return _engine_programs(tmp_path_factory, decode_tensor=1)


@needs_libtpu
def test_decode_loops_hold_no_weight_all_gather(fsdp_run):
  """Every engine the RL loop builds decodes without gathering weights inside its loop: the
  all-gathers of one decode step move < 1% of the engine's weight bytes (the trainer's FSDP
  layout gathered 31 per step, as many bytes as the weights)."""
  s, progs = fsdp_run
  decodes = [p for p in progs.values() if p.loop]
  assert {p.engine for p in decodes} == set(s.engines.unique()) == {"rollout", "synthesis", "eval"}
  for p in decodes:
    weights = aot.device_bytes(aot.engine_params(s, s.engines.unique()[p.engine]))
    gathered = p.collectives.get("all-gather", aot.Collective("all-gather", 0, 0, 0)).bytes
    assert gathered < 0.01 * weights, (p.name, aot.human(gathered), aot.human(weights))


@needs_libtpu
@pytest.mark.parametrize("run", ["fsdp_run", "two_heads_run"])
def test_planner_within_15_percent_of_the_compiled_sampler_phases(run, request):
  """tapo_jax.plan's weight sync, prefill and decode phases (the decode copy of the weights, the
  KV cache, the window copies, a prefill) against the TPU compiler's buffers plus the arrays that
  live beside each program; a phase compiles to several programs (windows): the largest."""
  s, progs = request.getfixturevalue(run)
  report = plan_lib.plan(s.cfg, device="v5p", chips=8)
  compiled = {}
  for p in progs.values():
    assert not p.error, (p.name, p.error)
    compiled[p.phase] = max(compiled.get(p.phase, 0), p.total)
  phases = {"weight sync", "rollout prefill", "rollout decode", "synthesis prefill",
            "synthesis decode"}  # fmt: skip
  assert phases <= set(compiled) and phases <= set(report.phases)
  ratios = {phase: report.total(phase) / compiled[phase] for phase in phases}
  assert all(0.85 <= r <= 1.15 for r in ratios.values()), ratios


@needs_libtpu
def test_opsd_update_compiles_and_the_planner_counts_its_teacher(tmp_path):
  """algorithm=opsd: the update of an OpsdBatch minibatch (8 student rows of 1024 tokens, each
  with a teacher row of U = 4096) compiles for v5p:2x2x2, π_old is not built without the GRPO
  term, and the planner's update phase is within 10% of the compiler's (measured 0.98; the
  teacher's whole forward planned on top of the student's activations would be 1.45)."""
  cfg = small_config(tmp_path)
  cfg.algorithm, cfg.opsd.max_len, cfg.tapo.construction = "opsd", 4096, "divergence"
  cfg.rollout.batch_queries, cfg.train.eval_every = 2, 0
  s = aot.setup(cfg, "v5p:2x2x2")
  with aot.tpu_kernels():
    progs = aot.trainer_programs(s)
  (update,) = progs.values()
  assert update.name == "update 2x8x1024" and not update.error, update.error
  report = plan_lib.plan(cfg, device="v5p", chips=8)
  assert "OPSD teacher side of the divergence scan" in {t.name for t in report.phases["update"]}
  assert 0.9 <= report.total("update") / update.total <= 1.1, (report.total("update"), update.total)


@needs_libtpu
@pytest.mark.slow
def test_cli_prints_collectives_memory_and_the_decode_step_bound():
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "tapo_jax.bench", "aot", "--config=configs/smoke.py",
         "--topology=v5p:2x2x2"]  # fmt: skip
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "topology v5p:2x2x2: 8 chips" in text and "decode layout data=4 x tensor=2" in text
  for program in ("weight sync", "rollout prefill 16x64", "rollout decode window 112 /step",
                  "pi_old 3x16x160", "update 3x16x160"):  # fmt: skip
    assert f"\n  {program}" in text, program
  assert "error" not in text
  bounds = text[text.index("decode step lower bound") :].splitlines()[2:]
  assert [line.split()[:2] for line in bounds] == [["rollout", "32"], ["rollout", "64"],
                                                    ["rollout", "112"]]  # fmt: skip


def test_without_libtpu_the_cli_says_what_to_install(monkeypatch, capsys):
  monkeypatch.setattr(aot, "libtpu_missing", lambda: "libtpu is not installed: pip install x")
  assert aot.main(["--config=configs/smoke.py"]) == 2
  assert capsys.readouterr().err == "error: libtpu is not installed: pip install x\n"
