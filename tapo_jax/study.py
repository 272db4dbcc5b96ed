r"""GRPO vs TAPO (and OPSD) on the toy domain: every variant from the same cold-started model, same
steps and samples, several seeds; paired differences to GRPO, curves against steps and seconds.

python -m tapo_jax.study [--profile=full|ablations|quick | --quick] [--out=runs/study]
                         [--config=configs/tiny.py] [--seeds=0,1,2] [--variants=grpo,...]
                         [--jobs=1] [--set key=value ...]

Each (variant, seed) is one real CLI run, `python -m tapo_jax.main --config=CONFIG
--workdir=OUT/VARIANT/seed_S --config.seed=S` plus the profile's overrides, the variant's and
every --set (in that order; the last wins), so a run is reproduced by that one command. Its output
goes to OUT/VARIANT/seed_S.log. A run whose workdir already holds its final eval is not run again,
and an interrupted one resumes from its last checkpoint (the study resumes what is missing); a
run in OUT that recorded another config (another profile or --set) stops the study before any
run (exit 2), so one --out holds one study.
--jobs=N runs N at a time; a run that fails is reported with its log and stops new launches (the
running ones finish), and the study exits 1. Ctrl-C stops it: the running runs checkpoint after
their current step (a second Ctrl-C stops them at once), the study exits 130, and the same
command resumes them. The config must evaluate at the start and at the end
(train.eval_at_start, train.eval_every dividing train.steps); configs/tiny.py does.

Profiles (PROFILES; --seeds / --variants replace the profile's, --set adds to its overrides):
  full       issue 22's study: grpo, tapo-divergence, tapo-policy, opsd; 5 seeds x 100 steps;
             256 held-out problems evaluated every 25 steps (avg@8 at T = 1, and greedy)
  ablations  tapo-policy's ablations beside grpo and tapo-policy, 3 seeds, the same budget (in the
             same --out as `full` its grpo and tapo-policy runs are reused)
  quick      a tiny budget for CI, to keep the machinery working, not to conclude anything:
             grpo and tapo-divergence x 2 seeds x 2 steps, 4 held-out problems, small batches

Variants (VARIANTS): grpo; tapo-policy (the paper's construction); tapo-divergence (rule-based,
no generation); ablations of tapo-policy: no OTS, joint normalization instead of DAE, full
reconstruction (no anchored prefix), λ = 0.5; and opsd (on-policy self-distillation, the paper's
other baseline).

Report (OUT/study.md, OUT/summary.json, OUT/study.png):
  - per variant, mean ± sample std over seeds: held-out avg@k, greedy and pass@k before and after
    training, DSR / ERR, first-pass accuracy and the correction-fix rate (tapo_jax/eval/
    reflection.py), the construction statistics (DCS-eligible share, parse rate and accuracy per
    attempted construction, the anchored prefix's share of the construction and of y⁻), OPSD's
    divergence and agreement, and the compute per step (median seconds, trained tokens per
    second); and one row per run: its eval curve, training seconds and seconds per step;
  - per variant, the paired difference to grpo on each seed (same seed: same checkpoint, data
    order and eval sampling seed) of held-out avg@k and greedy, d_s = v_s - grpo_s, and their mean
    with a 95% percentile bootstrap interval over seeds (scipy.stats.bootstrap, 9999 resamples;
    with few seeds it cannot be wider than the range of the d_s):
      at the end      after the same number of steps;
      equal compute   at grpo's training seconds: a run's train seconds at an eval are the sum of
                      its `time/step` (rollouts, grading, constructions, update; not the evals or
                      checkpoints) up to that step, its first step (which compiles the step's
                      programs) counted as its median step; v_s is the variant's eval curve
                      linearly interpolated at the budget B_s = grpo seed s's train seconds at
                      its last eval (a variant that finished under B_s counts with its final eval);
  - the same paired differences of first-pass accuracy and the correction-fix rate;
  - held-out avg@k and greedy against RL steps (mean over seeds, band min..max) and against
    training seconds (one line per run).
Seconds compare only runs that had the same machine under the same load (--jobs=2 shares it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings

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
REFERENCE = "grpo"  # the variant every other one is paired with


@dataclasses.dataclass(frozen=True)
class Profile:
  seeds: tuple[int, ...]
  variants: tuple[str, ...]
  sets: tuple[str, ...]  # config overrides of every run, before the variant's and --set


# issue 22: >= 100 steps, >= 256 held-out problems every 25 steps, greedy and avg@8
FULL = (
  "train.steps=100", "train.eval_every=25", "train.checkpoint_every=25",
  "eval.toy_problems=256", "eval.k=8", "eval.pass_ks=(1,8)", "eval.greedy=True",
)  # fmt: skip
PROFILES: dict[str, Profile] = {
  "full": Profile((0, 1, 2, 3, 4), ("grpo", "tapo-divergence", "tapo-policy", "opsd"), FULL),
  "ablations": Profile(
    (0, 1, 2),
    (
      "grpo",
      "tapo-policy",
      "policy-no-ots",
      "policy-joint",
      "policy-full-reconstruction",
      "policy-lambda-0.5",
    ),
    FULL,
  ),  # fmt: skip
  "quick": Profile(
    (0, 1),
    ("grpo", "tapo-divergence"),
    (
      "train.steps=2",
      "train.eval_every=2",
      "train.checkpoint_every=0",
      "eval.toy_problems=4",
      "eval.k=2",
      "eval.pass_ks=(1,2)",
      "rollout.batch_queries=2",
      "rollout.n=4",
      "rollout.slots=8",
      "tapo.n_pos=1",
      "tapo.n_neg=1",
      "tapo.m_max=2",
    ),
  ),  # fmt: skip
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
  "first-pass after",
  "fix rate after",
  "eligible rate",
  "parse rate",
  "construction acc",
  "anchored fraction",
  "kept fraction",
  "opsd divergence",
  "opsd agreement",
  "s / step",
  "train tok / s",
)
# the eval metrics compared with grpo, seed by seed: accuracy, then the two analyses
PAIRED = ("avg@k", "greedy", "first_pass", "fix_rate")


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


def _ev(row: dict, metric: str) -> float | None:
  """An eval row's metric; None when absent or undefined (ERR with no reflections: NaN/null)."""
  key = _eval_key(row, metric)
  v = None if key is None else row[key]
  return None if v is None or not math.isfinite(float(v)) else float(v)


def run_summary(workdir: str) -> dict | None:
  """The numbers of one finished run (None when its final eval is missing)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = plot.read_metrics(path)
  evals = {int(r["step"]): r for r in rows if _eval_key(r, "avg@")}  # a resumed step: last wins
  step_rows = {int(r["step"]): r for r in rows if "time/step" in r}
  steps = [step_rows[s] for s in sorted(step_rows)]
  if len(evals) < 2 or not steps or max(evals) < max(step_rows):
    return None
  before, last = evals[min(evals)], evals[max(evals)]

  def per_step(key):
    return [float(r[key]) for r in steps if key in r]

  attempted = sum(per_step("tapo/constructions_attempted"))
  seconds = {s: float(r["time/step"]) for s, r in step_rows.items()}
  first = min(seconds)
  if len(seconds) > 1:  # the first step compiles the step's programs: counted as a median step
    seconds[first] = statistics.median(v for s, v in seconds.items() if s != first)
  curve = []
  for step in sorted(evals):
    row = evals[step]
    curve.append(
      {
        "step": step,
        "train_s": sum(v for s, v in seconds.items() if s <= step),
        "avg@k": _ev(row, "avg@"),
        "greedy": _ev(row, "greedy"),
        "first_pass": _ev(row, "first_pass"),
        "fix_rate": _ev(row, "fix_rate"),
      }
    )
  return {
    "steps": int(steps[-1]["step"]),
    "avg@k before": _ev(before, "avg@"),
    "avg@k after": _ev(last, "avg@"),
    "greedy before": _ev(before, "greedy"),
    "greedy after": _ev(last, "greedy"),
    "pass@k after": _ev(last, "pass@"),
    "dsr after": _ev(last, "dsr"),
    "err after": _ev(last, "err"),
    "first-pass after": _ev(last, "first_pass"),
    "fix rate after": _ev(last, "fix_rate"),
    "eligible rate": _mean(per_step("tapo/eligible_rate")),
    "parse rate": sum(per_step("tapo/constructions_parsed")) / attempted if attempted else None,
    "construction acc": sum(per_step("tapo/constructions_correct")) / attempted
    if attempted
    else None,
    "anchored fraction": _mean(per_step("tapo/anchored_fraction")),  # of the construction
    "kept fraction": _mean(per_step("tapo/kept_fraction")),  # of y⁻ (policy: 0 when not built)
    "opsd divergence": _mean(per_step("opsd/divergence")),  # per distilled token, step mean
    "opsd agreement": _mean(per_step("opsd/agreement")),  # teacher/student top-1 tokens equal
    "s / step": statistics.median(per_step("time/step")),
    "train tok / s": _mean(per_step("perf/train_tokens_per_s")),
    "train s": curve[-1]["train_s"],
    "curve": curve,
  }


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


def runs_table(results: dict[str, dict[int, dict]]) -> str:
  """A markdown table: one row per run, its held-out avg@k and greedy at every eval
  (`before -> ... -> after`), its training seconds and its median seconds per step."""
  lines = [
    "| variant | seed | avg@k at the evals | greedy at the evals | train s | s / step |",
    "|---|---|---|---|---|---|",
  ]

  def steps(curve, key):
    return " → ".join("–" if c[key] is None else f"{c[key]:.3f}" for c in curve)

  for name, runs in results.items():
    for seed, r in sorted(runs.items()):
      lines.append(
        f"| {name} | {seed} | {steps(r['curve'], 'avg@k')} | {steps(r['curve'], 'greedy')} | "
        f"{r['train s']:.0f} | {r['s / step']:.2f} |"
      )
  return "\n".join(lines)


# ----------------------------------------------------------------------- paired with the reference


def at_seconds(curve: list[dict], budget: float, metric: str) -> float | None:
  """`metric` of an eval curve at `budget` training seconds: linear between the evals around it;
  the final eval when the run ended under the budget; None when the curve has no values."""
  import numpy as np

  points = [(c["train_s"], c[metric]) for c in curve if c.get(metric) is not None]
  if not points:
    return None
  if budget >= points[-1][0]:
    return points[-1][1]
  xs, ys = zip(*points, strict=True)
  return float(np.interp(budget, xs, ys))


def bootstrap_ci(values, level: float = 0.95) -> tuple[float, float] | None:
  """The percentile bootstrap interval of the mean of `values` (scipy.stats.bootstrap, 9999
  resamples, fixed generator); None with fewer than 2 values."""
  import numpy as np
  from scipy import stats

  if len(values) < 2:
    return None
  if max(values) == min(values):
    return (float(values[0]), float(values[0]))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = stats.bootstrap(
      (np.asarray(values, float),), np.mean, confidence_level=level, n_resamples=9999,
      method="percentile", rng=np.random.default_rng(0),
    )  # fmt: skip
  return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired(results: dict[str, dict[int, dict]], reference: str = REFERENCE) -> dict[str, dict]:
  """{variant: {"<metric> <end|equal compute>": {"seeds", "diffs", "mean", "ci"}}} over the seeds
  both the variant and `reference` finished: d_s = variant_s - reference_s, at the end of training
  and at the reference's training seconds (`at_seconds`); {} without the reference."""
  ref = results.get(reference, {})
  out = {}
  for name, runs in results.items():
    if name == reference or not ref:
      continue
    seeds = sorted(set(runs) & set(ref))
    entry = {}
    for metric in PAIRED:
      for when in ("end", "equal compute"):
        diffs, used = [], []
        for s in seeds:
          base = ref[s]["curve"][-1][metric]
          if when == "end":
            v = runs[s]["curve"][-1][metric]
          else:
            v = at_seconds(runs[s]["curve"], ref[s]["curve"][-1]["train_s"], metric)
          if base is not None and v is not None:
            diffs.append(v - base)
            used.append(s)
        entry[f"{metric} {when}"] = {
          "seeds": used,
          "diffs": diffs,
          "mean": sum(diffs) / len(diffs) if diffs else None,
          "ci": bootstrap_ci(diffs),
        }
    out[name] = entry
  return out


def paired_table(pairs: dict[str, dict], metrics=PAIRED[:2], reference: str = REFERENCE) -> str:
  """Markdown: per variant and metric of `metrics`, the per-seed differences to the reference,
  their mean and 95% bootstrap interval, at the end and at equal compute."""
  if not pairs:
    return f"(no paired differences: no finished {reference} run)"
  cols = [f"{m} {w}" for m in metrics for w in ("end", "equal compute")]
  lines = [
    f"| variant − {reference} | seeds | " + " | ".join(f"Δ {c}" for c in cols) + " |",
    "|---|---|" + "---|" * len(cols),
  ]
  for name, entry in pairs.items():
    cells = []
    for c in cols:
      e = entry[c]
      if e["mean"] is None:
        cells.append("–")
        continue
      ci = "" if e["ci"] is None else f" [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}]"
      per = ", ".join(f"{s}: {d:+.3f}" for s, d in zip(e["seeds"], e["diffs"], strict=True))
      cells.append(f"{e['mean']:+.3f}{ci} ({per})")
    seeds = sorted({s for c in cols for s in entry[c]["seeds"]})
    used = ",".join(map(str, seeds)) or "–"
    lines.append(f"| {name} | {used} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


EQUAL_COMPUTE = (
  "Δ = variant − {ref} on the same seed: mean [95% percentile bootstrap interval over seeds] "
  "(per seed). *end*: after the same number of RL steps. *equal compute*: at {ref}'s training "
  "seconds on that seed (the sum of its `time/step`: rollouts, grading, constructions and "
  "updates, not evals or checkpoints; the first step, which compiles, counted as the run's median "
  "step); the variant's eval curve is interpolated linearly in its "
  "own training seconds, and a variant that finished under that budget counts with its final "
  "eval. Seconds compare only runs that had the machine under the same load."
)


# ------------------------------------------------------------------------------------------ plots


def plot_curves(results: dict[str, dict[int, dict]], out: str) -> str:
  """Held-out avg@k and greedy (rows) against RL steps (mean over seeds, band min..max) and
  against training seconds (one line per run) (columns)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  fig = Figure(figsize=(11.0, 7.0), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 2, squeeze=False)
  for row, (metric, label) in enumerate(
    (("avg@k", "held-out avg@k (T = eval.temperature)"), ("greedy", "held-out greedy"))
  ):
    by_steps, by_seconds = axes[row]
    for name, runs in results.items():
      by_step: dict[int, list[float]] = {}
      for r in runs.values():
        for c in r["curve"]:
          if c.get(metric) is not None:
            by_step.setdefault(c["step"], []).append(c[metric])
      if not by_step:
        continue
      steps = sorted(by_step)
      mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
      (line,) = by_steps.plot(
        steps, mean, marker="o", markersize=3, label=f"{name} ({len(runs)} seeds)"
      )
      lo = [min(by_step[s]) for s in steps]
      hi = [max(by_step[s]) for s in steps]
      by_steps.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12)
      for i, r in enumerate(runs.values()):
        pts = [(c["train_s"], c[metric]) for c in r["curve"] if c.get(metric) is not None]
        xs, ys = zip(*pts, strict=True)
        by_seconds.plot(
          xs, ys, color=line.get_color(), marker="o", markersize=2, linewidth=0.9, alpha=0.7,
          label=name if i == 0 else None,
        )  # fmt: skip
    by_steps.set_xlabel("RL step")
    by_steps.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_seconds.set_xlabel("training seconds (sum of time/step; the first step at the median)")
    for ax in (by_steps, by_seconds):
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  tmp = f"{out}.tmp.png"
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, out)
  return out


# ------------------------------------------------------------------------------------------ flags


def _flags(argv):
  p = argparse.ArgumentParser(prog="python -m tapo_jax.study", description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/study")
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--profile", default="", help=f"one of {', '.join(PROFILES)}")
  p.add_argument("--quick", action="store_true", help="--profile=quick (CI's tiny budget)")
  p.add_argument("--seeds", default=None, help="default 0,1,2 or the profile's")
  p.add_argument("--variants", default=None, help="default all or the profile's")
  p.add_argument("--jobs", default="1", help="runs at a time")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  a = p.parse_args(argv)
  if a.quick:
    if a.profile not in ("", "quick"):
      _fail(f"--quick with --profile={a.profile}: pick one")
    a.profile = "quick"
  if a.profile and a.profile not in PROFILES:
    _fail(f"--profile={a.profile}: unknown (known: {', '.join(PROFILES)})")
  profile = PROFILES.get(a.profile, Profile((0, 1, 2), tuple(VARIANTS), ()))
  seeds = a.seeds if a.seeds is not None else ",".join(map(str, profile.seeds))
  try:
    a.seeds = [int(s) for s in seeds.split(",") if s.strip()]
  except ValueError:
    _fail(f"--seeds={seeds}: expected comma-separated integers, e.g. 0,1,2")
  variants = a.variants if a.variants is not None else ",".join(profile.variants)
  a.variants = [v for v in variants.split(",") if v]
  unknown = [v for v in a.variants if v not in VARIANTS]
  if unknown:
    _fail(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
  if not a.seeds:
    _fail("--seeds: at least one seed")
  if not a.variants:
    _fail("--variants: at least one variant")
  try:
    jobs = int(a.jobs)
  except ValueError:
    jobs = 0
  if jobs < 1:
    _fail(f"--jobs={a.jobs}: expected an integer >= 1")
  a.jobs = jobs
  for s in a.set:
    if "=" not in s:
      _fail(f"--set {s!r}: expected KEY=VALUE")
  return a


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  raise SystemExit(2)


def run_overrides(a, variant: str) -> list[str]:
  """One run's config overrides: the profile's, the variant's, then --set (the last wins)."""
  sets = PROFILES[a.profile].sets if a.profile else ()
  return [*sets, *VARIANTS[variant], *a.set]


def load_config(config: str, overrides):
  """The config a run gets from `--config=CONFIG --config.KEY=VALUE...` (main's own parsing)."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["study", f"--config={config}", *(f"--config.{o}" for o in overrides)]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def device_count() -> int:
  """The devices a run will see. Asked of a child Python unless JAX_PLATFORMS=cpu: this process
  must not initialize an accelerator (on a TPU VM it would hold the chips its runs need)."""
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    import jax

    return jax.device_count()
  code = "import jax; print(jax.device_count())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  if out.returncode != 0:
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    _fail(f"JAX does not start here: {lines[-1] if lines else f'exit {out.returncode}'}")
  return int(out.stdout.split()[-1])


def check_runs(a) -> None:
  """Every variant's config, validated as main validates it, and evaluated before and after
  training (else the study would train its first run and then stop); exits 2 naming the problem."""
  from tapo_jax import validate as validate_lib

  if not os.path.isfile(a.config):
    _fail(f"--config={a.config}: no such file")
  devices = device_count()
  for variant in a.variants:
    try:
      cfg = load_config(a.config, run_overrides(a, variant))
      validate_lib.validate(cfg, devices)
    except (KeyError, AttributeError) as e:  # config_flags: an override of no key
      _fail(f"{variant}: unknown config key {str(e).strip(chr(34) + chr(39))!r} in --set")
    except Exception as e:  # noqa: BLE001 - a bad config file, --set or value: one line
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      _fail(f"{variant}: {lines[-1] if lines else type(e).__name__}")
    t = cfg.train
    if (
      cfg.mode != "rl"
      or not t.eval_at_start
      or not t.eval_every
      or t.steps < 1
      or t.steps % t.eval_every
    ):
      _fail(
        f"--config={a.config}: a study needs an eval before and after training (mode=rl, "
        f"train.eval_at_start=True, train.eval_every dividing train.steps >= 1); got "
        f"mode={cfg.mode}, eval_at_start={t.eval_at_start}, eval_every={t.eval_every}, "
        f"steps={t.steps}"
      )


def _flat(tree, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}, values as JSON reads them back (tuples: lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=list))
  return out


def check_existing(a, todo) -> None:
  """A run already in OUT (its WORKDIR/config.json, written by main) must have this study's
  config: a finished run is reused as is, and main resumes an unfinished one with a new step
  budget or eval cadence without a word. Exits 2 naming the run and its changed keys. A key the
  run's config has not got (added to the code since) counts as its default value then, as a new
  key's default keeps the old behaviour."""
  from tapo_jax import config as config_lib

  defaults = _flat(config_lib.base_config().to_dict())
  for variant, seed in todo:
    workdir = os.path.join(a.out, variant, f"seed_{seed}")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      continue
    try:
      with open(path) as f:
        recorded = _flat(json.load(f)["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      _fail(f"{path}: unreadable ({e}); remove {workdir} to run it again")
    cfg = load_config(a.config, [f"seed={seed}", *run_overrides(a, variant)])
    expected = _flat(cfg.to_dict())  # (_flat reads every value back as JSON)
    for k in set(expected) - set(recorded):
      if k in defaults:
        recorded[k] = defaults[k]
    changed = [
      f"{k} {recorded.get(k)!r} -> {expected.get(k)!r}"
      for k in sorted(set(recorded) | set(expected))
      if k != "workdir" and recorded.get(k) != expected.get(k)
    ]
    if changed:
      more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
      _fail(
        f"{workdir}: ran another config than this study's ({', '.join(changed[:3])}{more}); "
        f"use another --out, or remove that run"
      )


# ------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass
class _Job:
  variant: str
  seed: int
  workdir: str
  proc: subprocess.Popen
  log: object
  t0: float


def run_missing(a, todo: list[tuple[str, int]]) -> list[str]:
  """Runs the (variant, seed) pairs of `todo` whose workdir has no final eval, `a.jobs` at a time,
  each `command` a subprocess writing to WORKDIR.log; returns one error line per failed run. After
  a failure no new run starts; the running ones finish. Ctrl-C (KeyboardInterrupt, raised again
  once they stopped) passes to the running runs: each checkpoints after its current step and
  exits, and the same command resumes them; a second Ctrl-C stops them at once."""
  missing = [
    (v, s) for v, s in todo if run_summary(os.path.join(a.out, v, f"seed_{s}")) is None
  ]  # fmt: skip
  running: list[_Job] = []
  failures: list[str] = []
  try:
    _run_jobs(a, missing, running, failures)
  except KeyboardInterrupt:
    _interrupt(running)
    raise
  return failures


def _interrupt(running: list[_Job]) -> None:
  """Ctrl-C to every running run (each started in its own session, so a terminal's Ctrl-C
  reached only the study); waits for them; a second Ctrl-C passes on as a second one."""
  print(
    f"study: Ctrl-C: {len(running)} running run(s) checkpoint after their current step "
    "(Ctrl-C again to stop them now)",
    file=sys.stderr,
    flush=True,
  )
  for job in running:
    job.proc.send_signal(signal.SIGINT)
  for job in running:
    try:
      job.proc.wait()
    except KeyboardInterrupt:
      for other in running:
        if other.proc.poll() is None:
          other.proc.send_signal(signal.SIGINT)
      job.proc.wait()
    job.log.close()


def _run_jobs(a, missing: list, running: list[_Job], failures: list[str]) -> None:
  started = 0
  while (missing and not failures) or running:
    while missing and not failures and len(running) < a.jobs:
      variant, seed = missing.pop(0)
      workdir = os.path.join(a.out, variant, f"seed_{seed}")
      cmd = command(a.config, workdir, seed, run_overrides(a, variant))
      started += 1
      print(
        f"study {started}/{started + len(missing)}: {variant} seed {seed}: "
        f"python {shlex.join(cmd[1:])}  (log: {workdir}.log)",
        flush=True,
      )
      os.makedirs(os.path.dirname(workdir), exist_ok=True)
      log = open(f"{workdir}.log", "w")  # noqa: SIM115 - closed when the run ends
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
      running.append(_Job(variant, seed, workdir, proc, log, time.time()))
    time.sleep(0.2)
    for job in [j for j in running if j.proc.poll() is not None]:
      running.remove(job)
      job.log.close()
      name = f"{job.variant} seed {job.seed}"
      summary = run_summary(job.workdir) if job.proc.returncode == 0 else None
      if job.proc.returncode != 0:
        failures.append(f"{name} exited {job.proc.returncode}; see {job.workdir}.log")
      elif summary is None:
        failures.append(
          f"{name}: {job.workdir} has no eval before and after training; see {job.workdir}.log"
        )
      else:
        print(
          f"  {name}: {time.time() - job.t0:.0f} s: avg@k {summary['avg@k before']:.3f} -> "
          f"{summary['avg@k after']:.3f}",
          flush=True,
        )


def report(a, results: dict[str, dict[int, dict]]) -> str:
  """Writes OUT/summary.json, OUT/study.md and OUT/study.png; returns the markdown."""
  pairs = paired(results)
  with open(os.path.join(a.out, "summary.json"), "w") as f:
    json.dump(
      {"config": a.config, "profile": a.profile, "set": a.set, "runs": results, "paired": pairs},
      f,
      indent=1,
    )
  text = "\n\n".join(
    [
      table(results),
      f"Paired with {REFERENCE}. " + EQUAL_COMPUTE.format(ref=REFERENCE),
      paired_table(pairs, PAIRED[:2]),
      "First-pass accuracy and the correction-fix rate (tapo_jax/eval/reflection.py), paired "
      "the same way (a seed counts for fix_rate only where both runs wrote a correction after a "
      "wrong first pass):",
      paired_table(pairs, PAIRED[2:]),
      "Every run (evals at the steps of the curve: " + ", ".join(_eval_steps(results)) + "):",
      runs_table(results),
    ]
  )
  with open(os.path.join(a.out, "study.md"), "w") as f:
    f.write(text + "\n")
  plot_curves(results, os.path.join(a.out, "study.png"))
  return text


def _eval_steps(results: dict[str, dict[int, dict]]) -> list[str]:
  return [str(s) for s in sorted({c["step"] for r in results.values() for x in r.values()
                                    for c in x["curve"]})]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
  a = _flags(sys.argv[1:] if argv is None else argv)
  check_runs(a)
  os.makedirs(a.out, exist_ok=True)
  todo = [(v, s) for s in a.seeds for v in a.variants]  # variants side by side in time
  check_existing(a, todo)
  try:
    failures = run_missing(a, todo)
  except KeyboardInterrupt:
    print(
      f"study: interrupted; the same command resumes it (runs so far in {a.out})", file=sys.stderr
    )
    return 130
  results: dict[str, dict[int, dict]] = {}
  for variant, seed in todo:
    summary = run_summary(os.path.join(a.out, variant, f"seed_{seed}"))
    if summary is not None:
      results.setdefault(variant, {})[seed] = summary
  if results:
    print(report(a, results))
    print(f"wrote {a.out}/summary.json, study.md, study.png")
  for line in failures:
    print(f"error: {line}", file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
