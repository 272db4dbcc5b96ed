r"""Memory planner: the HBM a config needs per device, from abstract shapes (nothing is allocated).

Longer than most modules on purpose: every phase's formula is stated below and implemented in
this one file, so the legend, the arithmetic and the report cannot drift apart.

python -m tapo_jax.main --config=configs/qwen7b.py --config.mode=plan --config.plan.device=v5p-32
python -m tapo_jax.main --config=configs/qwen7b.py --config.mode=plan --config.plan.device=v5e \
  --config.plan.chips=64 --config.plan.shape=qwen2.5-7b     # model.path not on this machine

The architecture comes from config.json in model.path (or plan.shape, a built-in table); the mesh
from config.mesh resolved against plan.chips exactly as `sharding.mesh_shape` resolves it on the
real devices, and the samplers' decode layout as the engines build it (`sharding.decode_tensor`,
`sharding.decode_mesh`); every parameter and cache array is split by the same rules tables
(`sharding.RULES`, `sharding.DECODE_RULES` through `sharding.fit_spec`), activations by the
all-or-nothing rule of `sharding.constrain`. Exit status 2 with one line naming what to change
when the peak does not fit in plan.usable x HBM.

Legend (per device): L layers, D model, F mlp, V vocab, N / K q / kv heads, H head dim; n, k, f
the heads, kv heads and mlp width left on a device after tensor parallelism (a dim the tensor
axis does not divide stays whole); e compute-dtype bytes, p param-dtype bytes, c cache bytes;
P the per-device parameter bytes; b rows per device (a micro-batch's rows / (data x fsdp) when
that divides, else all of them: `constrain` leaves the batch whole); T = tapo.max_len (sft: the
longest sft.max_len); C = loss.vocab_chunk; β the attention block (models.attention.BLOCK).
A micro-batch is m packed rows of T tokens (minibatches.rows_per_micro_batch: optim.micro_batch,
or optim.micro_batch_tokens / T, rounded up to a multiple of data x fsdp), every row full width
whatever the sequences' lengths, so its activations are those of m rows of T; packed rows add
their segment mask where attention takes a mask (b·T² bytes, and cuDNN's bias from it, b·T²·e).

The run's phases; the peak is the largest, and each phase holds the train state (params P, AdamW
moments 2P in the param dtype, optax's default) plus:
  weight sync   the samplers' decode copy of the weights W (`Engines.sync`: the trainer's params
                cast to rollout.weight_dtype, split over the decode layout's tensor axis and
                replicated over its data axis, `sharding.DECODE_RULES` on (chips / t, 1, t)), and
                the reshard's temporaries, about one more W. The loop holds W through the step,
                so every later phase holds it too. No W when the trainer's params already are
                that layout and dtype and no one-step-off sampler needs a copy.
  <engine> prefill, <engine> decode   for the rollout engine and, with "policy" constructions,
                the synthesis engine (sized as tapo_jax.sampling.engines sizes it, for prompts of
                512 template tokens, an estimate, + data.max_prompt_tokens + 2 x
                rollout.max_new_tokens: y⁻ and y⁺): its decode state, which lives through a
                generate call: KV cache 2·L·slots·K·S·H·c split over data on slots and tensor on
                K, S = the largest bucket + the new tokens, and the decode rows (tokens,
                logprobs) 8·slots·S; then
    prefill     one prefill of the largest bucket: P' = min(16, 16384 / bucket) prompts, their KV
                and one layer, b'·T'·(2f + 2D + nH + 2kH)·e + the blockwise score block b'·n·β²·4
                (the TPU compiler's fusions, measured by `bench aot`; the [b', n, T', T'] scores
                with attention_impl "")
    decode      one chunk of decode steps: the window copy (a window below S, the largest of the
                engine's doubling windows, is sliced out and put back: one copy, 1.5 with >= 2
                kv-heads on a chip, whose loop the compiler runs in a [B, S, K, H] order, and then
                also a whole copy of the cache at window S); the step's logits slots·V/t·4; W in
                the compute dtype when rollout.weight_dtype is not the compute dtype.
  logprobs  W; the π_old forward of every step, one micro-batch at a time, over the step's packed
            minibatches: n·M micro-batches of m rows, M = minibatches.micro_batches_bound over
            the R = Q·(K + m_max) sequences (tapo; Q·K for grpo), 39 bytes a token, rows over
            data x fsdp; the Rollouts (14 bytes a token) stay on one device.
  update    W; gradients 2P (the float32 accumulator plus one micro-batch's gradient), two gathered
            layers, the gathered lm_head D·V/t·e, the batch on device, and a micro-batch's
            activations:
    per layer kept for the backward  a = b·T·[(4D + 3nH + 3kH + 3f)·e + 8D] + A_saved
        (x, its norm, q, k, v, rotated q and k, the attention output, the mid residual, its norm,
        gate, up, silu(gate)·up in the compute dtype; the two norms keep an f32 copy of their input)
    no remat: L·a + a_bwd + head          remat: L·b·T·D·e + a + a_bwd + head
        a_bwd = b·T·(2D + 2f + 2nH)·e + A_peak - A_saved  (the cotangents of the layer in backward)
        head  = b·T·(D·(e + 4) + 3·C·4 + ⌈V/C⌉·16)  (final norm, chunked logprob scan, its carries)
  opsd      (algorithm=opsd) the update's loss also runs the teacher, forward only (stop-gradient
            params: nothing kept for the backward), on the micro-batch's m teacher rows of U tokens
            (`opsd.distiller.teacher_width`: opsd.max_len, or a 128-token template estimate +
            data.max_prompt_tokens + the solution + rollout.max_new_tokens, rounded up to 64):
            b·U·D·e (its final hidden states) + one forward layer + the segment mask; it reads
            no student activation and the compiler runs it first, so it adds only what it holds
            beyond the student's activations (`bench aot`, v5p, tests/test_aot.py's model with
            U = 1920 and 4096: the update grows by about the scan term alone); and its side of
            the divergence scan, kept through the backward, b·T·(D·e + 2·C·4) (its gathered
            hidden states, N = T slots a row, and its logits chunks in the rematerialized scan).
            The batch adds the teacher rows (12 bytes a token) and the distilled slots (17 bytes
            each, T a row); the logprobs phase runs only with opsd.grpo_coef > 0 (π_old is the
            GRPO term's).
  attention per layer (A_saved kept for the backward, A_peak live while it runs), by attention_impl:
    "" / xla   A_saved = b·n·T²·(8 + e, or 8 in f32)  A_peak = A_saved + 3·b·n·T²·4
               (scores and probabilities in f32, the probabilities again in the compute dtype)
    cudnn      A_saved = A_peak = b·n·T·4  (the fused kernel keeps the softmax statistics only)
    blockwise  A_saved = b·n·T·4   A_peak = b·n·T·(4 + 4H) + 2·b·k·T·H·4 + 5·b·n·β²·4
    splash     A_saved = A_peak = b·n·T·4  (its tiles live in VMEM, not HBM)
These are estimates of what XLA keeps live, not its exact buffer assignment: fusion can drop
some intermediates and the scheduler can overlap others; plan.usable (0.9) leaves the rest of HBM
for the runtime, fragmentation and what the formulas miss. `python -m tapo_jax.bench aot` prints
each phase next to the TPU compiler's own accounting (tests/test_aot.py: the weight sync, prefill
and decode phases within 15% on a small model).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from tapo_jax import minibatches, sharding
from tapo_jax.models import attention
from tapo_jax.models.kv_cache import CACHE_AXES
from tapo_jax.models.qwen import Qwen, QwenConfig, param_logical_axes
from tapo_jax.models.shapes import SHAPES
from tapo_jax.models.weights import CheckpointError, load_config

GiB = 2**30
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Device:
  """One accelerator chip as the planner sees it."""

  hbm_gib: float  # HBM per chip (nominal)
  kind: str  # tpu | gpu
  cores_per_chip: int  # slice names count TensorCores: v4-32 and v5p-32 are 16 chips
  chips_per_host: int  # chips of one host (TPU VM worker, GPU machine)


DEVICES = {
  "v4": Device(32, "tpu", 2, 4),
  "v5e": Device(16, "tpu", 1, 4),  # a v5e-8 is the one 8-chip host
  "v5p": Device(95, "tpu", 2, 4),
  "v6e": Device(32, "tpu", 1, 4),  # a v6e-8 is the one 8-chip host
  "h100": Device(80, "gpu", 1, 8),
  "h200": Device(141, "gpu", 1, 8),
}


class PlanError(ValueError):
  """A config the planner cannot plan; run() prints it on one line and returns 2."""


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # e.g. v5p-32 or v5p x 16
  device: str
  chips: int

  @property
  def hosts(self) -> int:
    d = DEVICES[self.device]
    if d.kind == "tpu" and d.cores_per_chip == 1 and self.chips <= 8:
      return 1  # v5e / v6e slices up to 8 chips are one host
    return max(1, -(-self.chips // d.chips_per_host))


def resolve_slice(device: str, chips: int = 0) -> Slice:
  """The Slice named "v5p-32" (TensorCores, as gcloud names slices) or "v5p" with `chips`."""
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+))?", device.lower())
  if not m or m.group(1) not in DEVICES:
    raise PlanError(
      f"config.plan.device={device!r}: expected one of {sorted(DEVICES)} or a slice "
      "name such as v5p-32"
    )
  name, d = m.group(1), DEVICES[m.group(1)]
  if m.group(2):
    cores = int(m.group(2))
    if cores % d.cores_per_chip:
      raise PlanError(
        f"config.plan.device={device!r}: {name} slices count {d.cores_per_chip} cores per chip"
      )
    from_name = cores // d.cores_per_chip
    if chips and chips != from_name:
      raise PlanError(f"config.plan.chips={chips} disagrees with {device} ({from_name} chips)")
    return Slice(device, name, from_name)
  chips = chips or d.chips_per_host
  return Slice(f"{name} x {chips}", name, chips)


def model_config(cfg) -> tuple[QwenConfig, str]:
  """(architecture, where it came from): plan.shape, else model.path's config.json, else toy."""
  if cfg.plan.shape:
    if cfg.plan.shape not in SHAPES:
      raise PlanError(f"config.plan.shape={cfg.plan.shape!r}: expected one of {sorted(SHAPES)}")
    return SHAPES[cfg.plan.shape], f"plan.shape={cfg.plan.shape}"
  if cfg.model.path:
    if not os.path.isdir(cfg.model.path):
      raise PlanError(
        f"config.model.path={cfg.model.path!r} does not exist here: set "
        f"--config.plan.shape to one of {sorted(SHAPES)}"
      )
    try:
      return load_config(cfg.model.path), cfg.model.path
    except CheckpointError as e:
      raise PlanError(str(e)) from None
  if cfg.model.toy:
    from tapo_jax import policy

    return load_config(policy.model_dir(cfg)), f"toy {cfg.model.toy} checkpoint"
  raise PlanError(
    f"config.model.path is empty: set it or --config.plan.shape to one of {sorted(SHAPES)}"
  )


@dataclasses.dataclass(frozen=True)
class Term:
  """One line of the report: bytes per device, what it is, and what to change if it dominates."""

  name: str
  bytes: int
  fix: str


@dataclasses.dataclass(frozen=True)
class Report:
  slice: Slice
  mesh: dict[str, int]
  source: str
  num_params: int
  phases: dict[str, tuple[Term, ...]]
  usable: float  # fraction of HBM the plan may fill
  notes: tuple[str, ...]

  @property
  def hbm(self) -> int:
    return int(DEVICES[self.slice.device].hbm_gib * GiB)

  def total(self, phase: str) -> int:
    return sum(t.bytes for t in self.phases[phase])

  @property
  def peak_phase(self) -> str:
    return max(self.phases, key=self.total)

  @property
  def peak(self) -> int:
    return self.total(self.peak_phase)

  @property
  def fits(self) -> bool:
    return self.peak <= self.usable * self.hbm

  def advice(self) -> str:
    """One line: the peak against the budget and the change the largest term calls for."""
    phase = self.peak_phase
    top = max(self.phases[phase], key=lambda t: t.bytes)
    return (
      f"{phase} phase needs {self.peak / GiB:.1f} GiB per device, more than "
      f"{self.usable:.0%} of {self.slice.name}'s {DEVICES[self.slice.device].hbm_gib:g} GiB; "
      f"largest term: {top.name} ({top.bytes / GiB:.1f} GiB): {top.fix}"
    )

  def render(self) -> str:
    d = DEVICES[self.slice.device]
    lines = [
      f"model   {self.source}: {self.num_params:,} parameters",
      f"slice   {self.slice.name}: {self.slice.chips} chips x {d.hbm_gib:g} GiB, "
      f"{self.slice.hosts} host(s)",
      "mesh    " + " ".join(f"{k}={v}" for k, v in self.mesh.items()),
    ]
    lines += [f"note    {n}" for n in self.notes]
    for phase, terms in self.phases.items():
      lines.append(f"{phase:<60s} {'GiB/device':>10s}")
      lines += [f"  {t.name:<58s} {t.bytes / GiB:10.2f}" for t in terms]
      lines.append(f"  {'total':<58s} {self.total(phase) / GiB:10.2f}")
    verdict = "fits" if self.fits else "DOES NOT FIT"
    lines.append(
      f"peak    {self.peak_phase}: {self.peak / GiB:.2f} GiB of {d.hbm_gib:g} GiB "
      f"({self.peak / self.hbm:.0%}; budget {self.usable:.0%}): {verdict}"
    )
    return "\n".join(lines)


def _split(dim: int, name: str, mesh) -> int:
  """How many ways `sharding.constrain` splits a dim of logical `name` (all mesh axes or none)."""
  axes = sharding.RULES[name]
  flat = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  ways = math.prod(mesh.shape[a] for a in flat)
  return ways if dim % ways == 0 else 1


def shard_elems(shape, names, mesh, rules=sharding.RULES) -> int:
  """Elements of one device's shard of an array whose dims carry logical `names`."""
  spec = sharding.fit_spec(sharding.logical_to_spec(names, rules), shape, mesh)
  n = 1
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    flat = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n *= dim // math.prod(mesh.shape[a] for a in flat)
  return n


def attention_bytes(impl: str, b: int, n: int, k: int, t: int, h: int, e: int) -> tuple[int, int]:
  """(A_saved, A_peak) per layer, per device, of the T-by-T-dependent attention terms."""
  if impl in ("", "xla"):
    saved = b * n * t * t * (8 + (e if e != 4 else 0))
    return saved, saved + 3 * b * n * t * t * 4
  if impl in ("cudnn", "splash"):
    return b * n * t * 4, b * n * t * 4
  blk = min(attention.BLOCK, t)
  return b * n * t * 4, b * n * t * (4 + 4 * h) + 2 * b * k * t * h * 4 + 5 * b * n * blk * blk * 4


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Per-device sizes of one config on one mesh (the legend's lower-case letters)."""

  cfg: QwenConfig
  mesh: jax.sharding.AbstractMesh
  n: int  # q-heads per device
  k: int  # kv-heads per device
  f: int  # mlp width per device
  tv: int  # ways the vocabulary is split
  dp: int  # data x fsdp
  e: int  # compute-dtype bytes
  impl: str  # the attention that actually runs (splash off TPU runs blockwise)

  def rows(self, r: int) -> int:
    """Rows per device of an activation with r rows (constrain: split over data x fsdp or not)."""
    return r // _split(r, "batch", self.mesh)

  def forward_layer(self, b: int, t: int, impl: str) -> int:
    """Live while one layer runs forward only (no backward), b rows of t tokens."""
    c, e = self.cfg, self.e
    _, a_peak = attention_bytes(impl, b, self.n, self.k, t, c.head_dim, e)
    d, h = c.hidden_size, c.head_dim
    return b * t * ((3 * d + 2 * self.n * h + 2 * self.k * h + 3 * self.f) * e + 4 * d) + a_peak

  def head(self, b: int, t: int, chunk: int) -> int:
    """The final norm and the chunked logprob scan (forward and its backward)."""
    d, v = self.cfg.hidden_size, self.cfg.vocab_size
    return b * t * (d * (self.e + 4) + 3 * chunk * 4 + -(-v // chunk) * 16)

  def activations(self, b: int, t: int, chunk: int, remat: bool) -> tuple[int, int]:
    """(bytes of one micro-batch's forward + backward, of which the attention terms)."""
    c, e, n, k, f = self.cfg, self.e, self.n, self.k, self.f
    d, h, layers = c.hidden_size, c.head_dim, c.num_hidden_layers
    a_saved, a_peak = attention_bytes(self.impl, b, n, k, t, h, e)
    layer = b * t * ((4 * d + 3 * n * h + 3 * k * h + 3 * f) * e + 8 * d) + a_saved
    layer_bwd = b * t * (2 * d + 2 * f + 2 * n * h) * e + a_peak - a_saved
    if remat:
      return layers * b * t * d * e + layer + layer_bwd + self.head(b, t, chunk), a_peak
    return layers * layer + layer_bwd + self.head(b, t, chunk), a_peak + (layers - 1) * a_saved


def _geometry(mc: QwenConfig, mesh, e: int, impl: str) -> Geometry:
  n_, k_, f_ = mc.num_attention_heads, mc.num_key_value_heads, mc.intermediate_size
  return Geometry(
    cfg=mc,
    mesh=mesh,
    n=n_ // _split(n_, "heads", mesh),
    k=k_ // _split(k_, "kv_heads", mesh),
    f=f_ // _split(f_, "mlp", mesh),
    tv=_split(mc.vocab_size, "vocab", mesh),
    dp=mesh.shape["data"] * mesh.shape["fsdp"],
    e=e,
    impl=impl,
  )


@dataclasses.dataclass(frozen=True)
class Sampler:
  """The engines' decode layout, per device (`sampler_layout`)."""

  mesh: jax.sharding.AbstractMesh  # (data, 1, tensor): weights over tensor, KV slots over data
  weights: int  # bytes of one device's decode copy of the weights
  itemsize: int  # bytes of rollout.weight_dtype
  own_copy: bool  # a copy beside the trainer's params (else the engines read those)


def decode_windows(smallest_bucket: int, max_len: int) -> tuple[int, ...]:
  """The engine's decode windows (`sampling.engine.decode_windows`): doubling from the smallest
  bucket (at least 16) to the cache length."""
  w, out = min(max_len, max(16, smallest_bucket)), []
  while w < max_len:
    out.append(w)
    w *= 2
  return (*out, max_len)


def sampler_layout(cfg, sl: Slice, mesh, model, layers: int) -> Sampler:
  """The engines' decode layout (tapo_jax.sampling.engine): the chips as (data, 1, tensor),
  tensor = rollout.decode_tensor or the largest divisor of the kv heads inside one host; weights
  in rollout.weight_dtype over tensor, replicated over data. One copy serves every engine; the
  loop makes it once per step (`Engines.sync`) and holds it through the step. The engines read
  the trainer's params instead when those already are that layout and dtype (and no one-step-off
  sampler needs its own)."""
  c = model.cfg
  try:
    t = sharding.decode_tensor(
      c.num_key_value_heads, sl.chips, sl.chips // sl.hosts, int(cfg.rollout.decode_tensor)
    )
  except ValueError as e:
    raise PlanError(f"config.{e}") from None
  dmesh = jax.sharding.AbstractMesh((sl.chips // t, 1, t), sharding.MESH_AXES)
  if cfg.rollout.weight_dtype not in DTYPES:
    raise PlanError(f"config.rollout.weight_dtype={cfg.rollout.weight_dtype!r}: expected one of "
                    f"{sorted(DTYPES)}")  # fmt: skip
  w = jnp.dtype(DTYPES[cfg.rollout.weight_dtype]).itemsize
  rules = sharding.DECODE_RULES
  _, weights = param_bytes(model, dmesh, w, rules)
  weights += (layers - 1) * param_bytes(model.layers[0], dmesh, w, rules)[1]
  p = jnp.dtype(DTYPES[cfg.model.param_dtype]).itemsize
  same = p == w and tuple(mesh.shape.values()) == tuple(dmesh.shape.values())
  return Sampler(dmesh, weights, w, not same or bool(cfg.rollout.async_steps))


def sampler_weights(sampler: Sampler) -> list[Term]:
  """The decode copy of the weights, where the engines hold one."""
  if not sampler.own_copy:
    return []
  t = sampler.mesh.shape["tensor"]
  name = f"sampler weights (decode copy, {sampler.itemsize * 8}-bit, tensor={t})"
  return [Term(name, sampler.weights, "rollout.weight_dtype=bfloat16 or a larger decode_tensor")]


def engine_terms(g: Geometry, sampler: Sampler, slots: int, bucket: int, new_tokens: int, smallest):
  """(decode terms, prefill terms) of one engine in the decode layout: the weights and decode
  state it holds, one decode step's temporaries, one prefill of the largest bucket; `g` is the
  decode mesh's geometry."""
  c, e, layers, mesh = g.cfg, g.e, g.cfg.num_hidden_layers, sampler.mesh
  k_, h, s = c.num_key_value_heads, c.head_dim, bucket + new_tokens
  rules = sharding.DECODE_RULES  # the engine's state: sharding.named_sharding with these rules
  cache = 2 * layers * e * shard_elems((slots, k_, s, h), CACHE_AXES, mesh, rules)
  rows = shard_elems((slots, s), ("batch", "cache_seq"), mesh, rules) // s
  window = ([0] + [w for w in decode_windows(smallest, s) if w < s])[-1]  # the largest below S
  fewer = f"fewer rollout.slots (now {slots}) or more chips"
  held = sampler_weights(sampler) + [
    Term(f"KV cache ({slots} slots x {s}, {e * 8}-bit)", cache, fewer),
    Term("decode rows (tokens, logprobs)", 8 * rows * s, fewer),
  ]
  converted = sampler.weights * e // sampler.itemsize if sampler.itemsize != e else 0
  # A window below S is sliced out of the cache and put back after the chunk: one copy of it. With
  # >= 2 kv-heads on a device the TPU compiler runs the loop with them second-minor ([B, S, K, H]
  # order): the slice is converted too (1.5 copies) and at window S the whole cache is copied.
  if g.k >= 2:
    loop_copy = max(3 * cache * window // (2 * s), cache)
  else:
    loop_copy = cache * window // s
  decode = held + [
    Term(f"weights in the compute dtype ({e * 8}-bit)", converted, "rollout.weight_dtype"),
    Term(f"decode window in the loop's layout (window {window or s} of {s})", loop_copy, fewer),
    Term("decode step logits", rows * c.vocab_size // g.tv * 4, fewer),
  ]
  p_rows = max(1, min(16, 16384 // bucket))  # QwenEngine.max_prefill_rows with its defaults
  p_rows = 1 << (p_rows.bit_length() - 1)
  pb = shard_elems((p_rows, bucket), ("batch", "seq"), mesh, rules) // bucket
  prefix = 2 * layers * e * shard_elems((p_rows, k_, bucket, h), CACHE_AXES, mesh, rules)
  d, f, n = c.hidden_size, g.f, g.n
  # one layer's activations as the TPU compiler fuses them (calibrated on bench aot)
  acts = pb * bucket * (2 * f + 2 * d + n * h + 2 * g.k * h) * e
  if g.impl in attention.MEMORY_EFFICIENT:  # prefill over the cache: blockwise
    blk = min(attention.BLOCK, bucket)
    acts += pb * n * blk * blk * 4
  else:
    acts += attention_bytes("", pb, n, g.k, bucket, h, e)[1]
  prefill = held + [
    Term(
      f"prefill of {p_rows} x {bucket} tokens (its KV, one layer)",
      prefix + acts,
      "model.attention_impl=blockwise or splash, or smaller rollout.prefill_buckets",
    ),
  ]
  return [t for t in decode if t.bytes], [t for t in prefill if t.bytes]


def segment_mask_bytes(impl: str, b: int, t: int, e: int) -> int:
  """The [b, 1, T, T] mask packed rows add where attention takes a mask (XLA; cuDNN also makes
  a bias of it in the compute dtype); blockwise and splash take segment ids (O(b·T))."""
  if impl in ("", "xla"):
    return b * t * t
  if impl == "cudnn":
    return b * t * t * (1 + e)
  return 0


def micro_batch_rows(cfg, g: Geometry, width: int) -> int:
  """m: the rows of a packed micro-batch, as the loop sizes it (minibatches)."""
  from tapo_jax import config as config_lib

  return minibatches.rows_per_micro_batch(config_lib.micro_batch_tokens(cfg, width), width, g.dp)


def update_terms(g: Geometry, cfg, params: int, mb: int, t: int) -> tuple[list[Term], list[str]]:
  """(terms, notes) of one jitted update: gradients and a packed micro-batch's activations (mb
  rows of t tokens)."""
  b, remat = g.rows(mb), bool(cfg.model.remat)
  acts, attn = g.activations(b, t, cfg.loss.vocab_chunk, remat)
  acts += segment_mask_bytes(g.impl, b, t, g.e)
  notes = []
  if b == mb and g.dp > 1:
    notes.append(
      f"a micro-batch of {mb} rows is not split over data x fsdp = {g.dp}: every device "
      "holds all its rows"
    )
    rows_fix = f"optim.micro_batch a multiple of {g.dp} (data x fsdp)"
  else:
    rows_fix = (
      f"a smaller optim.micro_batch_tokens (now {mb} rows x {t}) or sequence length (now {t})"
    )
  attn_fix = "model.attention_impl=splash (TPU), cudnn (GPU) or blockwise"
  fix = attn_fix if 2 * attn > acts else rows_fix if remat else "model.remat=True"
  other = g.activations(b, t, cfg.loss.vocab_chunk, not remat)[0]
  notes.append(
    f"activations of one micro-batch: remat={remat} {acts / GiB:.2f} GiB, "
    f"remat={not remat} {other / GiB:.2f} GiB; attention ({g.impl or 'xla'}) terms "
    f"{attn / 2**20:,.1f} MiB of them"
  )
  terms = [
    Term("gradients (accumulator + micro-batch)", 2 * params, "more chips"),
    Term(
      f"activations, {b} packed rows x {t} (remat={remat}, attention {g.impl or 'xla'})", acts, fix
    ),
  ]
  return terms, notes


def opsd_width(cfg, mc: QwenConfig) -> int:
  """U: the OPSD teacher rows' width as the Distiller sizes them, the template estimated."""
  from tapo_jax.opsd import distiller

  return distiller.teacher_width(cfg, distiller.OVERHEAD_ESTIMATE, mc.max_position_embeddings)


def teacher_terms(g: Geometry, cfg, mb: int, t: int, u: int) -> tuple[list[Term], str]:
  """(terms, note) of algorithm=opsd's teacher in the update's loss: its forward on the
  micro-batch's mb teacher rows of u tokens (forward only; it depends on no student activation,
  so the compiler runs it before the student's forward: it adds only what it holds beyond the
  student's activations), and its side of the divergence scan (kept through the backward)."""
  b, d, c = g.rows(mb), g.cfg.hidden_size, cfg.loss.vocab_chunk
  fwd = b * u * d * g.e + g.forward_layer(b, u, g.impl) + segment_mask_bytes(g.impl, b, u, g.e)
  student = g.activations(b, t, c, bool(cfg.model.remat))[0] + segment_mask_bytes(g.impl, b, t, g.e)
  beyond = max(0, fwd - student)
  fix = "a smaller opsd.max_len or optim.micro_batch_tokens"
  terms = [
    Term(f"OPSD teacher forward, {b} packed rows x {u} (beyond the student's)", beyond, fix),
    Term("OPSD teacher side of the divergence scan", b * t * (d * g.e + 2 * c * 4), fix),
  ]
  return terms, f"opsd: the teacher's forward holds {fwd / GiB:.2f} GiB while it runs"


def plan(cfg, device: str | None = None, chips: int | None = None) -> Report:
  """The per-device memory report of `cfg` (config.plan.mode: rl or sft) on `device` x `chips`
  (default: config.plan.device and config.plan.chips)."""
  sl = resolve_slice(device or cfg.plan.device, cfg.plan.chips if chips is None else chips)
  if cfg.plan.mode not in ("rl", "sft"):
    raise PlanError(f"config.plan.mode={cfg.plan.mode!r}: expected rl or sft")
  try:
    sizes = sharding.mesh_shape(dict(cfg.mesh), sl.chips)
  except ValueError as e:
    raise PlanError(f"config.{e} (planning for {sl.chips} chips)") from None
  mesh = jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES)
  for key in ("dtype", "param_dtype"):
    if cfg.model[key] not in DTYPES:
      raise PlanError(f"config.model.{key}={cfg.model[key]!r}: expected float32 or bfloat16")
  mc, source = model_config(cfg)
  impl = _attention_impl(cfg.model.attention_impl, sl, mc.head_dim)
  dtype, param_dtype = DTYPES[cfg.model.dtype], DTYPES[cfg.model.param_dtype]
  g = _geometry(mc, mesh, jnp.dtype(dtype).itemsize, impl)

  # layers are identical: a one-layer model gives the embeddings, the head and one layer
  one = dataclasses.replace(mc, num_hidden_layers=1)
  model = nnx.eval_shape(lambda: Qwen(one, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  p_bytes, layers = jnp.dtype(param_dtype).itemsize, mc.num_hidden_layers
  count, params = param_bytes(model, mesh, p_bytes)
  layer_count, layer_params = param_bytes(model.layers[0], mesh, p_bytes)
  num_params = count + (layers - 1) * layer_count
  params += (layers - 1) * layer_params
  tensor_only = jax.sharding.AbstractMesh((1, 1, sizes[2]), sharding.MESH_AXES)
  _, layer = param_bytes(model.layers[0], tensor_only, g.e)
  more = f"more chips (plan.chips > {sl.chips}) or model.param_dtype=bfloat16"
  state = [
    Term(f"params ({cfg.model.param_dtype})", params, more),
    Term("AdamW moments (2 x params)", 2 * params, more),
  ]
  gathered = Term("2 layers' weights gathered over fsdp", 2 * layer, "a larger config.mesh.tensor")
  head = Term(
    "lm_head gathered over fsdp",
    mc.hidden_size * mc.vocab_size // g.tv * g.e,
    "a larger config.mesh.tensor",
  )
  phases, notes = {}, []
  if cfg.plan.mode == "sft":
    t, rows = cfg.sft.max_len, cfg.sft.batch_size
    m = micro_batch_rows(cfg, g, t)
    fix = "a smaller sft.batch_size"
    # [M, m, T] packed: tokens, positions, segment ids (4 bytes each), the mask (1); M = ⌈rows / m⌉
    batch = Term(
      f"batch ({-(-rows // m)} x {m} packed rows x {t})", -(-rows // m) * g.rows(m) * t * 13, fix
    )
    terms, notes = update_terms(g, cfg, params, m, t)
    phases["update"] = state + [gathered, head, batch] + terms
    return _report(sl, sizes, source, num_params, phases, cfg, notes)

  sampler = sampler_layout(cfg, sl, mesh, model, layers)
  gd = _geometry(mc, sampler.mesh, g.e, impl)
  dm = sampler.mesh.shape
  copy = f"weights {cfg.rollout.weight_dtype}" if sampler.own_copy else "the trainer's params"
  notes.append(f"samplers decode as data={dm['data']} x tensor={dm['tensor']}, {copy}")
  buckets = sorted(cfg.rollout.prefill_buckets)
  engines = [("rollout", buckets[-1], cfg.rollout.max_new_tokens, buckets[0])]
  if cfg.algorithm == "tapo" and cfg.tapo.construction == "policy":
    from tapo_jax import config as config_lib
    from tapo_jax.tapo import synthesis

    longest = 512 + cfg.data.max_prompt_tokens + 2 * cfg.rollout.max_new_tokens
    synth_buckets = synthesis.prompt_buckets(longest)
    new = config_lib.synthesis_max_new_tokens(cfg)
    engines.append(("synthesis", synth_buckets[-1], new, synth_buckets[0]))
    notes.append(f"synthesis prompts assumed <= {longest} tokens (bucket {synth_buckets[-1]})")
  if sampler.own_copy:  # the reshard's temporaries: about one more copy (cast, then gathered)
    reshard = Term("weight sync temporaries", sampler.weights, "a larger rollout.decode_tensor")
    phases["weight sync"] = state + sampler_weights(sampler) + [reshard]
  for name, bucket, new, smallest in engines:
    decode, prefill = engine_terms(gd, sampler, cfg.rollout.slots, bucket, new, smallest)
    phases[f"{name} prefill"] = state + prefill
    phases[f"{name} decode"] = state + decode

  t = cfg.tapo.max_len
  opsd = cfg.algorithm == "opsd"
  extra = cfg.tapo.m_max if cfg.algorithm == "tapo" else 0
  r = cfg.rollout.batch_queries * (cfg.rollout.n + extra)
  n, m = cfg.optim.minibatches, micro_batch_rows(cfg, g, t)
  mm = minibatches.micro_batches_bound(r, n, m)
  # Rollouts' [R, T] fields (14 bytes a token) on one device; the packed TrainBatch (12 fields,
  # 39 bytes a token) as n minibatches of [M, m, T] on the mesh, rows over data x fsdp
  batch_bytes = r * t * 14 + n * mm * g.rows(m) * t * 39
  if opsd:  # + the teacher rows [M, m, U] (3 int32 fields) and the distilled slots [M, m, T]
    u = opsd_width(cfg, mc)
    batch_bytes += n * mm * g.rows(m) * (u * 12 + t * 17)
    notes.append(f"opsd: teacher rows of {u} tokens beside the {t}-token student rows")
  batch = Term(
    f"rollout batch + packed minibatches ({n} x {mm} x {m} x {t})",
    batch_bytes,
    "fewer rollout.batch_queries or a shorter tapo.max_len",
  )
  br = g.rows(m)  # the loop's pi_old pass: one micro-batch at a time
  fwd = br * t * mc.hidden_size * g.e + g.forward_layer(br, t, impl)
  fwd += g.head(br, t, cfg.loss.vocab_chunk) // 2  # forward only
  fwd += segment_mask_bytes(impl, br, t, g.e)
  old = Term(
    f"pi_old forward of {m} packed rows at a time",
    fwd,
    "a smaller optim.micro_batch_tokens",
  )
  # the loop keeps the step's decode copy of the weights through pi_old and the update
  if not opsd or cfg.opsd.grpo_coef:  # OPSD's π_old is its GRPO term's
    phases["logprobs"] = state + sampler_weights(sampler) + [batch, old, gathered, head]
  terms, more_notes = update_terms(g, cfg, params, m, t)
  if opsd:
    more, note = teacher_terms(g, cfg, m, t, u)
    terms, more_notes = terms + more, more_notes + [note]
  phases["update"] = state + sampler_weights(sampler) + [gathered, head, batch] + terms
  return _report(sl, sizes, source, num_params, phases, cfg, notes + more_notes)


def _report(sl, sizes, source, num_params, phases, cfg, notes) -> Report:
  return Report(
    slice=sl,
    mesh=dict(zip(sharding.MESH_AXES, sizes)),
    source=source,
    num_params=num_params,
    phases={
      name: tuple(dataclasses.replace(t, bytes=int(t.bytes)) for t in terms)
      for name, terms in phases.items()
    },
    usable=float(cfg.plan.usable),
    notes=tuple(notes),
  )


def _attention_impl(impl: str, sl: Slice, head_dim: int) -> str:
  """The attention that runs on this device for config.model.attention_impl (PlanError if none)."""
  impl = impl or ""
  try:
    attention.check_impl(impl)
  except ValueError as e:
    raise PlanError(f"config.model.{e}") from None
  kind = DEVICES[sl.device].kind
  if impl == "cudnn" and kind != "gpu":
    raise PlanError(
      f"config.model.attention_impl=cudnn needs an NVIDIA GPU, not {sl.device}: "
      "use splash (or blockwise)"
    )
  if impl == "splash" and (kind != "tpu" or head_dim % 128):
    return "blockwise"  # what models.attention runs for "splash" there
  return impl


def param_bytes(module, mesh, itemsize: int, rules=sharding.RULES) -> tuple[int, int]:
  """(parameter count, bytes of one device's shards at `itemsize` bytes each) of an abstract
  module, split by a rules table."""
  shapes = jax.tree.leaves(nnx.state(module, nnx.Param))
  axes = jax.tree.leaves(param_logical_axes(module), is_leaf=_is_axes)
  count = sum(math.prod(x.shape) for x in shapes)
  return count, itemsize * sum(shard_elems(x.shape, a, mesh, rules) for x, a in zip(shapes, axes))


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def run(cfg) -> int:
  """mode=plan: prints the report; 0 when it fits, 2 (one `error:` line) when not."""
  try:
    report = plan(cfg)
  except PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.render())
  if not report.fits:
    print(f"error: does not fit: {report.advice()}", file=sys.stderr)
    return 2
  return 0
