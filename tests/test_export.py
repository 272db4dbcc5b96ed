"""Hugging Face export: a kept checkpoint of a workdir loads in transformers with our logits."""

import os
import pathlib
import subprocess
import sys

import cli
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tapo_jax import config as base
from tapo_jax import export
from tapo_jax import policy as policy_lib
from tapo_jax.models import CheckpointError
from tapo_jax.models import export as models_export
from tapo_jax.toy import arith
from tapo_jax.train import checkpoint
from tapo_jax.train import state as state_lib
from tapo_jax.train import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """(workdir, graphdef, params of step 2): an RL-like workdir whose step-2 params differ from the
  shipped toy model, with steps 1 and 2 kept."""
  workdir = tmp_path_factory.mktemp("run")
  cfg = base.base_config()
  cfg.model.toy = "arith"
  mesh, model, _ = policy_lib.load_policy(cfg)
  graphdef, state, _ = state_lib.create(model, mesh, state_lib.make_optimizer(cfg.optim, 10))
  workdir_lib.record_config(str(workdir), cfg)
  ck = checkpoint.Checkpointer(str(workdir), 1, 5)
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(
    lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), state.params
  )
  ck.save(1, state, {"data": {}})
  ck.save(2, state.replace(params=noisy), {"data": {}})
  ck.close()
  return workdir, graphdef, noisy


def test_exported_checkpoint_loads_in_transformers_with_our_logits(run_dir, tmp_path):
  workdir, graphdef, params = run_dir
  out = export.export_checkpoint(str(workdir), out=tmp_path / "hf")
  names = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
  assert "chat_template.jinja" in names
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  tokens = np.array([[3, 17, 42, 5, 60, 7, 11, 2]], np.int32)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
  ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
  # ... and they are not the shipped toy's logits: the export is step 2, not the base model.
  base_hf = transformers.AutoModelForCausalLM.from_pretrained(arith.CHECKPOINT_DIR)
  with torch.no_grad():
    assert not np.allclose(base_hf(torch.from_numpy(tokens).long()).logits.numpy(), theirs)
  # The tokenizer and its chat template travel with the weights.
  ours_tok = transformers.AutoTokenizer.from_pretrained(arith.CHECKPOINT_DIR)
  their_tok = transformers.AutoTokenizer.from_pretrained(out)
  msgs = [{"role": "user", "content": "Compute 1+2."}]
  kw = dict(add_generation_prompt=True, tokenize=False)
  assert their_tok.apply_chat_template(msgs, **kw) == ours_tok.apply_chat_template(msgs, **kw)
  assert their_tok.eos_token == ours_tok.eos_token


def test_export_replaces_the_directory_whole(run_dir, tmp_path):
  workdir, _, _ = run_dir
  out = tmp_path / "hf"
  export.export_checkpoint(str(workdir), step=2, out=out)
  (out / "model-00002-of-00002.safetensors").write_text("old")  # a stale shard of an earlier one
  export.export_checkpoint(str(workdir), step=1, out=out)
  assert "model-00002-of-00002.safetensors" not in os.listdir(out)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".hf.")]  # no temporary left


def _tree(root):
  return {
    str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
    for p in sorted(pathlib.Path(root).rglob("*"))
  }


def test_export_refuses_an_output_it_would_destroy(run_dir, tmp_path, capsys):
  """Issue 24.1: --out names the workdir, a directory above it, a file or a foreign directory:
  exit 2 with one error line, every file as it was (export used to move OUT aside and delete it)."""
  workdir, _, _ = run_dir
  (tmp_path / "notes.txt").write_text("keep me")
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "train.jsonl").write_text("{}\n")
  (tmp_path / "hfish").mkdir()  # a HF-looking directory with a file an export never writes
  (tmp_path / "hfish" / "config.json").write_text("{}")
  (tmp_path / "hfish" / "README.md").write_text("mine")
  cases = {
    str(workdir): "is ",
    str(workdir.parent): "holds ",
    str(workdir / ".." / workdir.name): "is ",
    str(tmp_path / "notes.txt"): "not a directory",
    str(tmp_path / "data"): "not an earlier export",
    str(tmp_path / "hfish"): "'README.md' is not a file an export writes",
  }
  before = _tree(workdir), _tree(tmp_path)
  for out, why in cases.items():
    assert export.main([str(workdir), f"--out={out}"]) == 2, out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out={out}: ") and why in err[0], err
    assert (_tree(workdir), _tree(tmp_path)) == before, out
  with pytest.raises(CheckpointError, match="is .*arith"):  # the source model is not replaced
    models_export.export_model(None, None, arith.CHECKPOINT_DIR, source_dir=arith.CHECKPOINT_DIR)


def test_default_output_is_the_newest_step_under_the_workdir(run_dir):
  workdir, _, _ = run_dir
  out = export.export_checkpoint(str(workdir))
  assert pathlib.Path(out) == workdir / "export" / "step_2"


def test_bad_requests_are_checkpoint_errors(run_dir, tmp_path):
  workdir, _, _ = run_dir
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 9 \(kept: \[1, 2\]\)"):
    export.export_checkpoint(str(workdir), step=9)
  bare = tmp_path / "bare"
  (bare / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="config.json: missing"):
    export.export_checkpoint(str(bare))


def test_export_command(run_dir, tmp_path):
  workdir, _, _ = run_dir
  env = cli.env()
  cmd = [sys.executable, "-m", "tapo_jax.export", str(workdir)]
  out = subprocess.run(
    [*cmd, "--step=1", f"--out={tmp_path / 'x'}"], cwd=ROOT, env=env, capture_output=True,
    text=True, timeout=300,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(tmp_path / "x")
  assert (tmp_path / "x" / "model.safetensors").exists()
  out = subprocess.run(
    [*cmd, "--step=5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error:") and "no checkpoint at step 5" in lines[-1]
  assert "Traceback" not in out.stderr
