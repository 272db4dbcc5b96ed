r"""GRPO vs TAPO on the toy domain: every variant from the same cold-started model, same steps and
samples, several seeds; a table, a plot and the raw per-run summaries.

python -m tapo_jax.study [--out=runs/study] [--config=configs/tiny.py] [--seeds=0,1,2]
                         [--variants=grpo,tapo-policy,...] [--set key=value ...]

Each (variant, seed) is one real CLI run, `python -m tapo_jax.main --config=CONFIG
--workdir=OUT/VARIANT/seed_S --config.seed=S` plus the variant's overrides and every --set, so a
run is reproduced by that one command; a run whose workdir already holds its final eval is not
run again (the study resumes after an interruption). The config must evaluate at the start and at
the end (train.eval_at_start, train.eval_every); configs/tiny.py does.

Variants (VARIANTS): grpo; tapo-policy (the paper's construction); tapo-divergence (rule-based,
no generation); ablations of tapo-policy: no OTS, joint normalization instead of DAE, full
reconstruction (no anchored prefix), λ = 0.5; and opsd (on-policy self-distillation, the paper's
other baseline).

Per variant, over seeds (mean ± std): held-out avg@k, greedy and pass@k after training (and
before, the same for every variant), DSR / ERR, the share of DCS-eligible queries, the parse rate
and accuracy of constructions (per attempted construction), the anchored fraction,
OPSD's divergence per token and teacher-student top-1 agreement (step means), and the compute
per step (median time per step, trained tokens per second of update). Written to
OUT/summary.json (every run's numbers), OUT/study.md (the table) and OUT/study.png (held-out
accuracy vs step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from tapo_jax import plot

POLICY = ("algorithm=tapo", "tapo.construction=policy", "tapo.ref_baseline=group")
VARIANTS: dict[str, tuple[str, ...]] = {
  "grpo": ("algorithm=grpo",),
  "tapo-policy": POLICY,
  "tapo-divergence": ("algorithm=tapo", "tapo.construction=divergence", "tapo.ref_baseline=orig"),
  "policy-no-ots": (*POLICY, "tapo.ots=False"),
  "policy-joint": (*POLICY[:2], "tapo.ref_baseline=joint"),
  "policy-full-reconstruction": (*POLICY, "tapo.anchor=False"),
  "policy-lambda-0.5": (*POLICY, "tapo.lam=0.5"),
  # the paper's other baseline: on-policy self-distillation (tapo_jax/opsd), same rollouts as GRPO
  "opsd": ("algorithm=opsd",),
}

# (column, how to read it from a run's summary)
COLUMNS = (
  "avg@k before",
  "avg@k after",
  "greedy before",
  "greedy after",
  "pass@k after",
  "dsr after",
  "err after",
  "eligible rate",
  "parse rate",
  "construction acc",
  "anchored fraction",
  "opsd divergence",
  "opsd agreement",
  "s / step",
  "train tok / s",
)


def command(config: str, workdir: str, seed: int, overrides) -> list[str]:
  """The CLI run of one (variant, seed)."""
  return [
    sys.executable, "-m", "tapo_jax.main", f"--config={config}", f"--workdir={workdir}",
    f"--config.seed={seed}", *(f"--config.{o}" for o in overrides),
  ]  # fmt: skip


def _mean(values) -> float | None:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return sum(values) / len(values) if values else None


def _eval_key(row: dict, metric: str) -> str | None:
  """The eval/<set>/<metric> key of an eval row; "avg@" / "pass@" match the largest k."""
  keys = [k for k in row if k.startswith("eval/") and k.rsplit("/", 1)[1].startswith(metric)]
  if not keys:
    return None
  return max(keys, key=lambda k: int(k.rsplit("@", 1)[1]) if metric.endswith("@") else 0)


def run_summary(workdir: str) -> dict | None:
  """The numbers of one finished run (None when its final eval is missing)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = plot.read_metrics(path)
  evals = [r for r in rows if _eval_key(r, "avg@")]
  steps = [r for r in rows if "time/step" in r]
  if len(evals) < 2 or not steps or evals[-1]["step"] < steps[-1]["step"]:
    return None
  first, last = evals[0], evals[-1]

  def ev(row, metric):
    key = _eval_key(row, metric)  # None values: undefined (ERR with no reflections)
    return None if key is None or row[key] is None else float(row[key])

  def per_step(key):
    return [float(r[key]) for r in steps if key in r]

  attempted = sum(per_step("tapo/constructions_attempted"))
  out = {
    "steps": int(steps[-1]["step"]),
    "avg@k before": ev(first, "avg@"),
    "avg@k after": ev(last, "avg@"),
    "greedy before": ev(first, "greedy"),
    "greedy after": ev(last, "greedy"),
    "pass@k after": ev(last, "pass@"),
    "dsr after": ev(last, "dsr"),
    "err after": ev(last, "err"),
    "eligible rate": _mean(per_step("tapo/eligible_rate")),
    "parse rate": sum(per_step("tapo/constructions_parsed")) / attempted if attempted else None,
    "construction acc": sum(per_step("tapo/constructions_correct")) / attempted
    if attempted
    else None,
    "anchored fraction": _mean(per_step("tapo/anchored_fraction")),
    "opsd divergence": _mean(per_step("opsd/divergence")),  # per distilled token, step mean
    "opsd agreement": _mean(per_step("opsd/agreement")),  # teacher/student top-1 tokens equal
    "s / step": statistics.median(per_step("time/step")),
    "train tok / s": _mean(per_step("perf/train_tokens_per_s")),
    "curve": [(int(r["step"]), ev(r, "avg@")) for r in evals],
  }
  return out


def _fmt(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.3g}"
  return f"{mean:.3g} ± {statistics.stdev(values):.2g}"


def table(results: dict[str, dict[int, dict]]) -> str:
  """A markdown table: one row per variant, mean ± std (sample std) over its seeds."""
  lines = [
    "| variant | seeds | " + " | ".join(COLUMNS) + " |",
    "|---|---|" + "---|" * len(COLUMNS),
  ]
  for name, runs in results.items():
    cells = [_fmt([r.get(c) for r in runs.values()]) for c in COLUMNS]
    lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_curves(results: dict[str, dict[int, dict]], out: str) -> str:
  """Held-out avg@k vs step, mean over seeds, one line per variant (band: min..max)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7.0, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for name, runs in results.items():
    by_step: dict[int, list[float]] = {}
    for r in runs.values():
      for step, v in r["curve"]:
        if v is not None:
          by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{name} ({len(runs)} seeds)")
    lo = [min(by_step[s]) for s in steps]
    hi = [max(by_step[s]) for s in steps]
    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12)
  ax.set_xlabel("RL step")
  ax.set_ylabel("held-out avg@k (T = eval.temperature)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  tmp = f"{out}.tmp.png"
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, out)
  return out


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.study", description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/study")
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  a = p.parse_args(argv)
  try:
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  except ValueError:
    _fail(f"--seeds={a.seeds}: expected comma-separated integers, e.g. 0,1,2")
  a.variants = [v for v in a.variants.split(",") if v]
  unknown = [v for v in a.variants if v not in VARIANTS]
  if unknown:
    _fail(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
  if not a.seeds:
    _fail("--seeds: at least one seed")
  for s in a.set:
    if "=" not in s:
      _fail(f"--set {s!r}: expected KEY=VALUE")
  return a


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  raise SystemExit(2)


def load_config(config: str, overrides):
  """The config a run gets from `--config=CONFIG --config.KEY=VALUE...` (main's own parsing)."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["study", f"--config={config}", *(f"--config.{o}" for o in overrides)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def check_runs(a) -> None:
  """Every variant's config, validated as main validates it, and evaluated before and after
  training (else the study would train its first run and then stop); exits 2 naming the problem."""
  import jax

  from tapo_jax import validate as validate_lib

  if not os.path.isfile(a.config):
    _fail(f"--config={a.config}: no such file")
  for variant in a.variants:
    try:
      cfg = load_config(a.config, [*VARIANTS[variant], *a.set])
      validate_lib.validate(cfg, jax.device_count())
    except (KeyError, AttributeError) as e:  # config_flags: an override of no key
      _fail(f"{variant}: unknown config key {str(e).strip(chr(34) + chr(39))!r} in --set")
    except Exception as e:  # noqa: BLE001 - a bad config file, --set or value: one line
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      _fail(f"{variant}: {lines[-1] if lines else type(e).__name__}")
    t = cfg.train
    if cfg.mode != "rl" or not t.eval_at_start or not t.eval_every or t.steps % t.eval_every:
      _fail(
        f"--config={a.config}: a study needs an eval before and after training (mode=rl, "
        f"train.eval_at_start=True, train.eval_every dividing train.steps); got "
        f"mode={cfg.mode}, eval_at_start={t.eval_at_start}, eval_every={t.eval_every}, "
        f"steps={t.steps}"
      )


def main(argv: list[str] | None = None) -> int:
  a = _flags(sys.argv[1:] if argv is None else argv)
  check_runs(a)
  os.makedirs(a.out, exist_ok=True)
  results: dict[str, dict[int, dict]] = {}
  todo = [(v, s) for s in a.seeds for v in a.variants]  # variants side by side in time
  for i, (variant, seed) in enumerate(todo):
    workdir = os.path.join(a.out, variant, f"seed_{seed}")
    summary = run_summary(workdir)
    if summary is None:
      cmd = command(a.config, workdir, seed, [*VARIANTS[variant], *a.set])
      print(f"study {i + 1}/{len(todo)}: {variant} seed {seed}: {' '.join(cmd[1:])}", flush=True)
      t0 = time.time()
      os.makedirs(os.path.dirname(workdir), exist_ok=True)
      with open(f"{workdir}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
      if proc.returncode != 0:
        print(
          f"error: {variant} seed {seed} exited {proc.returncode}; see {workdir}.log",
          file=sys.stderr,
        )
        return 1
      summary = run_summary(workdir)
      if summary is None:
        print(f"error: {workdir}: no eval before and after training ({a.config})", file=sys.stderr)
        return 1
      print(
        f"  {time.time() - t0:.0f} s: avg@k {summary['avg@k before']:.3f} -> "
        f"{summary['avg@k after']:.3f}",
        flush=True,
      )
    results.setdefault(variant, {})[seed] = summary
  with open(os.path.join(a.out, "summary.json"), "w") as f:
    json.dump({"config": a.config, "set": a.set, "runs": results}, f, indent=1)
  text = table(results)
  with open(os.path.join(a.out, "study.md"), "w") as f:
    f.write(text + "\n")
  plot_curves(results, os.path.join(a.out, "study.png"))
  print(text)
  print(f"wrote {a.out}/summary.json, study.md, study.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
