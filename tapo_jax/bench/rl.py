r"""The whole RL step of a config, stage by stage: one-step-off overlap vs the synchronous loop.

python -m tapo_jax.bench rl                                       # configs/smoke.py, 10 steps
python -m tapo_jax.bench rl --config=configs/smoke.py --steps=10 --async=0,1 --devices=8 \
  --set rollout.sampler_devices=4 --set optim.micro_batch=8

Each variant is the real CLI (`python -m tapo_jax.main`) in its own process on a fresh workdir, so
every compilation is counted. From its metrics.jsonl: the first step's time (mostly compiles),
then over steps 3..N the min / median / max of each stage (rollout sampling, reward, the wait for
rollouts, construction incl. the policy's synthesis generation, advantages + π_old, update, the
whole step), rollout and train tokens/s, and the compilations after step 2 (any is a bug: a shape
or static argument changed). With more than one variant, the ratio of median step times against
the first variant. --set KEY=VALUE passes --config.KEY=VALUE to every variant; `async_steps=1`
also needs rollout.sampler_devices (disjoint sub-meshes) or shares the one mesh, time-sliced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STAGES = (
  "time/rollout", "time/reward", "time/rollout_wait", "time/construct", "time/advantage",
  "time/update", "time/step",
)  # fmt: skip


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.bench rl")
  p.add_argument("--config", default="configs/smoke.py")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--async", dest="asyncs", default="0", help="comma-separated async_steps values")
  p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: the platform's)")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
  p.add_argument("--json", default="", help="also write the figures to this file")
  return p.parse_args(argv)


def run_variant(a, async_steps: int, workdir: str) -> dict:
  env = dict(os.environ)
  if a.devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
  cmd = [
    sys.executable, "-m", "tapo_jax.main", f"--config={a.config}", f"--workdir={workdir}",
    f"--config.train.steps={a.steps}", f"--config.train.checkpoint_every={10**6}",
    f"--config.rollout.async_steps={async_steps}", *[f"--config.{kv}" for kv in a.set],
  ]  # fmt: skip
  t0 = time.time()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"error: variant async_steps={async_steps} failed:\n{out.stderr[-3000:]}")
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if "time/step" in r]
  steady = rows[2:] or rows[-1:]
  figures = {"async_steps": async_steps, "wall_s": time.time() - t0, "steps": len(rows)}
  figures["first_step_s"] = rows[0]["time/step"]
  figures["compilations_step1"] = rows[0].get("perf/compilations")
  figures["compilations_after_step2"] = sum(r.get("perf/compilations", 0) for r in rows[2:])
  for key in STAGES + ("perf/rollout_tokens_per_s", "perf/train_tokens_per_s"):
    vals = [r[key] for r in steady if r.get(key) is not None]
    if vals:
      figures[key] = dict(min=min(vals), median=statistics.median(vals), max=max(vals))
  return figures


def main(argv) -> int:
  a = _flags(argv)
  report = dict(config=a.config, steps=a.steps, devices=a.devices or "platform", sets=a.set)
  variants = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, value in enumerate(int(x) for x in a.asyncs.split(",")):
      variants.append(run_variant(a, value, os.path.join(tmp, f"v{i}")))
  report["variants"] = variants
  print(f"bench rl: {a.config}, {a.steps} steps, sets {a.set or 'none'}", file=sys.stderr)
  for v in variants:
    print(
      f"  async_steps={v['async_steps']}: first step {v['first_step_s']:.1f} s "
      f"({v['compilations_step1']:.0f} compilations), compilations after step 2: "
      f"{v['compilations_after_step2']:.0f}",
      file=sys.stderr,
    )
    for key in STAGES + ("perf/rollout_tokens_per_s", "perf/train_tokens_per_s"):
      if key in v:
        f = v[key]
        print(f"    {key:28s} min {f['min']:9.3f}  median {f['median']:9.3f}  max {f['max']:9.3f}",
              file=sys.stderr)  # fmt: skip
  base = variants[0]["time/step"]["median"]
  for v in variants[1:]:
    ratio = base / v["time/step"]["median"]
    v["speedup_vs_first"] = ratio
    print(f"  median step: async_steps={v['async_steps']} is {ratio:.2f}x the first variant's "
          "speed", file=sys.stderr)  # fmt: skip
  print(json.dumps(report, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=1)
  return 0
