"""The study's bookkeeping on hand-written metrics (the runs themselves: tests/test_toy_run.py)."""

import json

import pytest

from tapo_jax import study
from tapo_jax.eval.evaluate import describe_change


def _write_run(workdir, before, after, *, eligible=0.5, parsed=3, attempted=4, correct=2):
  workdir.mkdir(parents=True)
  rows = [
    {"step": 0, "eval/chain/avg@4": before, "eval/chain/greedy": before, "eval/chain/pass@1": 0.1,
     "eval/chain/pass@4": 0.5},
    *(
      {
        "step": s,
        "time/step": 2.0 + s,
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
  assert s["curve"] == [(0, 0.25), (3, 0.5)]


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
  assert (tmp_path / "study.md").read_text().count("\n") == 4


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
