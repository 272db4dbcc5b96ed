r"""Train-step throughput: our jitted update vs transformers (torch) forward + backward + AdamW.

python -m tapo_jax.bench train                          # tiny shape, CPU-sized
python -m tapo_jax.bench train --shape=qwen2.5-1.5b --batch=4 --seq=4096 --dtype=bfloat16 \
  --remat --attention=cudnn                             # the GPU target (launch/bench_gpu.sh)
python -m tapo_jax.bench train --lengths=rl --seqs=64   # a math RL step's lengths: packed rows

Both sides: the same random-weight model shape, batch and sequence length, a next-token loss over
every token, one AdamW step per iteration. Ours is the real `tapo_jax.train.step` update (grad
clipping, NaN guard, chunked-vocabulary loss). Reported: tokens/s of each, their ratio, and model
FLOPs utilization with the formula printed (peak from --peak-tflops, or known GPU kinds).

--lengths=rl: a step of --seqs sequences with a math RL step's lengths (prompts 4-12% of --seq;
responses long-tailed: log-normal with median --seq/5, about 6% cut at the maximum, like
truncated responses), one optimizer step over all of them in micro-batches of --batch rows of
--seq tokens. Ours runs them padded (one sequence per row, the layout before packing) and packed
(`tapo.batch.pack_rows`, several per row, segment-masked attention); transformers pads each
micro-batch to its longest sequence (a data collator's dynamic padding). Reported: real
(unpadded) tokens/s of each, the padding share of the tokens each processed, the ratios.
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
from tapo_jax.models.qwen import Qwen
from tapo_jax.models.shapes import SHAPES
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
  p.add_argument("--lengths", choices=("full", "rl"), default="full", help="rl: a packed RL step")
  p.add_argument("--seqs", type=int, default=64, help="--lengths=rl: sequences in the step")
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


def rl_lengths(n: int, seq: int, seed: int = 0) -> list[int]:
  """n sequence lengths of a math RL step (see the module docstring), each <= seq."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(max(1, seq // 25), max(2, seq // 8), n)
  response = np.exp(rng.normal(np.log(seq / 5), 0.9, n)).astype(int)
  return np.clip(prompt + np.maximum(response, 1), 2, seq).tolist()


def rl_rows(args, cfg) -> list[tuple[list[int], list[bool]]]:
  rng = np.random.default_rng(1)
  lengths = rl_lengths(args.seqs, args.seq)
  return [(rng.integers(0, cfg.vocab_size, n).tolist(), [True] * n) for n in lengths]


def padded_sft(rows, width: int, m: int) -> dict:
  """One sequence per row (the layout before packing), in pack_sft's [M, m, width] format."""
  packed = {k: [] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
  for chunk in range(0, len(rows), m):
    one = [sft.pack_sft([r], width, 1) for r in rows[chunk : chunk + m]]
    for k in packed:
      part = np.concatenate([o[k][0] for o in one])
      packed[k].append(np.pad(part, ((0, m - len(one)), (0, 0))))
  out = {k: np.stack(v) for k, v in packed.items()}
  out["denom"] = np.full(out["tokens"].shape[:2], max(out["loss_mask"].sum(), 1), np.int32)
  return out


def bench_ours(args, cfg, batch=None) -> dict:
  """Our update on `batch` ([M, m, T] sft-style arrays; default: --batch rows of --seq random
  tokens): tokens/s counting the real tokens, the padding share of those it processed."""
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
  if batch is None:
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, cfg.vocab_size, args.seq).tolist(), [True] * args.seq)] * args.batch
    batch = sft.pack_sft(rows, args.seq, args.batch)
  micro = sharding.put_global(batch, sharding.batch_shardings(batch, mesh, row_axis=1))
  real = int((batch["segment_ids"] > 0).sum())
  used = int(batch["segment_ids"].any(axis=(1, 2)).sum())
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
  processed = used * batch["tokens"].shape[1] * batch["tokens"].shape[2]
  return {
    "tokens_per_s": real / dt, "step_s": dt, "first_call_s": first,
    "pad_fraction": 1.0 - real / processed, "micro_batches": used,
  }  # fmt: skip


def bench_torch(args, cfg, rows=None) -> dict:
  """transformers on the same shape: --batch x --seq random tokens, or `rows` (an RL step) in
  micro-batches of --batch rows, each padded to its longest (labels -100 on padding)."""
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
  if rows is None:
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    micro = [(ids, torch.ones_like(ids), ids)]
  else:
    micro = []
    for i in range(0, len(rows), args.batch):
      part = [ids for ids, _ in rows[i : i + args.batch]]
      longest = max(len(x) for x in part)
      ids = torch.zeros((len(part), longest), dtype=torch.long)
      attn = torch.zeros_like(ids)
      for j, x in enumerate(part):
        ids[j, : len(x)], attn[j, : len(x)] = torch.tensor(x), 1
      micro.append((ids.to(device), attn.to(device), ids.masked_fill(attn == 0, -100).to(device)))
  total = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in micro)
  real = sum(int(a.sum()) for _, a, _ in micro)
  processed = sum(a.numel() for _, a, _ in micro)

  def one():
    for ids, attn, labels in micro:
      logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
      loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum",
        ignore_index=-100,
      ) / total  # fmt: skip
      loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  one()
  sync()
  t0 = time.perf_counter()
  for _ in range(args.iters):
    one()
  sync()
  dt = (time.perf_counter() - t0) / args.iters
  return {"tokens_per_s": real / dt, "step_s": dt, "pad_fraction": 1.0 - real / processed}


def main_rl(args, cfg) -> int:
  """--lengths=rl: one RL step's sequences, padded vs packed vs transformers."""
  rows = rl_rows(args, cfg)
  lengths = np.array([len(ids) for ids, _ in rows])
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; shape={args.shape} "
        f"{len(rows)} sequences of <= {args.seq} tokens (mean {lengths.mean():.0f}, median "
        f"{np.median(lengths):.0f}, {np.mean(lengths == args.seq):.0%} at the maximum), "
        f"micro-batches of {args.batch} x {args.seq}, dtype={args.dtype}")  # fmt: skip
  res = {
    "ours_padded": bench_ours(args, cfg, padded_sft(rows, args.seq, args.batch)),
    "ours_packed": bench_ours(args, cfg, sft.pack_sft(rows, args.seq, args.batch)),
  }
  if not args.skip_torch:
    res["transformers"] = bench_torch(args, cfg, rows)
  print(f"{'':14s} {'real tok/s':>12s} {'step s':>9s} {'padding':>8s}")
  for name, r in res.items():
    print(f"{name:14s} {r['tokens_per_s']:12.1f} {r['step_s']:9.4f} {r['pad_fraction']:8.1%}")
  packed = res["ours_packed"]["tokens_per_s"]
  res["packed_vs_padded"] = packed / res["ours_padded"]["tokens_per_s"]
  line = f"packed / padded: {res['packed_vs_padded']:.2f}x"
  if "transformers" in res:
    res["packed_vs_transformers"] = packed / res["transformers"]["tokens_per_s"]
    line += f", packed / transformers: {res['packed_vs_transformers']:.2f}x"
  print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0


def main(argv) -> int:
  args = _flags(argv)
  cfg = SHAPES[args.shape]
  if args.lengths == "rl":
    return main_rl(args, cfg)
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
