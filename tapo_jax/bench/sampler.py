r"""Sampler throughput: tapo_jax.sampling.generate vs transformers' generate, same shape and run.

python -m tapo_jax.bench sampler                       # tiny shape, CPU-sized
python -m tapo_jax.bench sampler --shape=qwen2.5-1.5b --batch=256 --prompt-len=128 \
  --new-tokens=256                                     # the GPU target (launch/bench_gpu.sh)

Both sides get random weights of the same shape, the same random prompts (one sample each), the
same sampling settings and exactly `--new-tokens` new tokens per row (no EOS). Reported: tokens/s
of each, their ratio, our first-call time (compile + run) and number of traced compilations; on a
GPU also the fraction of the HBM-bandwidth roofline (params + attended KV bytes per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tapo_jax.models.qwen import Qwen
from tapo_jax.models.shapes import SHAPES

# peak HBM bandwidth (bytes/s) by substrings of jax's device_kind
PEAK_BANDWIDTH = (
  ("h200", 4.8e12),
  ("h100 pcie", 2.0e12),
  ("h100", 3.35e12),
  ("a100-sxm4-80gb", 2.04e12),
  ("a100", 1.555e12),
  ("l4", 0.3e12),
  ("a10", 0.6e12),
)


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.bench sampler")
  p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--steps-per-sync", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip-hf", action="store_true", help="only our sampler")
  p.add_argument("--json", default="", help="also write the figures to this file")
  return p.parse_args(argv)


def _ours(cfg, dtype, prompts, a) -> dict:
  from tapo_jax.sampling import QwenEngine, Sampling, generate

  model = Qwen(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  engine = QwenEngine(
    model, slots=a.batch, max_len=a.prompt_len + a.new_tokens, prefill_buckets=(a.prompt_len,)
  )
  params = engine.load_params(model)
  sampling = Sampling(a.temperature, a.top_p, a.top_k)
  kw = dict(n=1, max_new_tokens=a.new_tokens, steps_per_sync=a.steps_per_sync)
  t0 = time.perf_counter()
  out = generate(engine, params, prompts, sampling, seed=0, **kw)
  first = time.perf_counter() - t0
  compiles = sum(engine.traces.values())
  times = []
  for r in range(a.repeats):
    t0 = time.perf_counter()
    out = generate(engine, params, prompts, sampling, seed=r + 1, **kw)
    times.append(time.perf_counter() - t0)
  assert all(len(c) == a.new_tokens for c in out.completions)
  assert sum(engine.traces.values()) == compiles  # new seeds compile nothing
  best = min(times)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return dict(
    seconds=best,
    tokens_per_s=a.batch * a.new_tokens / best,
    first_call_s=first,
    compile_s=first - best,
    compilations=compiles,
    param_bytes=int(param_bytes),
  )


def _hf(cfg, dtype, prompts, a) -> dict:
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
  hf_cfg = transformers.AutoConfig.for_model(**{**cfg.to_hf(), "torch_dtype": None})
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=tdtype)
  model = model.to(device).eval()
  ids = torch.tensor(prompts, device=device)
  kw = dict(
    attention_mask=torch.ones_like(ids),
    max_new_tokens=a.new_tokens,
    min_new_tokens=a.new_tokens,
    do_sample=a.temperature > 0,
    pad_token_id=0,
    eos_token_id=None,
  )
  if a.temperature > 0:
    kw.update(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)
  times = []
  with torch.inference_mode():
    model.generate(ids[:, :], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm up
    for _ in range(max(1, a.repeats - 1)):
      if device == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      out = model.generate(ids, **kw)
      if device == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
  assert out.shape == (a.batch, a.prompt_len + a.new_tokens)
  best = min(times)
  return dict(
    seconds=best, tokens_per_s=a.batch * a.new_tokens / best, torch_threads=torch.get_num_threads()
  )


def _roofline(cfg, dtype, a, ours) -> dict | None:
  dev = jax.devices()[0]
  kind = dev.device_kind.lower()
  peak = next((bw for name, bw in PEAK_BANDWIDTH if name in kind), None)
  if dev.platform != "gpu" or peak is None:
    return None
  kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
  kv_per_token *= jnp.dtype(dtype).itemsize
  mean_context = a.prompt_len + (a.new_tokens + 1) / 2
  step_bytes = ours["param_bytes"] + a.batch * mean_context * kv_per_token
  ideal_s = a.new_tokens * step_bytes / peak
  return dict(
    device_kind=dev.device_kind,
    peak_bytes_per_s=peak,
    bytes_per_step=step_bytes,
    roofline_fraction=ideal_s / ours["seconds"],
  )


def main(argv) -> int:
  a = _flags(argv)
  cfg = SHAPES[a.shape]
  dtype_name = a.dtype or ("bfloat16" if a.shape.startswith("qwen") else "float32")
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, cfg.vocab_size, (a.batch, a.prompt_len)).tolist()
  report = dict(
    shape=a.shape,
    config=dataclasses.asdict(cfg),
    dtype=dtype_name,
    batch=a.batch,
    prompt_len=a.prompt_len,
    new_tokens=a.new_tokens,
    sampling=dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k),
    steps_per_sync=a.steps_per_sync,
    device=f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
  )
  report["ours"] = _ours(cfg, dtype, prompts, a)
  roof = _roofline(cfg, dtype, a, report["ours"])
  if roof:
    report["roofline"] = roof
  if not a.skip_hf:
    report["transformers"] = _hf(cfg, dtype, prompts, a)
    report["speedup"] = report["ours"]["tokens_per_s"] / report["transformers"]["tokens_per_s"]
  print(json.dumps(report, indent=1, default=float))
  o = report["ours"]
  line = (
    f"sampler {a.shape} {dtype_name} batch={a.batch} prompt={a.prompt_len} new={a.new_tokens}: "
    f"ours {o['tokens_per_s']:.0f} tok/s (first call {o['first_call_s']:.1f}s, "
    f"{o['compilations']} compilations)"
  )
  if "transformers" in report:
    line += (
      f", transformers {report['transformers']['tokens_per_s']:.0f} tok/s, "
      f"ratio {report['speedup']:.2f}x"
    )
  if roof:
    line += f", {100 * roof['roofline_fraction']:.0f}% of the HBM roofline"
  print(line)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=1, default=float)
  return 0
