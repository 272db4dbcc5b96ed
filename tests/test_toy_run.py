"""The shipped toy checkpoints: their calibration, and a few real RL steps from the `chain` one."""

import json
import pathlib

import cli
import numpy as np
import pytest

from tapo_jax.toy import chain, measure

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_chain_model_is_in_the_calibrated_range():
  # 64 held-out problems x 8 samples at T=1 (fixed seed): the range TAPO needs (docs/toy.md)
  model, tokenizer, eos = measure.load(str(chain.CHECKPOINT_DIR))
  problems = chain.make_split("heldout", 64, seed=0)
  groups = measure.sample_groups(model, tokenizer, eos, problems, k=8, seed=0)
  stats = measure.accuracy_stats(groups)
  assert 0.25 <= stats["avg@k"] <= 0.55, stats
  assert stats["eligible"] >= 0.25, stats  # >= 2 right and >= 4 wrong of 8 (the paper's DCS)
  kinds = {
    measure.error_kind(t, problems[i // 8].solution)
    for i, t in enumerate(groups.texts)
    if not groups.correct.reshape(-1)[i]
  }
  assert kinds & {"digit", "carry", "result"}, kinds  # step errors, not format failures


def test_shipped_arith_model_writes_a_step_a_line_in_the_calibrated_range():
  """Issue 24.9: the tests' fast model was trained through the legacy tokenizer, which dropped
  spaces and newlines (it wrote 12+7=1919+30=49); rebuilt byte-level it writes one step a line,
  and at configs/smoke.py's temperature its groups are mixed enough for DCS (2 and 2 of 8)."""
  from tapo_jax.toy import arith

  model, tokenizer, eos = measure.load(str(arith.CHECKPOINT_DIR))
  problems = arith.make_problems(64, seed=99)
  groups = measure.sample_groups(model, tokenizer, eos, problems, k=8, temperature=1.3, seed=0)
  assert sum("\n" in t for t in groups.texts) >= 0.95 * len(groups.texts)
  right = [t for t, c in zip(groups.texts, groups.correct.reshape(-1)) if c]
  solutions = {p.solution for p in problems}
  assert sum(t in solutions for t in right) >= 0.95 * len(right)  # the gold lines exactly
  stats = measure.accuracy_stats(groups, n_pos=2, n_neg=2)
  assert 0.55 <= stats["avg@k"] <= 0.9 and stats["eligible"] >= 0.35, stats


@pytest.mark.slow
def test_a_few_tiny_steps_train_on_constructions_that_reach_the_gold(tmp_path):
  out = cli.run(
    tmp_path, "--config.train.steps=2", "--config.train.eval_at_start=False",
    "--config.train.eval_every=0", "--config.tapo.construction=policy",
    "--config.tapo.ref_baseline=group", config="configs/tiny.py", timeout=900,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert [r["step"] for r in rows] == [1, 2]
  # the paper's construction: the policy's own rewrites, parsed, anchored and graded
  assert sum(r["tapo/eligible_rate"] for r in rows) > 0
  assert sum(r["tapo/constructions_parsed"] for r in rows) > 0
  assert sum(r["tapo/constructions_correct"] for r in rows) > 0
  assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
  assert any(r["loss/ref"] != 0 for r in rows)
  assert (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("name", ["arith", "chain"])
def test_every_toy_domain_has_its_checkpoint_and_problems(name):
  from tapo_jax import toy

  assert (toy.checkpoint_dir(name) / "config.json").exists()
  train = toy.train_problems(name, seed=0, n=16)
  held = toy.eval_problems(name, seed=0, n=16)
  assert len(train) == len(held) == 16 and all(p.answer for p in train + held)
  if name == "chain":  # disjoint splits, the same held-out set whatever the run's seed
    assert not {p.problem for p in train} & {p.problem for p in held}
    assert held == toy.eval_problems(name, seed=5, n=16)
