"""Eight fake CPU devices for every test, set before JAX is imported anywhere; one persistent
compilation cache for the whole run; programs compiled the cheap way.

The tests' programs are tiny, so compiling them costs far more than running them (measured on 2
cores, CPU time):
- `--xla_backend_optimization_level=0` (LLVM -O0 for the generated code) takes ~30% off a CLI
  test run and ~38% off the loss tests;
- `--xla_cpu_use_fusion_emitters=false` (XLA:CPU's classic elemental emitter for fusions instead
  of the MLIR fusion pipeline) a further ~14% off a CLI run with a cold cache (17.1 / 19.0 s vs
  19.9 / 22.3 s of user CPU) and ~30% off a packed-step test (8.3 / 9.5 s vs 12.8 / 13.1 s).
They change how fast the code runs, not what it computes (the parity and bit-identity tests hold
under them); the processes the tests start inherit them (cli.env), and the deviceless TPU
compiles of test_aot print byte-identical memory and collectives with or without them.
"""

import os
import shutil
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

# Every program compiled once per run, not once per test process: the test workers and every
# process a test starts (`python -m tapo_jax.main`, notebooks; they inherit os.environ) read and
# write one cache. The started processes cache small CPU programs too (the thresholds; the workers
# only their slow compiles, below), and a size bound, which makes JAX take
# a file lock around each read and write: without it a reader can see another process's half-
# written entry. The cache key holds the XLA flags, so 1- and 8-device processes do not mix.
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_SETTINGS = {
  "jax_persistent_cache_min_compile_time_secs": 0.0,
  "jax_persistent_cache_min_entry_size_bytes": 0,
  "jax_compilation_cache_max_size": 8 << 30,
}
# The test workers themselves cache only what took a second or more to compile (the deviceless TPU
# compiles): compiled the cheap way (FAST_COMPILE), their small programs compile faster than the
# locked cache reads and writes them (the suite's workers "saved" -77 s reading 1,483 entries;
# test_tapo_batch + test_tapo_loss: sys 4.2 -> 2.0 s, wall 33.2 / 33.2 -> 30.4 / 28.4 s). The
# processes the tests start still cache everything: a CLI run reads its programs from its
# predecessors (~4 s of CPU a run).
WORKER_MIN_COMPILE_S = 1.0


def pytest_configure(config):
  """The controller (or a run without xdist) makes the cache directory; xdist workers get it
  through workerinput. Set here, before collection imports any test module (and JAX)."""
  workerinput = getattr(config, "workerinput", None)
  if workerinput is not None:
    path = workerinput["jax_cache"]
  elif os.environ.get(CACHE_ENV):  # the caller's own cache
    path = os.environ[CACHE_ENV]
  else:
    path = config.jax_cache_made = tempfile.mkdtemp(prefix="tapo_jax_test_xla_cache_")
  config.jax_cache = path
  os.environ[CACHE_ENV] = path
  for key, value in CACHE_SETTINGS.items():
    os.environ[key.upper()] = str(value)
  import jax

  jax.config.update("jax_compilation_cache_dir", path)
  for key, value in CACHE_SETTINGS.items():
    jax.config.update(key, value)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", WORKER_MIN_COMPILE_S)
  config.jax_cache_stats = stats = {"compiles": 0, "hits": 0, "saved_s": 0.0}

  def count(event, **_):
    if event == "/jax/compilation_cache/compile_requests_use_cache":
      stats["compiles"] += 1
    elif event == "/jax/compilation_cache/cache_hits":
      stats["hits"] += 1

  def saved(event, duration, **_):
    if event == "/jax/compilation_cache/compile_time_saved_sec":
      stats["saved_s"] += duration

  jax.monitoring.register_event_listener(count)
  jax.monitoring.register_event_duration_secs_listener(saved)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """xdist's controller: every worker shares the controller's cache."""
  node.workerinput["jax_cache"] = node.config.jax_cache


def pytest_sessionfinish(session):
  if hasattr(session.config, "workeroutput"):
    session.config.workeroutput["jax_cache_stats"] = session.config.jax_cache_stats


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  """xdist's controller: adds up the workers' counts."""
  worker = getattr(node, "workeroutput", {}).get("jax_cache_stats", {})
  for key, value in worker.items():
    node.config.jax_cache_stats[key] += value


def pytest_terminal_summary(terminalreporter, config):
  """One line: how much of the test processes' compiling the shared cache saved (the processes
  the tests start use it too; their hits are not counted here)."""
  s = config.jax_cache_stats
  entries = sum(f.endswith("-cache") for f in os.listdir(config.jax_cache))
  terminalreporter.write_line(
    f"JAX compilation cache {config.jax_cache}: {entries} programs; the test processes read "
    f"{s['hits']} of their {s['compiles']} compilations from it ({s['saved_s']:.0f} s saved)"
  )


def pytest_unconfigure(config):
  made = getattr(config, "jax_cache_made", None)
  if made:
    shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="session")
def qwen_tokenizer():
  """Qwen2's real BPE tokenizer (151,646 ids), built offline; see tests/qwen_tokenizer.py."""
  from qwen_tokenizer import qwen2_tokenizer

  return qwen2_tokenizer()


@pytest.fixture(autouse=True)
def signal_handlers_given_back():
  """A test (an in-process run) leaves SIGINT and SIGTERM as it found them: a run that kept its
  PreemptionGuard's handlers would swallow a notebook's Ctrl-C (and _thread.interrupt_main in
  later tests)."""
  import signal

  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  after = {s: signal.getsignal(s) for s in before}
  assert after == before, f"signal handlers left changed: {after}"


def pytest_collection_modifyitems(config, items):
  """The `slow` tests first (in file order), so that with -n 3 and --maxschedchunk=1 (pyproject)
  the minute-long process tests start early and the short ones fill the workers up to the end:
  on the measured durations, a whole minute-long test no longer starts when the rest is done."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
