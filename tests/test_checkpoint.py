"""Checkpoints: real corrupted step directories fall back or fail in one line; the checksum sees
every flipped bit; params-only restore; a save killed in a real subprocess; the signal guard.
(Ctrl-C through the whole CLI: tests/test_cli.py.)"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import cli
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo_jax import config as base
from tapo_jax import sharding
from tapo_jax.models import CheckpointError
from tapo_jax.train import checkpoint
from tapo_jax.train import state as state_lib
from tapo_jax.train.iterator import BatchIterator

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_state(seed=0, grad_clip=1.0):
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  model = tiny.model("tiny", seed=seed)
  optim = base.base_config().optim
  optim.grad_clip = grad_clip
  return state_lib.create(model, mesh, state_lib.make_optimizer(optim, 10))


@pytest.fixture(scope="module")
def trained():
  """(state, sharding): a state whose params differ from init (one step's worth of change)."""
  _, state, ssh = make_state()
  params = jax.tree.map(lambda x: x + 0.01, state.params)
  return state.replace(params=params, step=jnp.asarray(1, jnp.int32)), ssh


def save_steps(workdir, state, steps=(1, 2)):
  ck = checkpoint.Checkpointer(workdir, 1, 10)
  for s in steps:
    ck.save(s, state.replace(step=jnp.asarray(s, jnp.int32)), {"data": {"pos": s}}, force=True)
  ck.close()
  return pathlib.Path(workdir, "checkpoints")


def biggest_data_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def truncate(step_dir):
  f = biggest_data_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bit(step_dir):
  f = biggest_data_file(step_dir)
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0x04
  f.write_bytes(bytes(b))


def break_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("{not json")


def break_extra(step_dir):
  (step_dir / "extra" / "metadata").write_text("{not json")


def remove_state(step_dir):
  shutil.rmtree(step_dir / "state")


def _edit_extra(step_dir, edit):
  path = step_dir / "extra" / "metadata"
  path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def empty_extra(step_dir):  # issue 24.7: was KeyError 'data', no fallback
  _edit_extra(step_dir, lambda extra: {})


def drop_checksum(step_dir):  # issue 24.7: loaded without its integrity check
  _edit_extra(step_dir, lambda extra: {k: v for k, v in extra.items() if k != "checksum"})


CORRUPTIONS = [truncate, flip_bit, break_metadata, break_extra, remove_state, empty_extra]
CORRUPTIONS += [drop_checksum]


def resume(workdir, state, ssh, warnings):
  ck = checkpoint.Checkpointer(workdir, 1, 10, warn=warnings.append)
  try:
    return ck.restore_newest(ssh, state)
  finally:
    ck.close()


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__ for c in CORRUPTIONS])
def test_broken_newest_falls_back_to_the_previous_step(tmp_path, trained, corrupt):
  state, ssh = trained
  ckpts = save_steps(tmp_path, state)
  corrupt(ckpts / "2")
  warnings = []
  step, restored, extra = resume(tmp_path, state, ssh, warnings)
  assert step == 1 and extra["data"] == {"pos": 1}
  assert len(warnings) == 1 and "checkpoint step 2 does not restore" in warnings[0]
  assert "\n" not in warnings[0]
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The broken step is kept aside, out of Orbax's sight: the next save of step 2 works.
  assert sorted(os.listdir(ckpts)) == ["1", "2.broken"]
  save_steps(tmp_path, state, steps=(2,))
  assert resume(tmp_path, state, ssh, [])[0] == 2


def test_no_intact_checkpoint_is_one_error_naming_the_directory(tmp_path, trained):
  state, ssh = trained
  ckpts = save_steps(tmp_path, state, steps=(1,))
  truncate(ckpts / "1")
  with pytest.raises(CheckpointError) as e:
    resume(tmp_path, state, ssh, [])
  msg = str(e.value)
  assert "\n" not in msg and f"remove {ckpts / '1'} to start over" in msg
  assert sorted(os.listdir(ckpts)) == ["1"]  # nothing renamed when nothing restores


def test_non_finite_params_are_never_saved(tmp_path, trained):
  state, _ = trained
  save_steps(tmp_path, state, steps=(1,))
  poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  with pytest.raises(CheckpointError, match=r"step 2: non-finite values in params.*step 1"):
    save_steps(tmp_path, poisoned, steps=(2,))
  assert checkpoint.steps(tmp_path) == [1]


def test_non_finite_params_on_disk_are_a_broken_checkpoint(tmp_path, trained):
  state, ssh = trained
  save_steps(tmp_path, state, steps=(1,))
  # Written without our checks (an older version, or another tool): restore still refuses it.
  poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  ck = checkpoint.Checkpointer(tmp_path, 1, 10)
  ck.manager.save(
    2,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(poisoned), extra=ocp.args.JsonSave({"data": {"pos": 2}})
    ),
  )
  ck.close()
  warnings = []
  assert resume(tmp_path, state, ssh, warnings)[0] == 1
  assert "non-finite values in params" in warnings[0]


def test_another_optimizer_is_an_error_not_a_fallback(tmp_path, trained):
  state, ssh = trained
  save_steps(tmp_path, state)
  _, other, other_ssh = make_state(grad_clip=0.0)  # no clipping: another opt_state tree
  with pytest.raises(CheckpointError, match="holds another model or optimizer state"):
    resume(tmp_path, other, other_ssh, [])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_resume_moves_the_iterator(tmp_path, trained):
  state, ssh = trained
  it = BatchIterator(list(range(10)), 3, seed=1)
  it.next()
  ck = checkpoint.Checkpointer(tmp_path, 1, 2)
  ck.save(1, state, {"data": it.state()})
  ck.close()
  fresh = BatchIterator(list(range(10)), 3, seed=1)
  ck = checkpoint.Checkpointer(tmp_path, 1, 2)
  _, start, _ = ck.resume(state, ssh, fresh)
  ck.close()
  assert start == 1 and fresh.next() == it.next()


def test_a_damaged_iterator_state_is_one_error(tmp_path, trained):
  state, ssh = trained
  save_steps(tmp_path, state, steps=(1,))
  _edit_extra(tmp_path / "checkpoints" / "1", lambda extra: {**extra, "data": {"n": 10}})
  ck = checkpoint.Checkpointer(tmp_path, 1, 2)
  try:
    with pytest.raises(CheckpointError, match=r"1/extra: damaged data-iterator state \(KeyError"):
      ck.resume(state, ssh, BatchIterator(list(range(10)), 3, seed=1))
  finally:
    ck.close()


def test_restore_params_reads_only_params(tmp_path, trained):
  state, _ = trained
  save_steps(tmp_path, state, steps=(1,))
  params = checkpoint.restore_params(tmp_path, 1, state.params)  # no optimizer in sight
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, np.asarray(b))
  with pytest.raises(CheckpointError, match="no such checkpoint"):
    checkpoint.restore_params(tmp_path, 7, state.params)


@settings(max_examples=30, deadline=None)
@given(
  st.sampled_from(["float32", "bfloat16", "int32", "uint8"]),
  st.integers(1, 300),
  st.data(),
)
def test_checksum_changes_with_every_single_bit(dtype, n, data):
  dtype = jnp.dtype(dtype)
  rng = np.random.default_rng(n)
  if jnp.issubdtype(dtype, jnp.floating):  # finite values: the flip may make a NaN, not start one
    x = rng.standard_normal(n).astype(dtype)
  else:
    x = rng.integers(0, 100, n).astype(dtype)
  raw = bytearray(x.tobytes())
  bit = data.draw(st.integers(0, len(raw) * 8 - 1))
  raw[bit // 8] ^= 1 << (bit % 8)
  flipped = np.frombuffer(bytes(raw), dtype)
  assert checkpoint.checksum({"x": jnp.asarray(x)}) != checkpoint.checksum({"x": flipped})


def test_checksum_sees_swapped_elements_and_ignores_sharding():
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
  assert checkpoint.checksum([x]) != checkpoint.checksum([swapped])
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
  assert checkpoint.checksum([x]) == checkpoint.checksum([sharded])


def test_checksum_hand_computed():
  # bits(1.0f) = 0x3f800000, bits(2.0f) = 0x40000000: 0x3f800000 * 1 + 0x40000000 * 3 mod 2^32.
  want = (0x3F800000 + 3 * 0x40000000) % 2**32
  assert checkpoint.checksum({"a": jnp.asarray([1.0, 2.0], jnp.float32)}) == {"['a']": want}


# --- real processes: a save killed or interrupted ------------------------------------------------

CHILD = textwrap.dedent(
  """
  import sys, time
  import jax, jax.numpy as jnp
  import tiny
  from tapo_jax import config as base, sharding
  from tapo_jax.train import checkpoint, state as state_lib

  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  _, state, _ = state_lib.create(tiny.model("wide"), mesh,
                                 state_lib.make_optimizer(base.base_config().optim, 10))
  ck = checkpoint.Checkpointer(sys.argv[1], 1, 100)
  for step in range(1, 200):
    state = state.replace(step=jnp.asarray(step, jnp.int32),
                          params=jax.tree.map(lambda x: x + 1.0, state.params))
    print(f"saving {step}", flush=True)
    ck.save(step, state, {"data": {"pos": step}})
    ck.wait()
    print(f"saved {step}", flush=True)
  ck.close()
  """
)


def _start_child(workdir):
  env = cli.env(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
  return subprocess.Popen(
    [sys.executable, "-c", CHILD, str(workdir)],
    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip


def _read_until(proc, line):
  """Reads the child's stdout up to `line`."""
  while got := proc.stdout.readline():
    if got.strip() == line:
      return
  raise AssertionError(f"child ended before {line!r}: {proc.stderr.read()[-2000:]}")


def _assert_every_finished_step_restores(workdir):
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  model = tiny.model("wide")
  _, state, ssh = state_lib.create(
    model, mesh, state_lib.make_optimizer(base.base_config().optim, 10)
  )
  steps = checkpoint.steps(workdir)
  assert steps, "no finished checkpoint"
  ck = checkpoint.Checkpointer(workdir, 1, 100)
  for s in steps:
    restored, extra = ck.restore(s, ssh, state)  # raises if any finished step is broken
    assert extra["data"] == {"pos": s} and int(restored.step) == s
  ck.close()
  return steps


def test_sigkill_during_a_save_leaves_only_intact_checkpoints(tmp_path):
  proc = _start_child(tmp_path)
  _read_until(proc, "saving 3")
  proc.kill()  # lands while step 3 is being written (or just before or after)
  proc.wait()
  steps = _assert_every_finished_step_restores(tmp_path)
  assert steps[-1] >= 2


def test_preemption_guard_first_signal_requests_second_ctrl_c_aborts():
  before = signal.getsignal(signal.SIGINT)  # pytest-xdist workers ignore SIGINT
  guard = checkpoint.PreemptionGuard()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
    assert guard.requested and guard.reason == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):  # after a request, Ctrl-C means abort now
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1.0)
  finally:
    guard.restore()
  guard = checkpoint.PreemptionGuard()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert guard.requested and guard.reason == "SIGINT"
  finally:
    guard.restore()
  assert signal.getsignal(signal.SIGINT) == before
