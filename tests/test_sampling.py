"""The JetStream engine and the continuous-batching driver on a tiny random Qwen (CPU)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx

from tapo_jax.sampling import QwenEngine, Sampling, generate, sample, sample_from, truncate
from tapo_jax.sampling.engine import GREEDY
from tapo_jax.sampling.jetstream_compat import engine_api
from tapo_jax.sharding import make_mesh

BUCKETS = (8, 16)
STEPS = 4  # generate steps per host sync in every test (one compile per sampling setting)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], list(range(20, 28)), [3] * 11]  # 8 = a bucket boundary


@pytest.fixture(scope="module")
def model():
  return tiny.model("tiny")


@pytest.fixture(scope="module")
def engine(model):
  return QwenEngine(model, slots=4, max_len=32, prefill_buckets=BUCKETS)


@pytest.fixture(scope="module")
def params(engine, model):
  return engine.load_params(model)


def run(engine, params, prompts=PROMPTS, *, n=1, max_new_tokens=8, seed=0, **sampling):
  eos = tuple(sampling.pop("eos_token_ids", ()))
  settings = Sampling(**sampling, eos_ids=eos)
  return generate(
    engine, params, prompts, settings, n=n, max_new_tokens=max_new_tokens, seed=seed,
    steps_per_sync=STEPS,
  )  # fmt: skip


def padded(g):
  """(tokens [R, T], sampler logprobs [R, T], prompt lens, response lens) of a Generation."""
  r = len(g.completions)
  plens = np.array([len(g.prompts[i // g.n]) for i in range(r)])
  rlens = np.array([len(c) for c in g.completions])
  tokens = np.zeros((r, int((plens + rlens).max())), np.int32)
  lps = np.zeros(tokens.shape, np.float32)
  for i, c in enumerate(g.completions):
    p = plens[i]
    tokens[i, :p] = g.prompts[i // g.n]
    tokens[i, p : p + len(c)] = c
    lps[i, p : p + len(c)] = g.logprobs[i]
  return tokens, lps, plens, rlens


def greedy_reference(model, prompt, steps, eos=()):
  """Step-by-step argmax of the full causal forward (right-padded to 32: one compile)."""
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, t, i: nnx.merge(graphdef, p)(t)[0, i])
  tokens = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, 32), np.int32)
    padded[0, : len(tokens)] = tokens
    tokens.append(int(jnp.argmax(forward(params, padded, len(tokens) - 1))))
    if tokens[-1] in eos:
      break
  return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def greedy_refs(model):
  return [greedy_reference(model, p, 8) for p in PROMPTS]


def test_greedy_matches_full_forward_with_slot_reuse(engine, params, greedy_refs):
  # 4 prompts x 3 samples = 12 rows through 4 slots; prompts of 2, 5, 8 (a bucket) and 11 tokens
  g = run(engine, params, n=3, temperature=0.0)
  assert len(g.completions) == 12
  for r, completion in enumerate(g.completions):
    assert completion == greedy_refs[r // 3], r
  assert g.truncated == [True] * 12
  assert all(np.all(lp == 0.0) for lp in g.logprobs)  # greedy samples a point mass


def test_eos_stops_a_row_and_is_included(engine, params, greedy_refs):
  eos = greedy_refs[0][2]  # the third greedy token of prompt 0
  g = run(engine, params, temperature=0.0, eos_token_ids=(eos,))
  for i, ref in enumerate(greedy_refs):
    want = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert g.completions[i] == want
    assert g.truncated[i] == (eos not in ref)
  assert len(g.completions[0]) == 3 and not g.truncated[0]


def test_row_that_fills_the_cache_exactly(engine, params, model):
  # 16 prompt tokens (a bucket boundary) + 16 new = the cache length 32
  prompt = list(range(40, 56))
  g = run(engine, params, prompts=[prompt, PROMPTS[1]], temperature=0.0, max_new_tokens=16)
  assert g.completions[0] == greedy_reference(model, prompt, 16)
  assert g.completions[1] == greedy_reference(model, PROMPTS[1], 16)
  assert padded(g)[0].shape == (2, 32)


def test_jetstream_api_prefill_insert_generate(engine, params, greedy_refs):
  assert engine.max_concurrent_decodes == 4 and engine.samples_per_slot == 1
  assert engine.max_prefill_length == 16 and engine.colocated_cpus is None
  state = engine.init_decode_state(0)
  padded = np.zeros(8, np.int32)
  padded[:5] = PROMPTS[0]
  prefix = engine.prefill(params=params, padded_tokens=padded, true_length=5)
  state = engine.insert(prefix, state, 2)
  got = []
  for _ in range(4):
    state, result = engine.generate(params, state)
    slot = result.convert_to_numpy().get_result_at_slot(2)
    assert slot.valid[0, 0] == 1
    got.append(int(slot.tokens[0, 0]))
    assert result.convert_to_numpy().get_result_at_slot(0).valid[0, 0] == 0  # never filled
  assert got == greedy_refs[0][:4]
  assert int(slot.lengths[0]) == 5 + 4


def truncated_logprobs_reference(logits, temperature, top_p, top_k):
  """Hugging Face's warpers in numpy: temperature, top-k, then top-p; log of the renormalized."""
  z = logits.astype(np.float64) / temperature
  if top_k:
    z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  order = np.argsort(-z)
  p = np.exp(z[order] - z[order][0])
  p /= p.sum()
  drop = order[(np.cumsum(p) - p) >= top_p]
  z[drop] = -np.inf
  return z - np.log(np.sum(np.exp(z - z.max()))) - z.max()


def test_logprobs_match_recomputed_forward(engine, params, model):
  t, top_p, top_k = 0.7, 0.9, 20
  g = run(engine, params, n=2, temperature=t, top_p=top_p, top_k=top_k, seed=3)
  tokens, lps, plens, rlens = padded(g)
  logits = np.asarray(model(jnp.asarray(tokens)), np.float64)  # [R, T, V]
  for r in range(len(g.completions)):
    p, n = plens[r], rlens[r]
    for j in range(n):
      pos, tok = p + j, tokens[r, p + j]
      want = truncated_logprobs_reference(logits[r, pos - 1], t, top_p, top_k)[tok]
      assert np.isfinite(want)  # the sampled token lies in the truncated set
      np.testing.assert_allclose(lps[r, pos], want, atol=1e-4)


def test_samples_of_one_prompt_differ_and_seed_reproduces(engine, params):
  g = run(engine, params, prompts=[PROMPTS[0]], n=4, temperature=1.0, seed=1)
  assert len({tuple(c) for c in g.completions}) == 4
  again = run(engine, params, prompts=[PROMPTS[0]], n=4, temperature=1.0, seed=1)
  assert again.completions == g.completions
  other = run(engine, params, prompts=[PROMPTS[0]], n=4, temperature=1.0, seed=2)
  assert other.completions != g.completions


def test_new_params_change_output_without_retrace(engine, params, model, greedy_refs):
  run(engine, params, temperature=0.0)  # compiled (the first greedy test may not run)
  traces = dict(engine.traces)
  other = tiny.model("tiny", seed=1)
  g = run(engine, engine.load_params(other), temperature=0.0)
  assert dict(engine.traces) == traces
  assert g.completions != [ref for ref in greedy_refs]
  assert g.completions[1] == greedy_reference(other, PROMPTS[1], 8)
  g = run(engine, nnx.state(model, nnx.Param), temperature=0.0)  # unplaced params: no retrace
  assert g.completions == greedy_refs and dict(engine.traces) == traces


def test_eight_device_mesh_matches_one_device(model, greedy_refs):
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  assert mesh.devices.size == 8
  sharded = QwenEngine(model, slots=4, max_len=32, prefill_buckets=BUCKETS, mesh=mesh)
  # the decode layout: the same 8 devices in the same order as data x tensor (2 = the kv heads)
  assert dict(sharded.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert list(sharded.mesh.devices.flat) == list(mesh.devices.flat)
  spec = jax.sharding.PartitionSpec("data", "tensor", None, None)  # slots, kv heads
  cache = sharded.state_shardings.cache
  assert [x.spec for x in cache.k + cache.v] == [spec] * 4
  weights = jax.tree.leaves(sharded.param_shardings)
  assert all("fsdp" not in str(s.spec) and "data" not in str(s.spec) for s in weights)
  q = sharded.param_shardings["layers"][0]["self_attn"]["q_proj"].get_value().spec
  assert q == jax.sharding.PartitionSpec(None, "tensor", None)  # [D, N, H]: heads split
  g = run(sharded, sharded.load_params(model), n=2, temperature=0.0)
  assert g.completions == [ref for ref in greedy_refs for _ in range(2)]


def test_engine_mesh_defaults_to_the_params_mesh(model):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params = nnx.state(model, nnx.Param)
  placed = QwenEngine(model, slots=2, max_len=32, prefill_buckets=BUCKETS, mesh=mesh)
  on_mesh = nnx.merge(nnx.graphdef(model), placed.load_params(params))
  engine = QwenEngine(on_mesh, slots=2, max_len=32, prefill_buckets=BUCKETS)
  assert list(engine.mesh.devices.flat) == list(mesh.devices.flat)
  one = QwenEngine(model, slots=2, max_len=32, prefill_buckets=BUCKETS)
  assert one.mesh.devices.size == 1


class EngineApiOnly(engine_api.Engine):
  """Exposes nothing but JetStream's Engine API (what a third-party engine offers)."""

  def __init__(self, inner):
    self._inner = inner

  def prefill(self, *, params, existing_prefix=None, padded_tokens, true_length):
    return self._inner.prefill(
      params=params, existing_prefix=existing_prefix, padded_tokens=padded_tokens,
      true_length=true_length,
    )  # fmt: skip

  def insert(self, prefix, decode_state, slot):
    return self._inner.insert(prefix, decode_state, slot)

  def generate(self, params, decode_state):
    return self._inner.generate(params, decode_state)

  def load_params(self, *args, **kwargs):
    return self._inner.load_params(*args, **kwargs)

  def get_prefix_destination_sharding(self):
    return self._inner.get_prefix_destination_sharding()

  def get_tokenizer(self):
    return self._inner.get_tokenizer()

  def init_decode_state(self, *args, **kwargs):
    return self._inner.init_decode_state(*args, **kwargs)

  max_concurrent_decodes = property(lambda self: self._inner.max_concurrent_decodes)
  samples_per_slot = property(lambda self: self._inner.samples_per_slot)
  max_prefill_length = property(lambda self: self._inner.max_prefill_length)
  mesh = property(lambda self: self._inner.mesh)
  colocated_cpus = property(lambda self: self._inner.colocated_cpus)


def test_engine_api_only_path_matches_the_fast_path(model, engine, params, greedy_refs):
  api = EngineApiOnly(QwenEngine(model, slots=4, max_len=32, prefill_buckets=BUCKETS))
  assert not any(hasattr(api, m) for m in ("prefill_many", "generate_steps"))
  # 4 prompts x 3 samples through 4 slots (slot reuse), one EOS that stops some rows early
  eos = greedy_refs[0][2]
  want = run(engine, params, n=3, temperature=0.0, eos_token_ids=(eos,))
  got = run(api, params, n=3, temperature=0.0, eos_token_ids=(eos,))
  assert got.completions == want.completions
  assert got.truncated == want.truncated
  assert any(not t for t in got.truncated) and any(got.truncated)
  assert all(np.isnan(lp).all() for lp in got.logprobs)  # the Engine API reports none


def test_truncate_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda top_p, top_k: np.isfinite(np.asarray(truncate(logits, top_p, top_k)))[0].tolist()
  assert kept(0.7, 0) == [True, True, False, False]  # mass above 0.3 is 0.5 < 0.7
  assert kept(0.5, 0) == [True, False, False, False]  # mass above 0.3 is 0.5, not < 0.5
  assert kept(1.0, 3) == [True, True, True, False]
  assert kept(0.9, 2) == [True, True, False, False]
  assert kept(1.0, 0) == [True] * 4


@pytest.mark.parametrize("candidates", [2, 3, 1024])
def test_top_p_candidates_are_exact(candidates):
  # row 0's top-0.8 set has 2 tokens (fits 2 candidates), row 1's has 3 (needs a full sort)
  probs = np.array([[0.6, 0.3, 0.06, 0.04], [0.4, 0.3, 0.2, 0.1]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  kept = np.isfinite(np.asarray(truncate(logits, 0.8, 0, candidates=candidates)))
  assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]
  kept = np.isfinite(np.asarray(truncate(logits[:1], 0.8, 0, candidates=candidates)))
  assert kept.tolist() == [[True, True, False, False]]


def test_sample_greedy_and_point_mass():
  logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
  tokens, lp = sample(logits, jax.random.key(0), Sampling(temperature=0.0))
  assert tokens.tolist() == [1, 0] and lp.tolist() == [0.0, 0.0]
  tokens, lp = sample(logits, jax.random.key(0), Sampling(top_k=1))  # top-1 is greedy too
  assert tokens.tolist() == [1, 0] and np.allclose(lp, 0.0)


@pytest.mark.parametrize(
  "prompts,kw,match",
  [
    ([list(range(17))], {}, "largest prefill bucket"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 2]], {"n": 0}, "n must be"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([list(range(16))], {"max_new_tokens": 17}, "exceeds the cache length 32"),
    ([[1, 96]], {}, "token ids outside"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([], {}, "no prompts"),
  ],
)
def test_bad_input_is_a_clear_error_before_any_work(engine, params, prompts, kw, match):
  traces = dict(engine.traces)
  with pytest.raises(ValueError, match=match):
    run(engine, params, prompts=prompts, **kw)
  assert dict(engine.traces) == traces


def test_sample_from_builds_an_engine_for_the_prompts(model, greedy_refs):
  g = sample_from(model, PROMPTS, GREEDY, n=2, max_new_tokens=8, prefill_buckets=BUCKETS)
  assert g.completions == [ref for ref in greedy_refs for _ in range(2)]
  with pytest.raises(ValueError, match="largest prefill bucket"):
    sample_from(model, [list(range(20))], GREEDY, max_new_tokens=4, prefill_buckets=BUCKETS)


def test_engine_is_a_jetstream_engine(engine, params):
  assert isinstance(engine, engine_api.Engine)
  assert engine.get_tokenizer().path == ""
  with pytest.raises(NotImplementedError):
    engine.prefill(params=params, existing_prefix=object(), padded_tokens=[1], true_length=1)


LEAN = textwrap.dedent(
  """
  import importlib.abc, logging, sys

  class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
      if name.split(".")[0] in ("seqio", "tensorflow", "tiktoken"):
        raise ModuleNotFoundError(f"blocked: {name}")
      if name == "jetstream.engine.token_utils":  # a dependency that configures logging
        logging.basicConfig(level=logging.DEBUG, force=True)
      return None

  sys.meta_path.insert(0, Block())
  ours = logging.StreamHandler(sys.stderr)
  logging.getLogger().handlers[:] = [ours]
  logging.getLogger().setLevel(logging.WARNING)
  from tapo_jax.sampling import QwenEngine, jetstream_compat
  from jetstream.engine import engine_api
  assert issubclass(QwenEngine, engine_api.Engine)
  assert sorted(jetstream_compat.STUBBED) == ["seqio", "tiktoken"], jetstream_compat.STUBBED
  assert not any(m.startswith("tensorflow") for m in sys.modules)
  assert logging.getLogger().handlers == [ours], logging.getLogger().handlers
  assert logging.getLogger().level == logging.WARNING
  print("LEAN OK")
  """
)


def test_lean_install_imports_without_seqio_tensorflow_tiktoken():
  out = subprocess.run(
    [sys.executable, "-c", LEAN], capture_output=True, text=True, timeout=120, check=False
  )
  assert out.returncode == 0 and "LEAN OK" in out.stdout, out.stderr[-3000:]
