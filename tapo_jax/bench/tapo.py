r"""TAPO core cost per RL step (DCS + splicing + DAE, jitted, warm) vs the rollout it rides on.

python -m tapo_jax.bench tapo                          # small (Q=8, T=512) and Q=64, K=8, T=4096
python -m tapo_jax.bench tapo --sizes=64x8x4x4096 --rollout-shape=tiny --rollout-tokens=32

Each size QxKxMxT runs on synthetic rollouts (prompt-major rows of T tokens, steps separated by a
newline token, wrong rollouts sharing a random-length prefix with a correct one, about half the
queries eligible). Timed, each as its own jitted call after a warm-up (median of --repeats):
  dcs         select_candidates on the [Q, K] outcome grid
  divergence  step cuts + the splice of the Q*M divergence constructions
  synthesis   the splice of the Q*M synthesis prompts (the device part of `policy`)
  anchor      the splice of the Q*M anchored `policy` rows
  dae         prepare_batch (penalty, DAE, filters, loss scales) on the Q*K + Q*M rows
The rollout it is compared with is timed with tapo_jax.sampling.generate on the same Q*K rows and
prompt length, for --rollout-tokens new tokens, then scaled linearly to the T - prompt response
tokens: a *lower bound* of the real rollout (the --rollout-shape model is tiny by default, and the
cache and attended context are shorter than in the real rollout). The target: core < 1% of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tapo_jax import config as config_lib
from tapo_jax.tapo import construct as con
from tapo_jax.tapo import dcs, divergence, synthesis
from tapo_jax.tapo.batch import Rollouts, concat_rollouts
from tapo_jax.tapo.loss import LossConfig, prepare_batch

EOS, NEWLINE = 1, 2


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.bench tapo")
  p.add_argument("--sizes", default="8x8x4x512,64x8x4x4096", help="comma-separated QxKxMxT")
  p.add_argument("--prompt-len", type=int, default=256)
  p.add_argument("--vocab", type=int, default=151936)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--rollout-shape", default="tiny", help="a shape of tapo_jax.bench.sampler")
  p.add_argument("--rollout-tokens", type=int, default=32)
  p.add_argument("--skip-rollout", action="store_true")
  p.add_argument("--json", default="", help="also write the figures to this file")
  return p.parse_args(argv)


def synthetic_rollouts(q: int, k: int, t: int, prompt_len: int, vocab: int, seed: int = 0):
  """Rollouts with ~half the queries at 2-4 correct of K, wrongs sharing a prefix with a correct."""
  rng = np.random.default_rng(seed)
  r = q * k
  tokens = rng.integers(3, vocab, (r, t)).astype(np.int32)
  tokens[rng.random((r, t)) < 1 / 40] = NEWLINE  # ~40-token steps
  resp_len = rng.integers((t - prompt_len) // 2, t - prompt_len + 1, r).astype(np.int32)
  eligible = rng.random(q) < 0.5
  n_correct = np.where(eligible, rng.integers(2, 5, q), rng.choice([0, k], q))
  rewards = (np.arange(k)[None] < n_correct[:, None]).astype(np.float32).reshape(r)
  for i in range(q):
    tokens[i * k : (i + 1) * k, :prompt_len] = tokens[i * k, :prompt_len]  # one prompt per query
    for j in range(n_correct[i], k):  # wrongs share a prefix with the first correct rollout
      shared = prompt_len + rng.integers(0, resp_len[i * k + j])
      tokens[i * k + j, prompt_len:shared] = tokens[i * k, prompt_len:shared]
  end = prompt_len + resp_len
  tokens[np.arange(r), end - 1] = EOS
  pos = np.arange(t)[None]
  resp = (pos >= prompt_len) & (pos < end[:, None])
  tokens[pos >= end[:, None]] = 0
  return Rollouts(
    tokens=jnp.asarray(tokens),
    positions=jnp.asarray(np.where(pos < end[:, None], pos, 0).astype(np.int32)),
    loss_mask=jnp.asarray(resp),
    sampler_logprobs=jnp.asarray(np.where(resp, -rng.random((r, t)), 0).astype(np.float32)),
    from_learner=jnp.asarray(resp),
    prompt_lens=jnp.full((r,), prompt_len, jnp.int32),
    response_lens=jnp.asarray(resp_len),
    truncated=jnp.zeros((r,), bool),
    rewards=jnp.asarray(rewards),
    group_ids=jnp.asarray(np.arange(r, dtype=np.int32) // k),
    is_constructed=jnp.zeros((r,), bool),
    valid=jnp.ones((r,), bool),
  )


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def core_times(q, k, m, t, a) -> dict[str, float]:
  """Seconds per call of each jitted TAPO-core piece at one size."""
  batch = synthetic_rollouts(q, k, t, a.prompt_len, a.vocab)
  cfg = config_lib.base_config()
  cfg.tapo.m_max = m
  key = jax.random.key(0)
  vocab = a.vocab
  tables = con.TokenTables(
    is_sep=jnp.zeros(vocab, bool).at[NEWLINE].set(True),
    is_space=jnp.zeros(vocab, bool).at[NEWLINE].set(True),
    is_eos=jnp.zeros(vocab, bool).at[EOS].set(True),
  )
  diag = jnp.arange(3, 3 + 12, dtype=jnp.int32)
  grid = (batch.rewards > 0.5).reshape(q, k)
  select = jax.jit(lambda g, key_: dcs.select_candidates(g, key_, 2, 4, m))
  cands = select(grid, key)
  rows, _ = divergence.divergence_rows(batch, cands, diag, jnp.int32(NEWLINE), tables, k=k)
  full = concat_rollouts(batch, rows)
  template = synthesis.Template(
    pieces=tuple(tuple(range(3, 3 + n)) for n in (60, 8, 8, 80)),
    names=("query", "incorrect", "correct"),
  )
  queries, query_lens = batch.tokens[::k, : a.prompt_len], batch.prompt_lens[::k]
  c = q * m
  rest = jnp.asarray(np.random.default_rng(1).integers(3, vocab, (c, t)), jnp.int32)
  prefix_lens = jnp.full((c,), (t - a.prompt_len) // 4, jnp.int32)
  rest_lens = jnp.full((c,), (t - a.prompt_len) // 2, jnp.int32)
  loss_cfg = LossConfig.from_config(cfg)
  prepare = lambda b: prepare_batch(b, loss_cfg)  # noqa: E731 (jitted itself)
  out = {
    "dcs": _time(select, grid, key, repeats=a.repeats),
    "divergence": _time(
      lambda b, c_: divergence.divergence_rows(b, c_, diag, jnp.int32(NEWLINE), tables, k=k),
      batch,
      cands,
      repeats=a.repeats,
    ),
    "synthesis": _time(
      lambda b, c_: synthesis.synthesis_prompts(
        b, c_, queries, query_lens, tables.is_eos, k=k, template=template
      ),
      batch,
      cands,
      repeats=a.repeats,
    ),
    "anchor": _time(
      lambda b, c_: synthesis.anchored_rows(
        b, c_, prefix_lens, rest, rest_lens, c_.valid.reshape(-1), k=k
      ),
      batch,
      cands,
      repeats=a.repeats,
    ),
    "dae": _time(prepare, full, repeats=a.repeats),
  }
  out["core_divergence"] = out["dcs"] + out["divergence"] + out["dae"]
  out["core_policy_device"] = out["dcs"] + out["synthesis"] + out["anchor"] + out["dae"]
  out["eligible_rate"] = float(cands.eligible.mean())
  out["constructed_valid"] = int(rows.valid.sum())
  return out


def rollout_seconds(q, k, t, a) -> dict:
  """A lower bound of the rollout time of Q*K rows with T - prompt new tokens each."""
  from flax import nnx

  from tapo_jax.models.qwen import Qwen
  from tapo_jax.models.shapes import SHAPES
  from tapo_jax.sampling import QwenEngine, Sampling, generate

  shape = SHAPES[a.rollout_shape]
  model = Qwen(shape, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, shape.vocab_size, (q, a.prompt_len)).tolist()
  engine = QwenEngine(
    model, slots=min(64, q * k), max_len=a.prompt_len + a.rollout_tokens,
    prefill_buckets=(a.prompt_len,),
  )  # fmt: skip
  params = engine.load_params(model)
  kw = dict(n=k, max_new_tokens=a.rollout_tokens)
  generate(engine, params, prompts, Sampling(), seed=0, **kw)  # compile
  t0 = time.perf_counter()
  generate(engine, params, prompts, Sampling(), seed=1, **kw)
  measured = time.perf_counter() - t0
  new_tokens = t - a.prompt_len
  return dict(
    shape=a.rollout_shape,
    measured_tokens=a.rollout_tokens,
    measured_s=measured,
    response_tokens=new_tokens,
    estimate_s=measured * new_tokens / a.rollout_tokens,
  )


def main(argv) -> int:
  a = _flags(argv)
  dev = jax.devices()[0]
  report = dict(device=f"{dev.platform}:{dev.device_kind}", prompt_len=a.prompt_len, sizes={})
  for size in a.sizes.split(","):
    q, k, m, t = map(int, size.lower().split("x"))
    entry = dict(core=core_times(q, k, m, t, a))
    if not a.skip_rollout:
      roll = rollout_seconds(q, k, t, a)
      entry["rollout"] = roll
      for name in ("core_divergence", "core_policy_device"):
        entry[f"{name}_fraction"] = entry["core"][name] / roll["estimate_s"]
    report["sizes"][size] = entry
    c = entry["core"]
    line = (
      f"tapo core Q={q} K={k} M={m} T={t} on {report['device']}: dcs {1e3 * c['dcs']:.2f} ms, "
      f"divergence {1e3 * c['divergence']:.2f} ms, synthesis {1e3 * c['synthesis']:.2f} ms, "
      f"anchor {1e3 * c['anchor']:.2f} ms, dae {1e3 * c['dae']:.2f} ms; "
      f"total (divergence path) {1e3 * c['core_divergence']:.2f} ms"
    )
    if "rollout" in entry:
      r = entry["rollout"]
      line += (
        f"; rollout >= {r['estimate_s']:.1f} s ({r['shape']} model, {r['measured_tokens']} tokens "
        f"measured in {r['measured_s']:.2f} s, scaled to {r['response_tokens']}): "
        f"{100 * entry['core_divergence_fraction']:.3f}% (divergence), "
        f"{100 * entry['core_policy_device_fraction']:.3f}% (policy, device part)"
      )
    print(line, flush=True)
  print(json.dumps(report, indent=1, default=float))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=1, default=float)
  return 0
