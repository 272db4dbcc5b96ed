"""mode=coldstart: the cold-start data builder on the toy model (policy and teacher), with a local
HTTP teacher, resumed after a stop and after a crash cut a chunk short, and its output trained on
by mode=sft in a real CLI process."""

import hashlib
import importlib.util
import json
import pathlib
import shutil
import threading

import cli
import local_http
import pytest

from tapo_jax import main
from tapo_jax.coldstart import build as coldstart
from tapo_jax.coldstart import teachers
from tapo_jax.rewards import grade
from tapo_jax.tapo import synthesis

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = "{query}|{incorrect}|{correct}|"  # '|' is not in the toy vocabulary: fields split back


def _config(train, **coldstart_keys):
  c = cli.config("smoke")
  c.mode = "coldstart"
  c.data.train_path = str(train)
  c.data.max_prompt_tokens = 32
  c.rollout.n, c.rollout.slots, c.rollout.max_new_tokens = 4, 16, 40
  c.rollout.temperature = 1.2  # mixed groups, and (this seed) no stray <unk>, which anchors nothing
  c.rollout.prefill_buckets = (32,)  # few programs to compile
  c.tapo.n_pos, c.tapo.n_neg, c.tapo.m_max = 1, 1, 2
  c.tapo.synthesis_template = TEMPLATE
  c.tapo.synthesis_max_new_tokens = 48
  c.tapo.min_anchor = 0.25
  c.coldstart.chunk_problems = 4
  c.coldstart.constructions, c.coldstart.solutions = 1000, 1000
  for key, value in coldstart_keys.items():
    c.coldstart[key] = value
  main.validate(c, 8)
  return c


def _problems(path, n=12, seed=7):
  from tapo_jax.toy import arith

  rows = [
    {"id": f"p{i}", "problem": p.problem, "answer": p.answer}
    for i, p in enumerate(arith.make_problems(n, seed=seed))
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return {r["id"]: r for r in rows}


def _rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _check_consistent(workdir, problems, cfg):
  rows = _rows(workdir / "coldstart.jsonl")
  summary = json.loads((workdir / "coldstart_summary.json").read_text())
  kinds = [r["kind"] for r in rows]
  assert summary["constructions"] == kinds.count("construction")
  assert summary["solutions"] == kinds.count("solution")
  assert len({r["id"] for r in rows}) == len(rows)  # no row twice
  for r in rows:
    assert r["id"] == coldstart.make_row(r["kind"], "", r["prompt"], r["response"])["id"]
    if r["kind"] == "solution":  # the RL prompt text, answered correctly
      assert r["prompt"] == problems[r["problem_id"]]["problem"]  # tiny's template: "{problem}"
      assert grade(r["response"], problems[r["problem_id"]]["answer"]) == 1.0
  per_problem = {}
  for r in rows:
    per_problem[(r["kind"], r["problem_id"])] = per_problem.get((r["kind"], r["problem_id"]), 0) + 1
  assert all(n <= cfg.coldstart.solutions_per_problem for (kind, _), n in per_problem.items()
             if kind == "solution")  # fmt: skip
  return rows, summary


# ------------------------------------------------------------------ the toy model as the teacher


def test_toy_model_as_policy_and_teacher(tmp_path):
  problems = _problems(tmp_path / "train.jsonl")
  cfg = _config(tmp_path / "train.jsonl")
  coldstart.run(cfg, str(tmp_path / "wd"))
  rows, summary = _check_consistent(tmp_path / "wd", problems, cfg)
  assert summary["complete"] is False and summary["chunks_done"] == summary["chunks_total"] == 3
  assert summary["problems"] == 12 and summary["rollouts"] == 48
  assert summary["solutions"] >= 6  # the toy model solves ~80%: most problems give one
  assert summary["pairs"] >= 1 and summary["prompted"] + summary["too_long"] == summary["pairs"]
  assert summary["parsed"] <= summary["prompted"] and summary["correct"] <= summary["anchored"]
  assert summary["constructions"] <= summary["correct"]  # it is not cold-started: few or none
  assert (
    0.0 <= summary["parse_rate"] <= 1.0
    and summary["parse_rate"] * summary["prompted"] == (summary["parsed"])
  )

  # A build that used up its file reruns as a no-op; other row-deciding settings are refused.
  before = (tmp_path / "wd" / "coldstart.jsonl").read_bytes()
  coldstart.run(cfg, str(tmp_path / "wd"))
  assert (tmp_path / "wd" / "coldstart.jsonl").read_bytes() == before
  foreign = _config(tmp_path / "train.jsonl", output=str(tmp_path / "wd" / "coldstart.jsonl"))
  with pytest.raises(coldstart.BuildError, match="not this build's output"):
    coldstart.run(foreign, str(tmp_path / "elsewhere"))  # a new workdir must not truncate it
  assert (tmp_path / "wd" / "coldstart.jsonl").read_bytes() == before
  assert not (tmp_path / "elsewhere").exists()
  other = _config(tmp_path / "train.jsonl")
  other.rollout.n = 8
  with pytest.raises(coldstart.BuildError, match=r"config\.rollout\.n=4, now 8"):
    coldstart.run(other, str(tmp_path / "wd"))


# ------------------------------------------------------------------------- an HTTP teacher


def _canned(prompt: str, seed: int) -> tuple[str, str]:
  """(behaviour, reply) for one synthesis prompt: by the request's seed, a good construction
  (prefix of y⁻, a correction, y⁺), an unparsable reply, a full reconstruction (keeps none of
  y⁻) or an anchored one that ends wrong."""
  query, bad, good, _ = prompt.split("|")
  prefix = bad[: max(1, len(bad) // 2)]
  kind = ("good", "garbage", "full", "wrong")[seed % 4]
  recon = {
    "good": f"{prefix} Wait, that step is wrong. Redo: {good}",
    "full": f"Let me redo this. {good}",
    "wrong": f"{prefix} Wait, recheck. \\boxed{{-1}}",
  }.get(kind)
  if recon is None:
    return kind, "I think the error is in step two."
  analysis = "The first sum is added up wrong."
  return kind, f"<analysis>{analysis}</analysis>\n<reconstruction>{recon}</reconstruction>"


class _Teacher(local_http.Server):
  def __init__(self):
    super().__init__(_Handler)
    self.log, self.lock, self.fail_next = [], threading.Lock(), 1  # the first request gets a 503


class _Handler(local_http.Handler):
  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with self.server.lock:
      fail, self.server.fail_next = self.server.fail_next > 0, self.server.fail_next - 1
    if self.path != "/v1/chat/completions" or body["model"] != "toy-teacher":
      code, reply = 404, {"error": "no such model or path"}
    elif fail:
      code, reply = 503, {"error": "warming up"}
    else:
      prompt = body["messages"][0]["content"]
      kind, text = _canned(prompt, body["seed"])
      with self.server.lock:
        self.server.log.append((kind, prompt))
      code, reply = 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}
    self.send_json(code, json.dumps(reply).encode())


def _serve():
  server = _Teacher()
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def _http_config(train, url, **keys):
  return _config(
    train, teacher_url=url, teacher_model="toy-teacher", teacher_workers=4, teacher_retries=2,
    teacher_timeout_s=30.0, solutions=5, **keys,
  )  # fmt: skip


@pytest.fixture(scope="module")
def http_build(tmp_path_factory):
  """A build whose teacher is a local HTTP server: (workdir, problems, server log)."""
  tmp = tmp_path_factory.mktemp("http")
  problems = _problems(tmp / "train.jsonl", n=16, seed=3)
  server = _serve()
  try:
    coldstart.run(_http_config(tmp / "train.jsonl", server.url), str(tmp / "wd"))
  finally:
    server.shutdown()
    server.server_close()
  return tmp / "wd", problems, server.log


def test_http_teacher_rows_parse_anchor_to_y_neg_and_reach_the_gold(http_build):
  from tapo_jax.policy import load_policy

  workdir, problems, log = http_build
  cfg = _http_config(workdir.parent / "train.jsonl", "http://unused")
  rows, summary = _check_consistent(workdir, problems, cfg)
  assert summary["solutions"] == 5 and summary["complete"] is False  # capped at its target
  assert summary["chunks_done"] == summary["chunks_total"] == 4
  kinds = [kind for kind, _ in log]
  assert summary["prompted"] == len(log) == summary["pairs"] >= 4  # the 503 was retried
  assert summary["parsed"] == len(log) - kinds.count("garbage")
  assert summary["anchored"] == kinds.count("good") + kinds.count("wrong")
  assert summary["correct"] == kinds.count("good") >= 1
  assert summary["anchored"] - summary["correct"] == kinds.count("wrong")
  good = {prompt for kind, prompt in log if kind == "good"}
  cons = [r for r in rows if r["kind"] == "construction"]
  assert {r["prompt"] for r in cons} == good  # every good one, once
  assert sum(summary["anchored_fraction_hist"]) == summary["anchored"]

  _, _, tok = load_policy(cfg)
  for r in cons:
    query, bad, _, _ = r["prompt"].split("|")
    problem = problems[r["problem_id"]]
    assert query == problem["problem"]
    analysis, recon = synthesis.parse_construction(r["response"])
    ids = tok.encode(bad, add_special_tokens=False)
    n, rest = synthesis.anchor_text(tok, ids, recon)
    assert n >= len(ids) // 2 >= 1 and tok.decode(ids[:n]) + rest == recon  # y⁻'s own prefix
    assert recon.startswith(bad[: max(1, len(bad) // 2)])
    assert grade(recon, problem["answer"]) == 1.0


def test_http_build_resumes_after_a_stop_and_a_crash_to_the_same_file(http_build, tmp_path):
  """Stopped after one chunk (coldstart.max_chunks), then killed while writing the next chunk
  (rows after the committed size, the last one cut short), then resumed: the very same file."""
  straight, _, _ = http_build
  server = _serve()
  try:
    train, chain = straight.parent / "train.jsonl", tmp_path / "wd"
    out = coldstart.run(_http_config(train, server.url, max_chunks=1), str(chain))
    assert out["chunks_done"] == 1 and out["chunks_total"] == 4
    progress = json.loads((chain / "coldstart_progress.json").read_text())
    assert progress["bytes"] == (chain / "coldstart.jsonl").stat().st_size > 0
    rows = _rows(straight / "coldstart.jsonl")
    with open(chain / "coldstart.jsonl", "a") as f:
      f.write(json.dumps(rows[-1]) + "\n" + '{"id": "half-wr')
    coldstart.run(_http_config(train, server.url), str(chain))
  finally:
    server.shutdown()
    server.server_close()
  assert (chain / "coldstart.jsonl").read_bytes() == (straight / "coldstart.jsonl").read_bytes()
  resumed = json.loads((chain / "coldstart_summary.json").read_text())
  summary = json.loads((straight / "coldstart_summary.json").read_text())
  for key in (*coldstart.COUNTERS, "anchored_fraction_hist"):
    assert resumed[key] == summary[key], key


def test_a_second_build_on_the_same_output_is_refused(http_build, tmp_path):
  """Issue 24.3: two builds with their own workdirs and one coldstart.output both wrote every row.
  While one build holds the output, another is refused before it loads anything."""
  train = http_build[0].parent / "train.jsonl"
  shared = tmp_path / "shared.jsonl"
  with coldstart.OutputLock(str(shared), fresh=True):  # build A, mid-build
    with pytest.raises(coldstart.BuildError, match="another build is writing it"):
      coldstart.run(_http_config(train, "http://unused", output=str(shared)), str(tmp_path / "b"))
  assert shared.read_bytes() == b"" and not (tmp_path / "b").exists()
  shared.write_text('{"id": "a row of build A"}\n')  # A wrote between B's check and its lock
  with pytest.raises(coldstart.BuildError, match="another build wrote it meanwhile"):
    coldstart.OutputLock(str(shared), fresh=True).__enter__()


def _damage_progress(text):
  return lambda wd: (wd / "coldstart_progress.json").write_text(text)


def _damage_field(key, value):
  def damage(wd):
    progress = json.loads((wd / "coldstart_progress.json").read_text())
    progress[key] = value
    (wd / "coldstart_progress.json").write_text(json.dumps(progress))

  return damage


def _damage_line(wd):
  lines = (wd / "coldstart.jsonl").read_bytes().splitlines(keepends=True)
  lines[1] = b"{" + b"#" * (len(lines[1]) - 2) + b"\n"  # the same size: only its bytes changed
  (wd / "coldstart.jsonl").write_bytes(b"".join(lines))


DAMAGE = [
  (_damage_progress("{not json"), "coldstart_progress.json: not a progress file"),
  (_damage_progress("[1, 2]"), "coldstart_progress.json: not a progress file"),
  (_damage_field("bytes", -5), "coldstart_progress.json: damaged field 'bytes': -5"),
  (_damage_field("counts", {"problems": 3}), "coldstart_progress.json: damaged field 'counts'"),
  (_damage_field("hist", [1]), "coldstart_progress.json: damaged field 'hist'"),
  (_damage_field("fingerprint", None), "damaged field 'fingerprint'"),
  (_damage_line, "coldstart.jsonl: line 2: not a row of this build"),
]


@pytest.mark.parametrize("damage,message", DAMAGE, ids=[m for _, m in DAMAGE])
def test_a_hand_damaged_build_is_one_error(http_build, tmp_path, damage, message):
  """Issue 24.7: a hand-edited progress file or committed output line was a traceback."""
  workdir = tmp_path / "wd"
  shutil.copytree(http_build[0], workdir)
  damage(workdir)
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  cfg = _http_config(http_build[0].parent / "train.jsonl", "http://unused")
  with pytest.raises(coldstart.BuildError) as e:
    coldstart.run(cfg, str(workdir))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def test_http_teacher_errors_are_one_line():
  server = _serve()
  server.fail_next = 10**9  # always 503
  kw = dict(temperature=0.0, top_p=1.0, max_tokens=8, seed=0, timeout_s=5.0)
  try:
    with pytest.raises(teachers.TeacherError) as e:
      teachers.chat_completion(server.url, "toy-teacher", "x", retries=1, **kw)
    assert "HTTP 503" in str(e.value) and "after 2 attempts" in str(e.value)
    with pytest.raises(teachers.TeacherError, match="HTTP 404"):  # not retried
      teachers.chat_completion(server.url + "/v1", "other-model", "x", retries=3, **kw)
  finally:
    server.shutdown()
    server.server_close()
  port = server.server_address[1]  # closed now: connection refused
  with pytest.raises(teachers.TeacherError, match="after 1 attempts") as e:
    teachers.chat_completion(f"http://127.0.0.1:{port}", "m", "x", retries=0, **kw)
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------- the CLI: sft on the output


def _cli(workdir, *flags):
  return cli.run(workdir, *flags, config="configs/smoke.py")


def test_sft_trains_on_the_built_file(http_build, tmp_path):
  workdir, _, _ = http_build
  data = workdir / "coldstart.jsonl"
  assert {r["kind"] for r in _rows(data)} == {"construction", "solution"}
  out = _cli(
    tmp_path, "--config.mode=sft", f"--config.sft.path={data}", "--config.sft.steps=2",
    "--config.sft.batch_size=4", "--config.optim.micro_batch=4", "--config.sft.max_len=128",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [1, 2]
  assert all(0 < m["nll"] < 100 and m["tokens"] > 0 for m in metrics)
  assert (tmp_path / "hf" / "model.safetensors").exists()


def test_cli_refuses_to_resume_a_build_with_other_settings(http_build):
  """mode=coldstart through the CLI: a workdir built with other row-deciding settings is one
  error line and exit 2 before any model is loaded, and the build is left as it was."""
  workdir, _, _ = http_build
  before = (workdir / "coldstart.jsonl").read_bytes()
  out = _cli(workdir, "--config.mode=coldstart", "--config.tapo.synthesis_max_new_tokens=48")
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "coldstart_progress.json" in last, last
  assert "use a new workdir" in last and (workdir / "coldstart.jsonl").read_bytes() == before


BAD = [
  (dict(teacher_url="localhost:8000"), "config.coldstart.teacher_url='localhost:8000'"),
  (dict(teacher_url="http://x"), "config.coldstart.teacher_model is empty"),
  (dict(teacher_url="http://x", teacher_model="m", teacher_path=str(ROOT)), "both set"),
  (dict(teacher_path="/nonexistent"), "config.coldstart.teacher_path='/nonexistent'"),
  (dict(chunk_problems=0), "config.coldstart.chunk_problems=0"),
  (dict(constructions=0, solutions=0), "both 0"),
  (dict(teacher_top_p=0.0), "teacher_top_p=0.0"),
  (dict(_n_pos=4), "config.tapo.n_pos + tapo.n_neg = 5 > rollout.n=4"),
  (dict(__distributed=True), "config.distributed=True: mode=coldstart runs on one host"),
  (dict(_synthesis_template="{query}"), "config.tapo.synthesis_template: synthesis template"),
]


@pytest.mark.parametrize("keys,message", BAD, ids=[m for _, m in BAD])
def test_bad_coldstart_config_is_one_line(tmp_path, keys, message):
  _problems(tmp_path / "train.jsonl", n=4)
  cfg = _config(tmp_path / "train.jsonl")
  for key, value in keys.items():
    if key.startswith("__"):
      cfg[key[2:]] = value
    elif key.startswith("_"):
      cfg.tapo[key[1:]] = value
    else:
      cfg.coldstart[key] = value
  with pytest.raises(main.ConfigError) as e:
    main.validate(cfg, 8)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_fill_template_is_str_format():
  """The teacher's prompt text: the template's literal pieces (doubled braces undone) around the
  fields, whose own braces stay as they are."""
  template = "A {{b}} {query}|{incorrect}|{correct}."
  filled = coldstart.fill_template(template, query="Q {x}", incorrect="1+1=3", correct="1+1=2")
  assert filled == "A {b} Q {x}|1+1=3|1+1=2."
  filled = coldstart.fill_template(
    synthesis.SYNTHESIS_TEMPLATE, query="q", incorrect="i", correct="c"
  )
  assert filled == synthesis.SYNTHESIS_TEMPLATE.format(query="q", incorrect="i", correct="c")
  digest = hashlib.sha256(json.dumps(["a", "b"]).encode()).hexdigest()[:32]
  assert coldstart.make_row("solution", "p", "a", "b")["id"] == digest


def test_three_stage_recipe_configs_agree():
  """The cold-start data, its SFT and TAPO RL render prompts alike: SFT trains on exactly the text
  the RL policy is prompted with (the synthesis template, the problem template, the chat wrap)."""

  def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()

  data, sft, rl = load("qwen7b_coldstart_data"), load("qwen7b_coldstart"), load("qwen7b")
  assert data.mode == "coldstart" and sft.mode == "sft" and rl.tapo.construction == "policy"
  assert (data.coldstart.constructions, data.coldstart.solutions) == (30000, 15000)
  assert data.rollout.n == rl.rollout.n == 8
  dcs = lambda c: (c.tapo.n_pos, c.tapo.n_neg, c.tapo.m_max)  # noqa: E731
  assert dcs(data) == dcs(rl) == (2, 4, 4)
  for key in ("data.prompt_template", "data.use_chat_template", "tapo.synthesis_template"):
    section, name = key.split(".")
    assert data[section][name] == rl[section][name] == sft[section][name], key
  assert data.rollout.max_new_tokens == rl.rollout.max_new_tokens
  assert data.model.path == sft.model.path == rl.model.path  # the same base model (or its SFT)
