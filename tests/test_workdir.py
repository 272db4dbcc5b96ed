"""The workdir record (config.json + data fingerprint, checked on resume) and the workdir lock."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tapo_jax import config as base
from tapo_jax.train import workdir as wd


def cfg_for(train_path=""):
  c = base.base_config()
  c.model.toy = "arith"
  c.data.train_path = str(train_path)
  return c


def with_checkpoint(path):
  os.makedirs(path / "checkpoints" / "3", exist_ok=True)


def test_first_run_writes_the_config_and_the_data_fingerprint(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"problem": "1+1", "answer": "2"}\n')
  c = cfg_for(data)
  assert wd.record_config(tmp_path / "w", c) == {}
  stored = json.loads((tmp_path / "w" / "config.json").read_text())
  assert stored["config"]["optim"]["lr"] == c.optim.lr
  assert stored["config"]["rollout"]["prefill_buckets"] == list(c.rollout.prefill_buckets)
  fp = stored["data"][str(data.resolve())]
  # sha256 of the file's bytes, computed independently
  import hashlib

  assert fp["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
  assert fp["size"] == data.stat().st_size
  assert wd.read_config(tmp_path / "w") == stored["config"]
  assert not [p for p in os.listdir(tmp_path / "w") if p.startswith(".config.json")]  # no temp


def test_resume_with_more_steps_is_silent_and_recorded(tmp_path):
  wd.record_config(tmp_path, cfg_for())
  with_checkpoint(tmp_path)
  c = cfg_for()
  c.train.steps = 400
  c.eval.k = 8
  warnings = []
  changes = wd.record_config(tmp_path, c, warn=warnings.append)
  assert set(changes) == {"train.steps", "eval.k"} and warnings == []
  assert wd.read_config(tmp_path)["train"]["steps"] == 400


def test_resume_with_another_lr_warns_naming_each_key(tmp_path):
  wd.record_config(tmp_path, cfg_for())
  with_checkpoint(tmp_path)
  c = cfg_for()
  c.optim.lr = 3e-6
  c.rollout.n = 16
  warnings = []
  wd.record_config(tmp_path, c, warn=warnings.append)
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert "optim.lr 1e-06 -> 3e-06" in warnings[0] and "rollout.n 8 -> 16" in warnings[0]
  warnings.clear()
  wd.record_config(tmp_path, c, warn=warnings.append)  # the change is recorded: no repeat
  assert warnings == []


@pytest.mark.parametrize(
  "key,value",
  [("model.toy", ""), ("seed", 7), ("data.shuffle", False), ("mode", "sft"), ("sft.path", "x")],
)
def test_resume_with_a_breaking_change_is_an_error(tmp_path, key, value):
  wd.record_config(tmp_path, cfg_for())
  with_checkpoint(tmp_path)
  c = cfg_for()
  section, _, name = key.rpartition(".")
  (c[section] if section else c)[name] = value
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(wd.ResumeError) as e:
    wd.record_config(tmp_path, c)
  assert key in str(e.value) and "--workdir" in str(e.value)
  assert (tmp_path / "config.json").read_text() == before  # nothing written


@pytest.mark.parametrize(
  "text",
  ["{not json", "[1, 2]", '{"config": 5}', '{"config": {}, "data": [1]}',
   '{"config": {}, "data": {"x": 3}}', "\udcff"],
)  # fmt: skip
def test_a_damaged_record_beside_checkpoints_is_an_error(tmp_path, text):
  """Issue 24.7: a corrupt config.json was taken as no record (a changed lr resumed without the
  warning) and a wrong-shaped one was an AttributeError."""
  wd.record_config(tmp_path, cfg_for())
  with_checkpoint(tmp_path)
  (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
  c = cfg_for()
  c.optim.lr = 3e-6
  with pytest.raises(wd.ResumeError, match=r"config.json: unreadable \(.*\); it records") as e:
    wd.record_config(tmp_path, c, warn=pytest.fail)
  assert "\n" not in str(e.value)
  assert (tmp_path / "config.json").read_bytes() == text.encode("utf-8", "surrogateescape")
  with pytest.raises(wd.ResumeError, match="unreadable"):
    wd.read_config(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints")  # no checkpoints: a fresh run records its own
  wd.record_config(tmp_path, c, warn=pytest.fail)
  assert wd.read_config(tmp_path)["optim"]["lr"] == 3e-6


def test_changed_data_file_is_an_error_on_resume_only(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"problem": "1+1", "answer": "2"}\n')
  w = tmp_path / "w"
  wd.record_config(w, cfg_for(data))
  wd.record_config(w, cfg_for(data))  # no checkpoint yet: anything goes
  with_checkpoint(w)
  wd.record_config(w, cfg_for(data))  # same data: fine
  os.utime(data, (1, 1))  # touched, same bytes: the hash decides, fine
  wd.record_config(w, cfg_for(data))
  data.write_text('{"problem": "1+2", "answer": "3"}\n')
  with pytest.raises(wd.ResumeError, match="data file changed"):
    wd.record_config(w, cfg_for(data))


def test_fingerprint_reuses_the_hash_only_when_size_and_mtime_agree(tmp_path):
  f = tmp_path / "a.jsonl"
  f.write_text("abc")
  fp = wd.fingerprint(str(f))
  assert wd.fingerprint(str(f), {**fp, "sha256": "cached"})["sha256"] == "cached"
  assert wd.fingerprint(str(f), {**fp, "size": 99, "sha256": "cached"})["sha256"] == fp["sha256"]


def test_changed_keys_flattens_and_sees_added_and_removed():
  old = {"a": {"b": 1, "c": [1, 2]}, "gone": 1}
  new = {"a": {"b": 2, "c": [1, 2]}, "new": "x"}
  assert wd.changed_keys(old, new) == {"a.b": (1, 2), "gone": (1, None), "new": (None, "x")}


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
  with wd.hold(str(tmp_path)):
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(wd.WorkdirBusy) as e:
      wd.Lock(str(tmp_path)).acquire()  # a second open file description: flock refuses it
    assert f"pid {os.getpid()}" in str(e.value) and str(tmp_path) in str(e.value)
  with wd.hold(str(tmp_path)):  # released at the end of the block
    pass
  with wd.hold("gs://bucket/run"):  # no flock on cloud paths: nothing to take
    pass


def test_lock_held_by_another_process_and_freed_when_it_dies(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from tapo_jax.train import workdir
      workdir.Lock({str(tmp_path)!r}).acquire()
      print("held", flush=True)
      time.sleep(60)
    """)],
    stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(wd.WorkdirBusy, match=f"pid {holder.pid}"):
      wd.Lock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  wd.Lock(str(tmp_path)).acquire().release()  # the kernel freed the dead holder's lock
