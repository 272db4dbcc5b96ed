"""The study's bookkeeping on hand-written metrics (the runs themselves: tests/test_toy_run.py)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cli
import numpy as np
import pytest

from tapo_jax import study
from tapo_jax.eval.evaluate import describe_change


def _write_run(
  workdir, before, after, *, eligible=0.5, parsed=3, attempted=4, correct=2, s_per_step=None
):
  workdir.mkdir(parents=True)
  rows = [
    {"step": 0, "eval/chain/avg@4": before, "eval/chain/greedy": before, "eval/chain/pass@1": 0.1,
     "eval/chain/pass@4": 0.5},
    *(
      {
        "step": s,
        "time/step": 2.0 + s if s_per_step is None else s_per_step,
        "perf/train_tokens_per_s": 100.0,
        "tapo/eligible_rate": eligible,
        "tapo/constructions_attempted": attempted,
        "tapo/constructions_parsed": parsed,
        "tapo/constructions_correct": correct,
        "tapo/anchored_fraction": 0.4,
      }
      for s in (1, 2, 3)
    ),
    {"step": 3, "eval/chain/avg@4": after, "eval/chain/greedy": after, "eval/chain/pass@1": 0.1,
     "eval/chain/pass@4": 0.75,
     "eval/chain/dsr": 0.1, "eval/chain/err": 0.2},
  ]  # fmt: skip
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_run_summary_reads_before_after_and_construction_rates(tmp_path):
  _write_run(tmp_path / "run", 0.25, 0.5)
  s = study.run_summary(str(tmp_path / "run"))
  assert s["avg@k before"] == 0.25 and s["avg@k after"] == 0.5
  assert s["greedy after"] == 0.5 and s["pass@k after"] == 0.75 and s["err after"] == 0.2
  assert s["parse rate"] == pytest.approx(9 / 12) and s["construction acc"] == pytest.approx(6 / 12)
  assert s["s / step"] == 4.0 and s["eligible rate"] == 0.5
  assert [(c["step"], c["avg@k"], c["greedy"]) for c in s["curve"]] == [
    (0, 0.25, 0.25),
    (3, 0.5, 0.5),
  ]
  # time/step 3, 4, 5 s: the first step (compiling) counted as the median of the others, 4.5 s
  assert [c["train_s"] for c in s["curve"]] == [0.0, 4.5 + 4.0 + 5.0] and s["train s"] == 13.5


def test_undefined_metrics_are_none(tmp_path):
  _write_run(tmp_path / "run", 0.25, 0.5)
  path = tmp_path / "run" / "metrics.jsonl"
  path.write_text(path.read_text().replace('"eval/chain/err": 0.2', '"eval/chain/err": null'))
  s = study.run_summary(str(tmp_path / "run"))
  assert s["err after"] is None and s["dsr after"] == 0.1


def test_unfinished_run_has_no_summary(tmp_path):
  _write_run(tmp_path / "run", 0.25, 0.5)
  path = tmp_path / "run" / "metrics.jsonl"
  path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # no final eval
  assert study.run_summary(str(tmp_path / "run")) is None
  assert study.run_summary(str(tmp_path / "absent")) is None


def test_table_is_mean_and_sample_std_over_seeds(tmp_path):
  for seed, after in enumerate((0.4, 0.5, 0.6)):
    _write_run(tmp_path / f"s{seed}", 0.3, after)
  runs = {i: study.run_summary(str(tmp_path / f"s{i}")) for i in range(3)}
  text = study.table({"grpo": runs})
  row = text.splitlines()[2].split(" | ")
  assert row[0] == "| grpo" and row[1] == "3"
  assert row[1 + study.COLUMNS.index("avg@k after") + 1] == "0.5 ± 0.1"
  out = study.plot_curves({"grpo": runs}, str(tmp_path / "study.png"))
  assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_finished_runs_are_not_run_again(tmp_path, capsys):
  for variant in ("grpo", "tapo-divergence"):
    _write_run(tmp_path / variant / "seed_0", 0.3, 0.4)
  assert study.main([f"--out={tmp_path}", "--seeds=0", "--variants=grpo,tapo-divergence"]) == 0
  out = capsys.readouterr().out
  assert "study 1/" not in out  # nothing was launched
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary["runs"]) == {"grpo", "tapo-divergence"}
  parts = (tmp_path / "study.md").read_text().strip().split("\n\n")
  table, legend, paired, _, analyses, runs_legend, runs = parts
  assert table.count("\n") == 3 and "Paired with grpo" in legend
  assert analyses.splitlines()[2] == "| tapo-divergence | – | – | – | – | – |"  # none logged
  assert paired.splitlines()[2].startswith("| tapo-divergence | 0 | +0.000 (0: +0.000) |")
  assert runs_legend == "Every run (evals at the steps of the curve: " + ", ".join(
    str(c["step"]) for c in summary["runs"]["grpo"]["0"]["curve"]) + "):"  # fmt: skip
  assert runs.splitlines()[2].startswith("| grpo | 0 | ")  # a row per run
  assert len(runs.splitlines()) == 4
  assert (tmp_path / "study.png").exists()


def test_the_device_count_is_asked_of_a_child_unless_on_cpu(monkeypatch, capsys):
  """On a TPU VM the study's own process must not take the chips its runs need."""
  monkeypatch.setenv("JAX_PLATFORMS", "")  # any platform: a child answers (8 CPU devices here)
  assert study.device_count() == 8  # (the child inherits XLA_FLAGS; no TPU here: it falls back)
  monkeypatch.setenv("JAX_PLATFORMS", "no-such-platform")
  with pytest.raises(SystemExit) as e:
    study.device_count()
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    e.value.code == 2 and len(err) == 1 and err[0].startswith("error: JAX does not start here: ")
  )


def test_bad_flags_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    study.main(["--variants=grpo,nope"])
  assert e.value.code == 2 and "unknown nope" in capsys.readouterr().err


def test_every_variant_command_is_a_config_override():
  for name, overrides in study.VARIANTS.items():
    cmd = study.command("configs/tiny.py", "w", 1, overrides)
    assert cmd[1:4] == ["-m", "tapo_jax.main", "--config=configs/tiny.py"]
    assert all(a.startswith("--config.") for a in cmd[6:]), name


def test_describe_change_names_first_and_last_eval():
  evals = {0: {"chain/avg@4": 0.25, "chain/greedy": 0.5, "chain/pass@4": 0.6}, 20: {
    "chain/avg@4": 0.375, "chain/greedy": 0.625, "chain/pass@4": 0.7}}  # fmt: skip
  assert describe_change(evals).splitlines() == [
    "held-out chain avg@4: 0.250 (step 0) -> 0.375 (step 20)",
    "held-out chain greedy: 0.500 (step 0) -> 0.625 (step 20)",
  ]


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--seeds=a"], "error: --seeds=a: expected comma-separated integers"),
    (["--set=train.eval_every=0"], "a study needs an eval before and after training"),
    (["--set=train.eval_at_start=False"], "eval_at_start=False, eval_every=20, steps=20"),
    (["--set=train.steps=30"], "eval_every=20, steps=30"),
    (["--set=train.steps=0"], "eval_every=20, steps=0"),
    (["--set=rollout.n=1"], "error: grpo: config.rollout.n=1"),
    (["--set=no_such.key=1"], "error: grpo: unknown config key 'no_such' in --set"),
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such file"),
  ],
)
def test_bad_studies_exit_2_before_any_run(tmp_path, capsys, flags, message):
  """Issue 24.7: --seeds=a was a traceback, and a config without a final eval was found out only
  after the first run had trained."""
  out = tmp_path / "study"
  with pytest.raises(SystemExit) as e:
    study.main([f"--out={out}", "--variants=grpo", *flags])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  assert message in err[0], err
  assert not out.exists()


# --------------------------------------------------------------------- paired differences, compute


def test_at_seconds_interpolates_and_holds_the_final_eval():
  curve = [{"train_s": 0.0, "m": 0.2}, {"train_s": 10.0, "m": 0.4}, {"train_s": 20.0, "m": 0.6}]
  assert study.at_seconds(curve, 15.0, "m") == pytest.approx(0.5)
  assert study.at_seconds(curve, 0.0, "m") == 0.2
  assert study.at_seconds(curve, 30.0, "m") == 0.6  # finished under the budget: its final eval
  assert study.at_seconds([{"train_s": 0.0, "m": None}], 1.0, "m") is None


def test_bootstrap_interval_is_scipys_percentile_interval_of_the_mean():
  from scipy import stats

  d = [0.01, 0.03, -0.02, 0.05, 0.02]
  low, high = study.bootstrap_ci(d)
  ref = stats.bootstrap((np.asarray(d),), np.mean, n_resamples=9999, method="percentile",
                        rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
  assert (low, high) == (ref.low, ref.high)
  assert min(d) <= low < np.mean(d) < high <= max(d)
  assert study.bootstrap_ci([0.1]) is None and study.bootstrap_ci([0.1, 0.1]) == (0.1, 0.1)


def test_paired_differences_per_seed_at_the_end_and_at_equal_compute(tmp_path):
  """GRPO at 1 s/step; the variant at 2 s/step, so at GRPO's 3 training seconds it is halfway
  between its step-0 and step-3 evals (3 s of its 6)."""
  results = {"grpo": {}, "tapo-policy": {}}
  for seed, (g, t) in enumerate([(0.4, 0.5), (0.5, 0.5), (0.45, 0.6)]):
    _write_run(tmp_path / "g" / str(seed), 0.3, g, s_per_step=1.0)
    _write_run(tmp_path / "t" / str(seed), 0.3, t, s_per_step=2.0)
    results["grpo"][seed] = study.run_summary(str(tmp_path / "g" / str(seed)))
    results["tapo-policy"][seed] = study.run_summary(str(tmp_path / "t" / str(seed)))
  pairs = study.paired(results)
  assert set(pairs) == {"tapo-policy"}
  end = pairs["tapo-policy"]["avg@k end"]
  assert end["seeds"] == [0, 1, 2] and end["diffs"] == pytest.approx([0.1, 0.0, 0.15])
  assert end["mean"] == pytest.approx(0.25 / 3) and end["ci"][0] <= end["mean"] <= end["ci"][1]
  eq = pairs["tapo-policy"]["avg@k equal compute"]
  assert eq["diffs"] == pytest.approx([(0.3 + 0.5) / 2 - 0.4, 0.4 - 0.5, 0.45 - 0.45])
  text = study.paired_table(pairs)
  assert text.splitlines()[2].startswith("| tapo-policy | 0,1,2 | +0.083 [")
  assert "(0: +0.100, 1: +0.000, 2: +0.150)" in text
  analyses = study.paired_table(pairs, study.PAIRED[2:])
  assert analyses.splitlines()[2] == "| tapo-policy | – | – | – | – | – |"  # not in these metrics
  assert study.paired({"tapo-policy": results["tapo-policy"]}) == {}  # no grpo: nothing paired


# ------------------------------------------------------------------------------- profiles, flags


@pytest.mark.parametrize("name", list(study.PROFILES))
def test_profiles_are_valid_studies(name):
  a = study._flags([f"--profile={name}"])
  study.check_runs(a)  # every variant's config validates and evaluates before and after
  cfg = study.load_config(a.config, study.run_overrides(a, a.variants[-1]))
  if name == "quick":
    assert cfg.train.steps <= 2 and cfg.eval.toy_problems <= 8 and len(a.seeds) * len(
      a.variants) <= 4  # fmt: skip
    return
  assert len(a.seeds) >= (5 if name == "full" else 3) and "grpo" in a.variants
  assert cfg.train.steps >= 100 and cfg.train.eval_every == 25 and cfg.eval.toy_problems >= 256
  assert cfg.eval.k == 8 and tuple(cfg.eval.pass_ks) == (1, 8) and cfg.eval.greedy
  assert cfg.eval.temperature == 1.0


def test_profile_flags_are_replaced_and_extended():
  a = study._flags(["--quick", "--seeds=3", "--set=train.steps=4", "--set=train.eval_every=4"])
  assert a.profile == "quick" and a.seeds == [3] and a.variants == ["grpo", "tapo-divergence"]
  overrides = study.run_overrides(a, "grpo")
  assert overrides[: len(study.PROFILES["quick"].sets)] == list(study.PROFILES["quick"].sets)
  assert study.load_config(a.config, overrides).train.steps == 4  # --set comes last and wins
  assert study._flags([]).seeds == [0, 1, 2] and study._flags([]).variants == list(study.VARIANTS)


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--jobs=0"], "error: --jobs=0: expected an integer >= 1"),
    (["--jobs=two"], "error: --jobs=two: expected an integer >= 1"),
    (["--profile=nope"], "error: --profile=nope: unknown (known: full, ablations, quick)"),
    (["--quick", "--profile=full"], "error: --quick with --profile=full: pick one"),
  ],
)
def test_bad_study_flags_exit_2(capsys, flags, message):
  with pytest.raises(SystemExit) as e:
    study._flags(flags)
  assert e.value.code == 2 and capsys.readouterr().err.strip() == message


# ------------------------------------------------------------------- runs: two at a time, resume

FAKE_RUN = textwrap.dedent(
  """
  import json, os, sys, time
  workdir, variant, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
  open(os.path.join(out, f"start_{variant}_{seed}"), "w").write(repr(time.time()))
  if os.path.exists(os.path.join(out, f"fail_{variant}_{seed}")):
    print("boom: a failing run")
    sys.exit(3)
  time.sleep(1.0)
  os.makedirs(workdir, exist_ok=True)
  rows = [{"step": 0, "eval/chain/avg@2": 0.25, "eval/chain/greedy": 0.5},
          {"step": 1, "time/step": 1.0}, {"step": 2, "time/step": 1.0},
          {"step": 2, "eval/chain/avg@2": 0.25 + 0.1 * seed, "eval/chain/greedy": 0.5}]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\\n" for r in rows))
  open(os.path.join(out, f"end_{variant}_{seed}"), "w").write(repr(time.time()))
  """
)


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
  """study.command replaced by FAKE_RUN (a second of work, then an eval before and after), with
  its start and end times in tmp_path/times; a file fail_VARIANT_SEED there makes that run fail."""
  times = tmp_path / "times"
  times.mkdir()

  def command(config, workdir, seed, overrides):
    variant = os.path.basename(os.path.dirname(workdir))
    return [sys.executable, "-c", FAKE_RUN, workdir, variant, str(seed), str(times)]

  monkeypatch.setattr(study, "command", command)
  return times


def _spans(times):
  """{(variant, seed): (start, end)} of the fake runs that finished."""
  out = {}
  for f in times.glob("end_*"):
    key = f.name.removeprefix("end_")
    out[key] = (float((times / f"start_{key}").read_text()), float(f.read_text()))
  return out


def test_jobs_2_runs_two_at_a_time_and_resumes_what_is_missing(tmp_path, fake_runs, capsys):
  out = tmp_path / "study"
  flags = [f"--out={out}", "--variants=grpo,tapo-divergence", "--seeds=0,1", "--jobs=2"]
  assert study.main(flags) == 0
  spans = sorted(_spans(fake_runs).values())
  assert len(spans) == 4
  # at most two at a time, and two did overlap
  events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
  assert max(np.cumsum([d for _, d in events])) == 2
  printed = capsys.readouterr().out
  assert "(log: " in printed and (out / "grpo" / "seed_1.log").exists()
  summary = json.loads((out / "summary.json").read_text())
  assert summary["paired"]["tapo-divergence"]["avg@k end"]["diffs"] == [0.0, 0.0]
  # a rerun finds everything done; one more seed runs only its two runs
  for f in fake_runs.iterdir():
    f.unlink()
  assert study.main([*flags[:-1], "--seeds=0,1,2"]) == 0
  assert sorted(_spans(fake_runs)) == ["grpo_2", "tapo-divergence_2"]
  assert "study 1/2: grpo seed 2" in capsys.readouterr().out


def test_a_failed_run_names_its_log_exits_1_and_does_not_stop_the_other(
  tmp_path, fake_runs, capsys
):
  (fake_runs / "fail_tapo-divergence_0").touch()
  out = tmp_path / "study"
  flags = [f"--out={out}", "--variants=grpo,tapo-divergence", "--seeds=0,1", "--jobs=2"]
  assert study.main(flags) == 1
  err = capsys.readouterr().err.strip().splitlines()
  log = out / "tapo-divergence" / "seed_0.log"
  assert err == [f"error: tapo-divergence seed 0 exited 3; see {log}"]
  assert "boom: a failing run" in log.read_text()
  assert sorted(_spans(fake_runs)) == ["grpo_0"]  # ran beside it, finished; nothing new started
  assert set(json.loads((out / "summary.json").read_text())["runs"]) == {"grpo"}


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, monkeypatch, capsys):
  """--quick: real `python -m tapo_jax.main` runs (2 variants x 2 seeds x 2 steps, two at a time)
  and the whole report; keeps the machinery working, concludes nothing. First `python -m
  tapo_jax.study` itself, stopped by Ctrl-C once its first two runs train: they checkpoint, it
  exits 130, and the same study resumes them."""
  import jax

  jax.device_count()  # this process's 8 devices initialized before XLA_FLAGS changes
  child = cli.env()  # the children on one device and without torch, like a user's
  out = tmp_path / "study"
  flags = ["--quick", f"--out={out}", "--jobs=2"]
  proc = subprocess.Popen(
    cli.with_ctrl_c("tapo_jax.study", *flags), cwd=cli.ROOT, env=child,
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  logs = [out / "grpo" / "seed_0.log", out / "tapo-divergence" / "seed_0.log"]
  deadline = time.time() + 600
  while not all(log.exists() and "train:" in log.read_text() for log in logs):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(proc.communicate()[1][-3000:])
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
  assert "the same command resumes it" in err.splitlines()[-1]
  for log in logs:  # (the runs are in sessions of their own: the study passed Ctrl-C on)
    assert "checkpointed step" in log.read_text(), log.read_text()[-2000:]
  assert not (out / "grpo" / "seed_1").exists()

  for key in ("XLA_FLAGS", "PYTHONPATH"):
    monkeypatch.setenv(key, child[key])
  assert study.main(flags) == 0, capsys.readouterr().err
  assert "resumed from" in (out / "grpo" / "seed_0.log").read_text()
  summary = json.loads((out / "summary.json").read_text())
  assert {v: sorted(r) for v, r in summary["runs"].items()} == {
    "grpo": ["0", "1"], "tapo-divergence": ["0", "1"]}  # fmt: skip
  run = summary["runs"]["tapo-divergence"]["0"]
  assert [c["step"] for c in run["curve"]] == [0, 2] and run["curve"][1]["train_s"] > 0
  assert run["first-pass after"] is not None and run["curve"][0]["greedy"] is not None
  rows = [json.loads(line) for line in (out / "grpo" / "seed_0" / "eval" / "step_2" /
                                        "chain.jsonl").open()]  # fmt: skip
  assert len(rows) == 4 and all(len(r["first_pass"]) == 2 for r in rows)
  pairs = summary["paired"]["tapo-divergence"]
  assert pairs["avg@k end"]["seeds"] == [0, 1] and pairs["greedy equal compute"]["mean"] is not None
  assert (out / "study.png").exists() and "Paired with grpo" in (out / "study.md").read_text()


def test_a_run_of_another_config_in_out_stops_the_study(tmp_path, fake_runs, capsys):
  """A finished 20-step run would pass for a finished run of a 100-step study (and main resumes
  an unfinished one with a new step budget silently): the study refuses before running."""
  out = tmp_path / "study"
  flags = [f"--out={out}", "--variants=grpo", "--seeds=0"]
  assert study.main(flags) == 0  # a run of this config: its config.json matches
  cfg = study.load_config("configs/tiny.py", ["seed=0", *study.VARIANTS["grpo"]])
  (out / "grpo" / "seed_0" / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
  for f in fake_runs.iterdir():
    f.unlink()
  assert study.main(flags) == 0 and not list(fake_runs.iterdir())  # the same config: reused
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    study.main([*flags, "--profile=full"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1, err
  assert err[0].startswith(f"error: {out / 'grpo' / 'seed_0'}: ran another config than this")
  assert "eval.k 4 -> 8" in err[0] and "use another --out" in err[0]
  assert not list(fake_runs.iterdir())
  # a run from before a key existed: it ran with the key's default
  older = cfg.to_dict()
  del older["train"]["curves"]
  (out / "grpo" / "seed_0" / "config.json").write_text(json.dumps({"config": older}))
  assert study.main(flags) == 0 and not list(fake_runs.iterdir())
  with pytest.raises(SystemExit) as e:
    study.main([*flags, "--set=train.curves=False"])
  assert "train.curves True -> False" in capsys.readouterr().err
