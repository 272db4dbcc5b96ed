"""The samplers' decode layout on 8 fake CPU devices: the weight sync reshards on device (never
through host memory), the layout's choices, and decode windows that double.

"Through host memory" is observed directly: jax.device_put falls back to `ArrayImpl._value` (a
numpy copy of the whole array) when a target shard is not a source shard, and
jax.transfer_guard does not see that fallback, so the tests count `_value` calls too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx
from jax._src import array as array_lib

from tapo_jax import config as config_lib
from tapo_jax import sharding
from tapo_jax.sampling import QwenEngine, Sampling, generate
from tapo_jax.sampling.engine import decode_windows
from tapo_jax.validate import ConfigError, validate_decode_layout

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], list(range(20, 28))]


@pytest.fixture(scope="module")
def model():
  return tiny.model("tiny")


def _on(mesh, model):
  """The model's params placed in the trainer's layout on `mesh` (f32 master weights)."""
  params = nnx.state(model, nnx.Param)
  return jax.device_put(params, sharding.param_shardings(params, mesh))


@pytest.fixture
def host_copies(monkeypatch):
  """Shapes of the arrays copied to host numpy (ArrayImpl._value) while the test runs."""
  seen = []
  value = array_lib.ArrayImpl._value
  monkeypatch.setattr(
    array_lib.ArrayImpl,
    "_value",
    property(lambda self: (seen.append(self.shape), value.fget(self))[1]),
  )
  return seen


def _expected(params, dtype):
  return [np.asarray(x).astype(dtype) for x in jax.tree.leaves(params)]


def test_weight_sync_reshards_on_the_same_devices_without_any_transfer(model, host_copies):
  trainer = sharding.make_mesh({"fsdp": 8})
  params = _on(trainer, model)
  engine = QwenEngine(model, slots=4, max_len=32, prefill_buckets=(8, 16), mesh=trainer,
                      weight_dtype=jnp.bfloat16)  # fmt: skip
  assert dict(engine.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  with jax.transfer_guard("disallow"):
    decode = engine.load_params(params)
    jax.block_until_ready(decode)
  assert host_copies == [] and engine.syncs == 1
  leaves, targets = jax.tree.leaves(decode), jax.tree.leaves(engine.param_shardings)
  assert [x.sharding for x in leaves] == targets
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
  for got, want in zip(leaves, _expected(params, jnp.bfloat16)):
    np.testing.assert_array_equal(np.asarray(got), want)
  # the copy is already in place: no second reshard, the same arrays
  again = engine.load_params(decode)
  assert engine.syncs == 1 and all(a is b for a, b in zip(jax.tree.leaves(again), leaves))


def test_weight_sync_to_disjoint_sampler_devices_copies_device_to_device(model, host_copies):
  devices = jax.devices()
  trainer = sharding.make_mesh({"fsdp": 4}, devices[4:])
  params = _on(trainer, model)
  sampler = sharding.make_mesh({"data": -1}, devices[:4])
  engine = QwenEngine(model, slots=4, max_len=32, prefill_buckets=(8, 16), mesh=sampler,
                      weight_dtype=jnp.bfloat16)  # fmt: skip
  with jax.transfer_guard_device_to_host("disallow"), jax.transfer_guard_host_to_device("disallow"):
    decode = engine.load_params(params)
    jax.block_until_ready(decode)
  assert host_copies == []
  leaves = jax.tree.leaves(decode)
  assert all(x.sharding.device_set == set(devices[:4]) for x in leaves)
  assert [x.sharding for x in leaves] == jax.tree.leaves(engine.param_shardings)
  for got, want in zip(leaves, _expected(params, jnp.bfloat16)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_a_copy_survives_the_trainer_donating_its_params(model):
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  params = jax.tree.map(jnp.copy, _on(mesh, model))  # (not the fixture model's own buffers)
  engine = QwenEngine(model, slots=2, max_len=32, prefill_buckets=(8, 16), mesh=mesh)
  want = _expected(params, jnp.float32)
  shared = engine.load_params(params)  # same dtype and layout: the trainer's own arrays
  assert all(a is b for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(params)))
  own = engine.load_params(params, copy=True)
  for x in jax.tree.leaves(params):
    x.delete()  # what donating them to the update does
  for got, w in zip(jax.tree.leaves(own), want):
    np.testing.assert_array_equal(np.asarray(got), w)


def test_greedy_tokens_in_the_decode_layout_equal_one_device(model):
  one = QwenEngine(model, slots=4, max_len=32, prefill_buckets=(8, 16), mesh=None,
                   weight_dtype=jnp.bfloat16)  # fmt: skip
  trainer = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  eight = QwenEngine(model, slots=4, max_len=32, prefill_buckets=(8, 16), mesh=trainer,
                     weight_dtype=jnp.bfloat16)  # fmt: skip
  greedy = Sampling(temperature=0.0)
  a = generate(one, one.load_params(model), PROMPTS, greedy, n=1, max_new_tokens=10)
  b = generate(eight, eight.load_params(_on(trainer, model)), PROMPTS, greedy, n=1,
               max_new_tokens=10)  # fmt: skip
  assert a.completions == b.completions


def test_decode_windows_double_up_to_the_cache():
  # the recipe's engine: buckets (256, 512, 1024) + 8192 new tokens; before: 1024 -> 9216
  assert decode_windows((256, 512, 1024), 9216) == (256, 512, 1024, 2048, 4096, 8192, 9216)
  for buckets, max_len in [((8, 16), 32), ((64,), 100), ((4,), 9), ((512,), 512)]:
    w = decode_windows(buckets, max_len)
    assert w[-1] == max_len and w[0] >= min(16, max_len)
    assert all(b <= 2 * a for a, b in zip(w, w[1:]))


@pytest.mark.parametrize(
  "kv, devices, per_host, want",
  [(4, 32, 4, 4), (2, 8, 8, 2), (8, 32, 4, 4), (3, 8, 8, 1), (4, 6, 6, 2), (28, 16, 4, 4)],
)
def test_decode_tensor_is_the_largest_kv_divisor_inside_one_host(kv, devices, per_host, want):
  assert sharding.decode_tensor(kv, devices, per_host) == want


def test_a_decode_tensor_that_does_not_fit_is_refused():
  with pytest.raises(ValueError, match="decode_tensor=4 must divide the kv heads"):
    sharding.decode_tensor(2, 8, 8, requested=4)
  cfg = config_lib.base_config()
  cfg.model.toy = "arith"  # 2 kv heads
  cfg.rollout.decode_tensor = 4
  with pytest.raises(ConfigError, match=r"decode_tensor=4: does not divide the model's 2 kv heads"):
    validate_decode_layout(cfg, 8)
  cfg.rollout.decode_tensor = 3
  with pytest.raises(ConfigError, match=r"decode_tensor=3: does not divide the samplers' 8"):
    validate_decode_layout(cfg, 8)


@pytest.mark.parametrize("sampler_devices", [4, 0])
def test_one_step_off_with_several_processes_is_refused_up_front(sampler_devices):
  cfg = config_lib.base_config()
  cfg.model.toy = "arith"
  cfg.distributed, cfg.rollout.async_steps = True, 1
  cfg.rollout.sampler_devices = sampler_devices
  with pytest.raises(ConfigError, match=r"^config.rollout.async_steps=1 with distributed=True"):
    validate_decode_layout(cfg, 8)
  cfg.distributed = False  # one process: both layouts are allowed
  validate_decode_layout(cfg, 8)
