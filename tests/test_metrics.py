"""Metric sinks after a resume: no step is logged twice in metrics.jsonl or TensorBoard."""

import glob
import json
import struct

from tensorboardX.proto import event_pb2

from tapo_jax import metrics


def events(logdir):
  """Every Event in the TensorBoard files of `logdir`, file by file in name (= time) order."""
  out = []
  for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      out.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
      i += 12 + n + 4  # length, its crc, the record, its crc
  return out


def steps_logged(workdir):
  return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_drops_rows_after_the_checkpoint_and_purges_tensorboard(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), total_steps=5, start_step=0, quiet=True)
  for step in (1, 2, 3):
    w.write(step, {"loss": float(step)})
  w.write(2, {"arith/avg@4": 0.5}, prefix="eval/")  # a periodic eval row of step 2
  w.close()
  # Killed after logging step 3 but before checkpointing it: resumed from step 2.
  w = metrics.MetricWriter(str(tmp_path), total_steps=5, start_step=2, quiet=True)
  w.write(3, {"loss": 30.0})
  w.close()
  assert steps_logged(tmp_path) == [1, 2, 2, 3]
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 30.0
  # TensorBoard: the second file opens with a SessionLog.START at step 3, which makes TensorBoard
  # drop the first file's events of steps >= 3.
  evs = events(tmp_path / "tb")
  starts = [e.step for e in evs if e.HasField("session_log") and e.session_log.status == 1]
  assert starts == [1, 3]
  loss = [(e.step, e.summary.value[0].simple_value) for e in evs if e.HasField("summary")]
  assert loss[-1] == (3, 30.0)


def test_eval_writer_appends_without_truncating(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
  w = metrics.MetricWriter(str(tmp_path), total_steps=0, quiet=True)
  w.write(0, {"x": 1.0}, prefix="eval/")
  w.close()
  assert steps_logged(tmp_path) == [5, 0]


def test_truncate_jsonl_drops_later_steps_and_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
  assert metrics.truncate_jsonl(str(path), 2) == 2
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  assert metrics.truncate_jsonl(str(path), 2) == 0
  assert metrics.truncate_jsonl(str(tmp_path / "none.jsonl"), 2) == 0
