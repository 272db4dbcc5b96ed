r"""Memory: the planner's estimate vs XLA's own accounting of the compiled train step, and the
attention implementations' temp bytes side by side.

python -m tapo_jax.bench memory                                   # small shape, CPU
python -m tapo_jax.bench memory --shape=qwen2.5-1.5b --batch=1 --seq=4096 --dtype=bfloat16

Part 1 compiles the real `tapo_jax.train.step` update (next-token loss, chunked logprobs, AdamW)
on one device for each attention_impl x remat and prints XLA's temp bytes (memory_analysis of the
compiled program: everything but arguments and outputs) next to tapo_jax.plan's activations +
gradients, the same quantities. Part 2 compiles forward + backward of attention alone at --attn-seq
tokens: temp bytes of the plain XLA path and of blockwise, against one [B, N, T, T] f32 array.
Nothing runs; only compiles. XLA on CPU does not apply the remat of an unrolled layer loop (it
schedules the recomputation early), so remat rows compare against a different program than a TPU's.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from tapo_jax import config as base
from tapo_jax import plan as plan_lib
from tapo_jax import sharding
from tapo_jax.models import attention
from tapo_jax.models.qwen import Qwen
from tapo_jax.models.shapes import SHAPES
from tapo_jax.train import sft
from tapo_jax.train import state as state_lib
from tapo_jax.train import step as step_lib

MiB = 2**20


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.bench memory")
  p.add_argument("--shape", choices=sorted(SHAPES), default="small")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--impls", default=",blockwise", help="comma-separated attention_impl values")
  p.add_argument("--attn-seq", type=int, default=8192)
  return p.parse_args(argv)


def step_temp_bytes(mc, impl: str, remat: bool, batch: int, seq: int, dtype) -> int:
  """XLA's temp bytes of the compiled update for one micro-batch of batch x seq tokens."""
  model = nnx.eval_shape(
    lambda: Qwen(mc, dtype=dtype, remat=remat, attention_impl=impl, rngs=nnx.Rngs(0))
  )
  graphdef, params = nnx.split(model, nnx.Param)
  tx = state_lib.make_optimizer(base.base_config().optim, 100)
  i32 = jax.ShapeDtypeStruct((), jnp.int32)
  st = state_lib.TrainState(
    step=i32, params=params, opt_state=jax.eval_shape(tx.init, params), skipped=i32
  )
  batch_ = {
    "tokens": jax.ShapeDtypeStruct((1, batch, seq), jnp.int32),
    "loss_mask": jax.ShapeDtypeStruct((1, batch, seq), bool),
    "denom": jax.ShapeDtypeStruct((1, batch), jnp.int32),
  }
  fn = step_lib.make_train_step(graphdef, tx, lambda m, b: sft.sft_loss(m, b, 4096))
  return fn.lower(st, batch_).compile().memory_analysis().temp_size_in_bytes


def planned_bytes(mc, impl: str, remat: bool, batch: int, seq: int, dtype: str) -> int:
  """tapo_jax.plan's activations + gradients for the same step on one chip."""
  cfg = base.base_config()
  cfg.model.attention_impl, cfg.model.remat, cfg.model.dtype = impl, remat, dtype
  cfg.optim.micro_batch, cfg.tapo.max_len, cfg.loss.vocab_chunk = batch, seq, 4096
  cfg.mesh = dict(fsdp=-1)
  mesh = jax.sharding.AbstractMesh((1, 1, 1), sharding.MESH_AXES)
  g = plan_lib._geometry(mc, mesh, jnp.dtype(dtype).itemsize, impl)
  model = nnx.eval_shape(lambda: Qwen(mc, rngs=nnx.Rngs(0)))
  _, params = plan_lib.param_bytes(model, mesh, 4)
  terms, _ = plan_lib.update_terms(g, cfg, params, batch, seq)
  return sum(t.bytes for t in terms)


def attention_temp_bytes(impl: str, b: int, t: int, n: int, k: int, h: int) -> int:
  """XLA's temp bytes of attention's compiled forward + backward (f32, causal)."""
  sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  f = lambda q, k_, v: attention.causal_attention(q, k_, v, scale=h**-0.5, impl=impl).sum()  # noqa: E731
  g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
  compiled = g.lower(sd(b, t, n, h), sd(b, t, k, h), sd(b, t, k, h)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main(argv) -> int:
  args = _flags(argv)
  mc = SHAPES[args.shape]
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  print(f"device: {jax.devices()[0].device_kind}; shape={args.shape} batch={args.batch} "
        f"seq={args.seq} dtype={args.dtype}")  # fmt: skip
  print(f"{'attention':10s} {'remat':6s} {'XLA temp MiB':>13s} {'planned MiB':>12s} {'ratio':>6s}")
  for impl in args.impls.split(","):
    for remat in (False, True):
      xla = step_temp_bytes(mc, impl, remat, args.batch, args.seq, dtype)
      planned = planned_bytes(mc, impl, remat, args.batch, args.seq, args.dtype)
      print(f"{impl or 'xla':10s} {remat!s:6s} {xla / MiB:13.1f} {planned / MiB:12.1f} "
            f"{planned / xla:6.2f}")  # fmt: skip
  b, t, n, k, h = 1, args.attn_seq, 8, 2, 64
  scores = b * n * t * t * 4
  print(f"attention alone, forward + backward, B={b} T={t} N={n} K={k} H={h} f32: "
        f"one [B, N, T, T] f32 array = {scores / MiB:.0f} MiB")  # fmt: skip
  for impl in ("", "blockwise"):
    temp = attention_temp_bytes(impl, b, t, n, k, h)
    print(f"  {impl or 'xla':10s} temp {temp / MiB:9.1f} MiB = {temp / scores:.3f} x scores")
  return 0
