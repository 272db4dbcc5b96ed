r"""Train-step throughput: our jitted update vs transformers (torch) forward + backward + AdamW.

python -m tapo_jax.bench train                          # tiny shape, CPU-sized
python -m tapo_jax.bench train --shape=qwen2.5-1.5b --batch=4 --seq=4096 --dtype=bfloat16 \
  --remat --attention=cudnn                             # the GPU target (launch/bench_gpu.sh)

Both sides: the same random-weight model shape, batch and sequence length, a next-token loss over
every token, one AdamW step per iteration. Ours is the real `tapo_jax.train.step` update (grad
clipping, NaN guard, chunked-vocabulary loss). Reported: tokens/s of each, their ratio, and model
FLOPs utilization with the formula printed (peak from --peak-tflops, or known GPU kinds).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tapo_jax import config as base
from tapo_jax.bench.sampler import SHAPES
from tapo_jax.models.qwen import Qwen
from tapo_jax.train import sft
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib

# dense bf16 peak TFLOP/s by substrings of jax's device_kind
PEAK_TFLOPS = (("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("l4", 121.0))


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.bench train")
  p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--attention", default="", help="'' (XLA) or cudnn")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--peak-tflops", type=float, default=0.0, help="per device; 0 = by device kind")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--json", default="", help="also write the results here")
  return p.parse_args(argv)


def flops_per_token(cfg, seq: int) -> float:
  """6 N (dense fwd + bwd) + 12 L T H N_heads (attention scores and values, fwd + bwd)."""
  n = (
    cfg.num_hidden_layers
    * (
      cfg.hidden_size * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
      + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    + cfg.hidden_size * cfg.vocab_size  # the output projection (the embedding lookup is free)
  )
  attn = 12 * cfg.num_hidden_layers * seq * cfg.head_dim * cfg.num_attention_heads
  return 6 * n + attn


def _peak(args) -> float | None:
  if args.peak_tflops:
    return args.peak_tflops * 1e12
  kind = jax.devices()[0].device_kind.lower()
  return next((t * 1e12 for k, t in PEAK_TFLOPS if k in kind), None)


def bench_ours(args, cfg) -> dict:
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  from tapo_jax import sharding

  mesh = sharding.make_mesh()
  model = Qwen(
    cfg, dtype=dtype, param_dtype=jnp.float32, remat=args.remat,
    attention_impl=args.attention or None, rngs=nnx.Rngs(0),
  )  # fmt: skip
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  oc = base.base_config().optim
  tx = state_lib.make_optimizer(oc, 1000)
  state, ssh = state_lib.init_state(params, tx, mesh)
  rng = np.random.default_rng(0)
  rows = [(rng.integers(0, cfg.vocab_size, args.seq).tolist(), [True] * args.seq)] * args.batch
  batch = sft.pack_sft(rows, args.seq, 0, round_to=args.seq)
  micro = step_lib.split_micro_batches(batch, args.batch)
  with jax.set_mesh(mesh):
    fn = step_lib.make_train_step(graphdef, tx, lambda m, b: sft.sft_loss(m, b, 8192), ssh)
    t0 = time.perf_counter()
    state, m = fn(state, micro)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
      state, m = fn(state, micro)
    jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / args.iters
  return {"tokens_per_s": args.batch * args.seq / dt, "step_s": dt, "first_call_s": first}


def bench_torch(args, cfg) -> dict:
  import torch
  import transformers

  torch.manual_seed(0)
  hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(device=device, dtype=dtype)
  if args.remat:
    model.gradient_checkpointing_enable()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
  ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)

  def one():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  one()
  sync()
  t0 = time.perf_counter()
  for _ in range(args.iters):
    one()
  sync()
  dt = (time.perf_counter() - t0) / args.iters
  return {"tokens_per_s": args.batch * args.seq / dt, "step_s": dt}


def main(argv) -> int:
  args = _flags(argv)
  cfg = SHAPES[args.shape]
  fpt = flops_per_token(cfg, args.seq)
  peak = _peak(args)
  devices = jax.device_count()
  print(f"device: {jax.devices()[0].device_kind} x{devices}; shape={args.shape} "
        f"batch={args.batch} seq={args.seq} dtype={args.dtype} remat={args.remat}")  # fmt: skip
  print(f"FLOPs/token = 6*N + 12*L*T*H*heads = {fpt:.4g}")
  res = {"ours": bench_ours(args, cfg)}
  if not args.skip_torch:
    res["transformers"] = bench_torch(args, cfg)
  print(f"{'':14s} {'tokens/s':>12s} {'step s':>9s} {'MFU':>7s}")
  for name, r in res.items():
    mfu = r["tokens_per_s"] * fpt / (peak * devices) if peak else None
    r["mfu"] = mfu
    mfu_s = f"{100 * mfu:6.1f}%" if mfu is not None else "    n/a"
    print(f"{name:14s} {r['tokens_per_s']:12.1f} {r['step_s']:9.4f} {mfu_s}")
  if "transformers" in res:
    ratio = res["ours"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    res["ratio"] = ratio
    print(f"ratio ours/transformers: {ratio:.2f}x   (ours first call: "
          f"{res['ours']['first_call_s']:.1f}s incl. compile)")  # fmt: skip
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0
