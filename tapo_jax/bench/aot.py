r"""Compiles a config's RL step for a TPU topology without a TPU: collectives per chip, compiled
memory next to the planner's, and a lower bound of one decode step.

python -m tapo_jax.bench aot --config=configs/qwen7b.py --topology=v5p:2x2x4 \
  --set plan.shape=qwen2.5-7b          # model.path is not on this machine: the planner's shape
python -m tapo_jax.bench aot --config=configs/smoke.py --topology=v5p:2x2x2 --set mesh.fsdp=8

Needs libtpu (the `tpu` extra; `make test` installs it), no TPU: `jax.experimental.topologies`
describes the slice's chips (v5p:2x2x4 is a v5p-32, v5e:8x8 a v5e-64, v6e:4x4 a v6e-16), the
programs are lowered against abstract inputs on a mesh of them (nothing is allocated, the weights
never exist) and compiled by the TPU compiler; JAX's own platform stays CPU.

Programs, built as the RL loop builds them (`sampling.engines.build_engines`, `train.step`):
  weight sync       `Engines.sync`: the trainer's params -> the decode copy every engine shares
                    (its layout, rollout.weight_dtype); none when the engines read the params
  <engine> prefill  one prefill call of the engine's largest bucket (`max_prefill_rows` prompts)
  <engine> decode   the engine's generate at window S (the cache length: where long rollouts spend
                    their steps) and at the largest window below S (its window copy); one per
                    engine the loop builds (rollout, synthesis, eval); --windows=all: every window
  pi_old            π_old of one minibatch: M micro-batches of m packed rows of W tokens
                    (algorithm=opsd: only with opsd.grpo_coef > 0, its GRPO term reads it)
  update            one jitted update of such a minibatch (its micro-batches scanned); with
                    algorithm=opsd an OpsdBatch, each micro-batch's m student rows with their m
                    teacher rows of U tokens (the planner's U: `plan.opsd_width`), the loss the
                    OPSD loss (the teacher's forward inside it, without gradient)
The synthesis engine is sized for a 512-token template, as the planner sizes it. Pallas kernels
(splash attention) are traced as on a TPU (`tpu_kernels`).

Collectives, per chip (the partitioned HLO's shapes are one chip's):
  count     instructions of the kind; an async -start/-done pair counts once (the -start)
  bytes     their result: the gathered array, the reduced array, the scattered piece, ...
  received  what one chip receives over ICI: all-gather result - operand; reduce-scatter
            operand - result; all-reduce 2(g-1)/g x operand (reduce-scatter then all-gather over a
            group of g); all-to-all (g-1)/g x operand; collective-permute its result
  scope     in a loop: the computations reachable from the body and condition of a `while` of the
            entry computation (a decode step: one iteration); whole program: every computation
            reachable from the entry. Each instruction counts once (a nested loop's body too).
XLA:CPU hoists loop-invariant collectives out of a while loop; the TPU compiler does not, so a
weight all-gather inside the decode loop runs once per generated token.

Memory, per chip, from `compiled.memory_analysis()` (the TPU compiler's buffer assignment, with
its tiled-layout padding): args, out, alias (outputs that reuse donated inputs), temp. A program's
phase total = live + out - alias + temp, where live is every array on the chip when it starts,
its arguments among them, from exact shapes and shardings: the train state; the decode copy of
the weights (the loop keeps it through the step); the decode state (it lives through a generate
call's prefills); the step's minibatches beside π_old and the update. The
planner's total of the same phase (`tapo_jax.plan`: weight sync, <engine> prefill, <engine>
decode, logprobs, update) is printed next to it.

Decode step lower bound, per chip: HBM = (the engine's weights + the KV window of every slot) /
HBM bandwidth; ICI = bytes received in one decode step / ICI bandwidth (public per-chip figures,
BANDWIDTH); the step takes at least the larger. Weights and KV window come from the engine's
shardings; the bytes received from the compiled decode loop (the same at every window: the window
copy is outside the loop).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import glob
import importlib.util
import inspect
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any
from unittest import mock

# Before JAX loads: JAX itself stays on CPU; libtpu is loaded only to compile. Off a TPU VM,
# libtpu probes the metadata server for its host and accelerator type and logs errors when it
# finds none: these two settings answer it (a TPU VM's own values are never overridden).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

GB = 1e9
MB = 1e6
GiB = 2**30

# Per chip, public figures: HBM bandwidth and ICI bandwidth (all links, one direction), GB/s.
BANDWIDTH = {
  "v4": (1228, 300),
  "v5e": (819, 200),
  "v5p": (2765, 600),
  "v6e": (1640, 448),
}

# ---- HLO text -----------------------------------------------------------------------------------

KINDS = (
  "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
  "collective-permute", "collective-broadcast",
)  # fmt: skip
_ARRAY = re.compile(r"\b(f8e\w+|pred|bf16|[suf]\d+|c64|c128)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(
  r"\b(?:calls|to_apply|body|condition|true_computation|false_computation|select|scatter|"
  r"comparator)=%?([\w.\-]+)"
)
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def _itemsize(dtype: str) -> float:
  if dtype in ("pred",) or dtype.startswith("f8"):
    return 1
  if dtype == "bf16":
    return 2
  if dtype in ("c64", "c128"):
    return int(dtype[1:]) // 8
  return int(dtype[1:]) / 8


def type_bytes(text: str) -> int:
  """Bytes of an HLO type (an array, or every array of a tuple); layouts are ignored."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(text):
    total += _itemsize(dtype) * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if not depth:
        return i
  raise ValueError(f"unbalanced HLO: {text[start : start + 80]!r}")


def tuple_elements(type_text: str) -> list[str]:
  """The top-level elements of a tuple type "(a, (b, c), d)" (a non-tuple type: itself)."""
  t = re.sub(r"/\*.*?\*/", "", type_text).strip()
  if not t.startswith("("):
    return [t]
  inner, out, depth, last = t[1 : _closing(t, 0)], [], 0, 0
  for i, ch in enumerate(inner):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and not depth:
      out.append(inner[last:i].strip())
      last = i + 1
  return out + [inner[last:].strip()] if inner.strip() else out


@dataclasses.dataclass(frozen=True)
class Instr:
  name: str
  type: str  # the result type as printed
  opcode: str
  operands: tuple[str, ...]
  attrs: str  # everything after the operand list
  calls: tuple[str, ...]  # computations it calls


@dataclasses.dataclass(frozen=True)
class Module:
  computations: dict[str, tuple[Instr, ...]]
  entry: str
  partitions: int  # devices of the SPMD program


def _instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2).strip()
  if rest.startswith("("):
    end = _closing(rest, 0)
    type_text, rest = rest[: end + 1], rest[end + 1 :].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  end = _closing(rest, op.end() - 1)
  operands = tuple(re.findall(r"%([\w.\-]+)", rest[op.end() : end]))
  attrs = rest[end + 1 :]
  attrs_no_meta = re.sub(r'metadata=\{[^}]*\}|backend_config=(\{.*\}|"[^"]*")', "", attrs)
  calls = _CALLS.findall(attrs_no_meta)
  for group in _CALL_LISTS.findall(attrs_no_meta):
    calls += re.findall(r"%?([\w.\-]+)", group)
  return Instr(name, type_text, op.group(1), operands, attrs, tuple(calls))


def parse_hlo(text: str) -> Module:
  """The computations of an HLO module's text (`compiled.as_text()`), by name."""
  comps: dict[str, tuple[Instr, ...]] = {}
  entry, current, body = "", None, []
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current, body = m.group(2), []
        if m.group(1):
          entry = current
    elif line.startswith("}"):
      comps[current] = tuple(body)
      current = None
    else:
      ins = _instr(line)
      if ins is not None:
        body.append(ins)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  m = re.search(r"num_partitions=(\d+)", text)
  return Module(comps, entry, int(m.group(1)) if m else 1)


def group_size(attrs: str, partitions: int) -> int:
  """Devices in one replica group of a collective (all of them when the groups are empty)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:  # iota list: [groups, group size]
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:  # explicit: {{0,1,2,3},{4,5,6,7}}
    return len(m.group(1).split(","))
  return partitions


@dataclasses.dataclass(frozen=True)
class Collective:
  """Instructions of one kind, summed (per chip)."""

  kind: str
  count: int
  bytes: int  # result bytes
  received: int  # bytes received over ICI

  def __add__(self, other: Collective) -> Collective:
    return Collective(
      self.kind, self.count + other.count, self.bytes + other.bytes, self.received + other.received
    )


def _kind(opcode: str) -> str | None:
  if opcode.endswith("-done"):
    return None
  base = opcode.removesuffix("-start")
  if base in KINDS or base.startswith(("all-", "collective-")):
    return base
  return None


def _one(ins: Instr, symbols: Mapping[str, str], partitions: int) -> Collective:
  kind = _kind(ins.opcode)
  operand = sum(type_bytes(symbols.get(o, "")) for o in ins.operands)
  if ins.opcode in ("all-gather-start", "collective-permute-start"):
    result = type_bytes(tuple_elements(ins.type)[1])  # (operands, results[, contexts])
  else:
    result = type_bytes(ins.type)
  g = group_size(ins.attrs, partitions)
  received = {
    "all-gather": result - operand,
    "reduce-scatter": operand - result,
    "all-reduce": 2 * (g - 1) / g * operand,
    "all-to-all": (g - 1) / g * operand,
    "ragged-all-to-all": (g - 1) / g * operand,
  }.get(kind, result)
  return Collective(kind, 1, result, int(max(received, 0)))


def _reachable(module: Module, roots) -> set[str]:
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in module.computations:
      continue
    seen.add(name)
    todo += [c for ins in module.computations[name] for c in ins.calls]
  return seen


def loop_computations(module: Module) -> set[str]:
  """The computations a while loop runs per iteration: everything reachable from the body and
  condition of each `while` outside any loop (the entry's, or of what the entry calls)."""
  outside, todo, roots = set(), [module.entry], []
  while todo:
    name = todo.pop()
    if name in outside or name not in module.computations:
      continue
    outside.add(name)
    for ins in module.computations[name]:
      if ins.opcode == "while":
        roots += list(ins.calls)
      else:
        todo += list(ins.calls)
  return _reachable(module, roots)


def collectives(hlo_text: str, in_loop: bool = True) -> dict[str, Collective]:
  """{kind: Collective} per chip of an HLO module: inside its while loops (one iteration) or in
  the whole program (definitions: this module's docstring)."""
  module = parse_hlo(hlo_text)
  names = loop_computations(module) if in_loop else _reachable(module, [module.entry])
  out: dict[str, Collective] = {}
  for name in sorted(names):
    instrs = module.computations[name]
    symbols = {ins.name: ins.type for ins in instrs}
    for ins in instrs:
      if _kind(ins.opcode):
        c = _one(ins, symbols, module.partitions)
        out[c.kind] = out[c.kind] + c if c.kind in out else c
  return out


# ---- topology -----------------------------------------------------------------------------------


def libtpu_missing() -> str:
  """Why deviceless TPU compiles cannot run here ("" when they can)."""
  if importlib.util.find_spec("libtpu") is None:
    return 'libtpu is not installed: pip install -e ".[tpu]" (make test installs it)'
  return ""


def parse_topology(name: str) -> tuple[str, int]:
  """("v5p", 16) for "v5p:2x2x4": the planner's device name and the chip count."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", name)
  if not m:
    raise ValueError(f"--topology={name!r}: expected e.g. v5p:2x2x4, v5e:8x8, v6e:4x4")
  return m.group(1), math.prod(int(d) for d in m.group(2).split("x"))


@functools.cache
def topology_devices(name: str) -> tuple:
  """The chips of a TPU topology, as devices to compile for (no TPU needed)."""
  why = libtpu_missing()
  if why:
    raise RuntimeError(why)
  from jax.experimental import topologies

  return tuple(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)


# ---- the programs -------------------------------------------------------------------------------


def load_config(path: str, overrides=()):
  """get_config() of a config file, with KEY=VALUE overrides (values as Python literals, else
  strings)."""
  spec = importlib.util.spec_from_file_location("aot_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node, *path = key.split(".")[::-1]
    target = cfg
    for part in reversed(path):
      target = target[part]
    if node not in target:
      raise ValueError(f"--set {item!r}: the config has no key {key!r}")
    target[node] = type(target[node])(value) if isinstance(target[node], float) else value
  return cfg


def _abstract(tree, shardings):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def device_bytes(tree) -> int:
  """Bytes of one chip's shards of an abstract tree (ShapeDtypeStructs with shardings)."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass
class Setup:
  """Everything abstract the programs are lowered against."""

  cfg: Any
  topology: str
  device: str  # planner name: v5p, v5e, ...
  mesh: jax.sharding.Mesh
  source: str  # where the architecture came from
  graphdef: Any
  params: Any  # the trainer's params, abstract, sharded
  state: Any  # TrainState, abstract, sharded
  state_sharding: Any
  optimizer: Any
  engines: Any  # sampling.engines.Engines


def setup(cfg, topology: str) -> Setup:
  """The mesh over the topology's chips, the abstract policy, train state and engines."""
  from tapo_jax import plan as plan_lib
  from tapo_jax import sharding
  from tapo_jax.models.qwen import Qwen
  from tapo_jax.sampling import engines as engines_lib
  from tapo_jax.tapo import synthesis
  from tapo_jax.train import state as state_lib

  device, chips = parse_topology(topology)
  devices = topology_devices(topology)
  if len(devices) != chips:
    raise ValueError(f"{topology}: {len(devices)} devices, expected {chips}")
  mesh = sharding.make_mesh(dict(cfg.mesh), devices)
  mc, source = plan_lib.model_config(cfg)
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(
      lambda: Qwen(
        mc,
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        remat=cfg.model.remat,
        attention_impl=cfg.model.attention_impl or None,
        rngs=nnx.Rngs(0),
      )
    )
  graphdef, params = nnx.split(model, nnx.Param)
  params = _abstract(params, sharding.param_shardings(params, mesh))
  steps = cfg.train.steps * cfg.optim.ppo_epochs * cfg.optim.minibatches
  optimizer = state_lib.make_optimizer(cfg.optim, steps)
  opt_sharding = sharding.opt_shardings(
    optimizer, params, sharding.param_shardings(params, mesh), mesh
  )
  rep = sharding.replicated(mesh)
  i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  opt_state = _abstract(jax.eval_shape(optimizer.init, params), opt_sharding)
  state = state_lib.TrainState(step=i32, params=params, opt_state=opt_state, skipped=i32)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  template = None
  if cfg.algorithm == "tapo" and cfg.tapo.construction == "policy":
    template = synthesis.Template(pieces=((0,) * 512,), names=())  # the planner's estimate
  engines = engines_lib.build_engines(cfg, model, mesh, template)
  return Setup(cfg, topology, device, mesh, source, graphdef, params, state, state_sharding,
               optimizer, engines)  # fmt: skip


def engine_params(s: Setup, engine):
  """The params an engine's jitted calls take: its decode copy (the engine's layout and weight
  dtype, `QwenEngine.load_params`)."""
  leaves = [
    jax.ShapeDtypeStruct(x.shape, engine._weight_dtype(x.dtype), sharding=t)
    for x, t in zip(jax.tree.leaves(s.params), jax.tree.leaves(engine.param_shardings))
  ]
  return jax.tree.unflatten(jax.tree.structure(engine.param_shardings), leaves)


def sampler_weight_bytes(s: Setup) -> int:
  """Bytes per chip of the engines' weights beyond the trainer's params: the decode copy, which
  every engine shares and the loop keeps through the step (0 when the engine reads the trainer's
  arrays as they are: same layout and dtype, and no one-step-off copy)."""
  engine = s.engines.rollout
  target = jax.tree.leaves(engine_params(s, engine))
  same = all(
    x.dtype == t.dtype and x.sharding.is_equivalent_to(t.sharding, len(x.shape))
    for x, t in zip(jax.tree.leaves(s.params), target)
  )
  return 0 if same and not s.cfg.rollout.async_steps else device_bytes(target)


@dataclasses.dataclass
class Program:
  """One compiled program and what the chip holds when it runs."""

  name: str
  phase: str | None  # the planner's phase (None: the planner has none for it)
  compiled: Any  # jax.stages.Compiled, or the exception its trace or compile raised
  seconds: float  # compile time
  live: int  # bytes per chip on the chip when it starts, its arguments among them
  loop: bool = False  # a decode: its collectives are counted per loop iteration
  engine: str = ""
  window: int = 0

  @property
  def error(self) -> str:
    """The exception's type and first line ("" when it compiled)."""
    if not isinstance(self.compiled, Exception):
      return ""
    first = (str(self.compiled).strip().splitlines() or [""])[0]
    return f"{type(self.compiled).__name__}: {first}"

  @functools.cached_property
  def memory(self) -> dict[str, int]:
    m = self.compiled.memory_analysis()
    return dict(
      args=m.argument_size_in_bytes,
      out=m.output_size_in_bytes,
      alias=m.alias_size_in_bytes,
      temp=m.temp_size_in_bytes,
    )

  @property
  def total(self) -> int:
    m = self.memory
    return self.live + m["out"] - m["alias"] + m["temp"]

  @functools.cached_property
  def collectives(self) -> dict[str, Collective]:
    return collectives(self.compiled.as_text(), in_loop=self.loop)


def _timed_compile(lower, *args, **kwargs) -> tuple[Any, float]:
  """(lower(*args, **kwargs) compiled, or the exception that stopped its trace or compile;
  seconds)."""
  t = time.time()
  try:
    compiled = lower(*args, **kwargs).compile()
  except Exception as e:  # noqa: BLE001 - reported in its program's row; the others still run
    compiled = e
  return compiled, time.time() - t


def decode_windows(engine, which: str) -> tuple[int, ...]:
  """The windows to compile: "peak" (S and the largest below it) or "all" (every window)."""
  if which == "all":
    return engine.windows
  below = [w for w in engine.windows if w < engine.max_len]
  return tuple(sorted({engine.max_len, *below[-1:]}))


def _sampling(s: Setup):
  from tapo_jax.sampling import engines as engines_lib

  return engines_lib.rollout_sampling(s.cfg, (0, 1))  # two stand-in EOS ids


def engine_programs(s: Setup, windows: str = "peak", only=None) -> dict[str, Program]:
  """Prefill and decode of every engine the loop builds (`only`: these purposes)."""
  from tapo_jax import sharding
  from tapo_jax.sampling import driver

  steps = inspect.signature(driver.generate).parameters["steps_per_sync"].default
  state_bytes, weights = device_bytes(s.state), sampler_weight_bytes(s)
  out = {}
  for purpose, engine in s.engines.unique().items():
    if only is not None and purpose not in only:
      continue
    planned = purpose in ("rollout", "synthesis")
    params = engine_params(s, engine)
    dstate = jax.eval_shape(engine._zero_state, jnp.zeros((2,), jnp.uint32))
    dstate = _abstract(dstate, engine.state_shardings)
    live = state_bytes + weights + device_bytes(dstate)
    bucket = engine.buckets[-1]
    rows = engine.max_prefill_rows(bucket)
    rep = sharding.replicated(engine.mesh)
    tokens = jax.ShapeDtypeStruct((rows, bucket), jnp.int32, sharding=rep)
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep)
    with jax.set_mesh(engine.mesh):
      compiled, secs = _timed_compile(engine._prefill_jit.lower, params, tokens, lengths)
    name = f"{purpose} prefill {rows}x{bucket}"
    phase = f"{purpose} prefill" if planned else None
    live_prefill = live + device_bytes((tokens, lengths))
    out[name] = Program(name, phase, compiled, secs, live_prefill, engine=purpose)
    for w in decode_windows(engine, windows):
      with jax.set_mesh(engine.mesh):
        compiled, secs = _timed_compile(
          engine._generate_jit.lower, params, dstate, sampling=_sampling(s), steps=steps, window=w
        )
      name = f"{purpose} decode window {w}"
      phase = f"{purpose} decode" if planned else None
      out[name] = Program(name, phase, compiled, secs, live, loop=True, engine=purpose, window=w)
  return out


def minibatch(s: Setup):
  """(one minibatch as the loop places it: a TrainBatch [M, m, W] of packed rows over the data
  axes, abstract; how many the step holds). Sized for the most sequences a step can have,
  R = Q·(K + m_max) (tapo), every one a row of its own (`micro_batches_bound`)."""
  import numpy as np

  from tapo_jax import config as config_lib
  from tapo_jax import minibatches, sharding
  from tapo_jax.tapo import batch as batch_lib
  from tapo_jax.tapo import loss as loss_lib

  cfg = s.cfg
  if cfg.algorithm not in ("tapo", "grpo", "opsd"):
    raise ValueError(f"bench aot: algorithm={cfg.algorithm!r} is not built here")
  extra = cfg.tapo.m_max if cfg.algorithm == "tapo" else 0
  r, n, w = (
    cfg.rollout.batch_queries * (cfg.rollout.n + extra),
    cfg.optim.minibatches,
    cfg.tapo.max_len,
  )
  m = minibatches.rows_per_micro_batch(
    config_lib.micro_batch_tokens(cfg, w), w, sharding.data_parallel_size(s.mesh)
  )
  mm = minibatches.micro_batches_bound(r, n, m)
  ones = [[1]] * r
  packed = batch_lib.pack_rollouts(
    ones, ones, [np.zeros(1, np.float32)] * r, samples_per_prompt=1, max_len=w,
    eos_ids=(0,), max_new_tokens=cfg.rollout.max_new_tokens, rewards=np.zeros(r, np.float32),
  )  # fmt: skip
  loss_cfg = loss_lib.LossConfig.from_config(cfg)
  train = jax.eval_shape(lambda b: loss_lib.prepare_batch(b, loss_cfg)[0], packed)  # [R, W]
  part = jax.tree.map(lambda x: jax.ShapeDtypeStruct((mm, m, w), x.dtype), train)
  if cfg.algorithm == "opsd":  # + the teacher rows [M, m, U] and the distilled slots [M, m, W]
    from tapo_jax import plan as plan_lib
    from tapo_jax.opsd import OpsdBatch

    u = plan_lib.opsd_width(cfg, plan_lib.model_config(cfg)[0])
    row = lambda width, dtype: jax.ShapeDtypeStruct((mm, m, width), dtype)  # noqa: E731
    i32 = jnp.int32
    part = OpsdBatch(
      **{f.name: getattr(part, f.name) for f in dataclasses.fields(part)},
      teacher_tokens=row(u, i32), teacher_positions=row(u, i32), teacher_segment_ids=row(u, i32),
      student_index=row(w, i32), teacher_index=row(w, i32), targets=row(w, i32),
      distill_mask=row(w, jnp.bool_), distill_scale=row(w, jnp.float32),
    )  # fmt: skip
  return _abstract(part, sharding.batch_shardings(part, s.mesh, row_axis=1)), n


def trainer_programs(s: Setup) -> dict[str, Program]:
  """π_old of a minibatch and one update, as the loop calls them (every minibatch on the mesh,
  the decode copy of the weights held through the step)."""
  from tapo_jax.tapo import loss as loss_lib
  from tapo_jax.train import step as step_lib

  cfg = s.cfg
  loss_cfg = loss_lib.LossConfig.from_config(cfg)
  part, n = minibatch(s)
  live = device_bytes(s.state) + sampler_weight_bytes(s) + n * device_bytes(part)
  shape = "x".join(map(str, part.tokens.shape))
  old = step_lib.make_old_logprobs(s.graphdef, cfg.loss.vocab_chunk, loss_cfg.temperature)
  loss_fn = functools.partial(loss_lib.tapo_loss, cfg=loss_cfg)
  out = {}
  if cfg.algorithm == "opsd":
    from tapo_jax.opsd import loss as opsd_loss

    loss_fn = functools.partial(opsd_loss.opsd_loss, cfg=opsd_loss.OpsdConfig.from_config(cfg))
  with jax.set_mesh(s.mesh):
    if cfg.algorithm != "opsd" or cfg.opsd.grpo_coef:  # OPSD's π_old is its GRPO term's
      compiled, secs = _timed_compile(old.lower, s.params, part)
      out[f"pi_old {shape}"] = Program(f"pi_old {shape}", "logprobs", compiled, secs, live)
    step = step_lib.make_train_step(
      s.graphdef,
      s.optimizer,
      loss_fn,
      s.state_sharding,
      max_update_ratio=cfg.optim.max_update_ratio,
    )
    compiled, secs = _timed_compile(step.lower, s.state, part)
  out[f"update {shape}"] = Program(f"update {shape}", "update", compiled, secs, live)
  return out


def sync_programs(s: Setup) -> dict[str, Program]:
  """The weight sync (`Engines.sync`: the trainer's params -> the decode copy every engine
  shares), when the engines hold a copy."""
  if not sampler_weight_bytes(s):
    return {}
  engine = s.engines.rollout
  copy = bool(s.cfg.rollout.async_steps)
  with jax.set_mesh(engine.mesh):
    compiled, secs = _timed_compile(engine._sync_jit.lower, jax.tree.leaves(s.params), copy=copy)
  name = "weight sync"
  return {name: Program(name, "weight sync", compiled, secs, device_bytes(s.state))}


@contextlib.contextmanager
def tpu_kernels():
  """Traces as on a TPU: `models.attention` picks its Pallas kernels (splash) by the default
  backend, which stays CPU here; inside this context it picks them as a TPU backend would."""
  from tapo_jax.models import attention

  compiled_kernel = functools.partial(attention.splash_attention, interpret=False)
  with (
    mock.patch.object(attention, "splash_applies", lambda head_dim: head_dim % 128 == 0),
    mock.patch.object(attention, "splash_attention", compiled_kernel),
  ):
    yield


def programs(s: Setup, windows: str = "peak", log=None) -> dict[str, Program]:
  """Every program of the RL step of `s`, compiled (`log`: called with a line per program)."""
  out = {}
  with tpu_kernels():
    for part in (sync_programs, engine_programs, trainer_programs):
      kw = dict(windows=windows) if part is engine_programs else {}
      for name, p in part(s, **kw).items():
        out[name] = p
        if log:
          log(f"{name}: " + (f"error: {p.error}" if p.error else f"compiled in {p.seconds:.1f}s"))
  return out


def compile_programs(cfg, topology: str, windows: str = "peak") -> dict[str, Program]:
  """Every program of the config's RL step, compiled for `topology` (e.g. "v5p:2x2x4")."""
  return programs(setup(cfg, topology), windows)


# ---- the report ---------------------------------------------------------------------------------


def human(n: float) -> str:
  """Decimal bytes: 34 KB, 8.7 MB, 2.69 GB."""
  for unit, size in (("GB", GB), ("MB", MB), ("KB", 1e3)):
    if abs(n) >= size:
      value = n / size
      return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
  return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class StepBound:
  """One decode step's lower bound on one chip at one window."""

  engine: str
  window: int
  weights: int  # bytes read from HBM per step: the engine's weights
  kv: int  # and the KV window of every slot
  received: int  # bytes received over ICI per step
  hbm_s: float
  ici_s: float

  @property
  def bound_s(self) -> float:
    return max(self.hbm_s, self.ici_s)


def step_bounds(s: Setup, progs: Mapping[str, Program]) -> list[StepBound]:
  """A decode step's lower bound for every window of every engine whose decode was compiled."""
  hbm_bw, ici_bw = BANDWIDTH[s.device]
  out = []
  for purpose, engine in s.engines.unique().items():
    decodes = [p for p in progs.values() if p.loop and p.engine == purpose and not p.error]
    if not decodes:
      continue
    received = max(sum(c.received for c in p.collectives.values()) for p in decodes)
    weights = device_bytes(engine_params(s, engine))
    cache = engine.state_shardings.cache
    dstate = jax.eval_shape(engine._zero_state, jnp.zeros((2,), jnp.uint32))
    full = device_bytes(_abstract(dstate.cache, cache))
    for w in engine.windows:
      kv = full * w // engine.max_len
      out.append(StepBound(purpose, w, weights, kv, received, (weights + kv) / (hbm_bw * GB),
                           received / (ici_bw * GB)))  # fmt: skip
  return out


def render(s: Setup, progs: Mapping[str, Program], report=None) -> str:
  """The three tables: collectives, memory next to the planner's phases, decode step bounds."""
  mesh = " ".join(f"{k}={v}" for k, v in s.mesh.shape.items())
  n, dm = len(s.mesh.devices.flat), s.engines.rollout.mesh.shape
  lines = [
    f"topology {s.topology}: {n} chips ({s.mesh.devices.flat[0].device_kind}), mesh {mesh}",
    f"model    {s.source}, params {s.cfg.model.param_dtype}, compute {s.cfg.model.dtype}, "
    f"attention {s.cfg.model.attention_impl or 'xla'}",
    f"engines  {', '.join(s.engines.unique())}: decode layout data={dm['data']} x "
    f"tensor={dm['tensor']}, weights {s.cfg.rollout.weight_dtype}, decode copy "
    f"{human(sampler_weight_bytes(s))} per chip",
    "",
    "collectives per chip (decode: one step, inside its while loop; the rest: the whole program)",
    f"  {'program':<34s} {'kind':<20s} {'count':>6s} {'bytes':>10s} {'received':>10s}",
  ]
  for name, p in progs.items():
    label = name + (" /step" if p.loop else "")
    if p.error:
      lines.append(f"  {label:<34s} error: {p.error[:120]}")
      continue
    cs = p.collectives
    if not cs:
      lines.append(f"  {label:<34s} {'(none)':<20s} {0:>6d} {'-':>10s} {'-':>10s}")
    for i, c in enumerate(sorted(cs.values(), key=lambda c: -c.received)):
      lines.append(f"  {label if not i else '':<34s} {c.kind:<20s} {c.count:>6d} "
                   f"{human(c.bytes):>10s} {human(c.received):>10s}")  # fmt: skip
    if len(cs) > 1:
      total = functools.reduce(lambda a, b: a + b, cs.values())
      lines.append(f"  {'':<34s} {'total':<20s} {total.count:>6d} {human(total.bytes):>10s} "
                   f"{human(total.received):>10s}")  # fmt: skip
  ok = [p for p in progs.values() if not p.error]
  unit, size = ("GiB", GiB) if max([p.total for p in ok] + [0]) >= GiB else ("MiB", 2**20)
  lines += [
    "",
    f"memory per chip, {unit} (compiled: the TPU compiler's buffer assignment; phase = live + "
    "out - alias + temp; planner: its total of that phase)",
    f"  {'program':<34s} {'args':>7s} {'out':>7s} {'alias':>7s} {'temp':>7s} {'live':>8s} "
    f"{'phase':>7s}  {'planner':<18s} {'':>7s} {'ratio':>5s}",
  ]
  for name, p in progs.items():
    if p.error:
      lines.append(f"  {name:<34s} error (above)")
      continue
    m = {k: v / size for k, v in p.memory.items()}
    planned = ""
    if report is not None and p.phase in report.phases:
      est = report.total(p.phase)
      planned = f"{p.phase:<18s} {est / size:7.2f} {est / p.total:5.2f}"
    lines.append(
      f"  {name:<34s} {m['args']:7.2f} {m['out']:7.2f} {m['alias']:7.2f} {m['temp']:7.2f} "
      f"{p.live / size:8.2f} {p.total / size:7.2f}  {planned}"
    )
  hbm_bw, ici_bw = BANDWIDTH[s.device]
  lines += [
    "",
    f"decode step lower bound per chip ({s.device}: HBM {hbm_bw} GB/s, ICI {ici_bw} GB/s): "
    "max(weights + KV window over HBM, received over ICI)",
    f"  {'engine':<10s} {'window':>7s} {'weights':>10s} {'KV window':>10s} {'HBM ms':>7s} "
    f"{'received':>10s} {'ICI ms':>7s} {'bound ms':>8s}",
  ]
  for b in step_bounds(s, progs):
    lines.append(
      f"  {b.engine:<10s} {b.window:>7d} {human(b.weights):>10s} {human(b.kv):>10s} "
      f"{b.hbm_s * 1e3:7.3f} {human(b.received):>10s} {b.ici_s * 1e3:7.3f} {b.bound_s * 1e3:8.3f}"
    )
  return "\n".join(lines)


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.bench aot")
  p.add_argument("--config", default="configs/qwen7b.py")
  p.add_argument("--topology", default="v5p:2x2x4", help="e.g. v5p:2x2x4 (v5p-32), v5e:8x8")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
  p.add_argument(
    "--windows",
    choices=("peak", "all"),
    default="peak",
    help="decode windows to compile: S and the largest below it, or every one",
  )
  return p.parse_args(argv)


def main(argv) -> int:
  from tapo_jax import plan as plan_lib

  args = _flags(argv)
  why = libtpu_missing()
  if why:
    print(f"error: {why}", file=sys.stderr)
    return 2
  try:
    cfg = load_config(args.config, args.set)
    s = setup(cfg, args.topology)
    report = plan_lib.plan(cfg, device=s.device, chips=len(s.mesh.devices.flat))
  except (ValueError, plan_lib.PlanError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  progs = programs(s, args.windows, log)
  print(render(s, progs, report))
  return 0
