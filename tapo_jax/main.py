r"""Entry point: python -m tapo_jax.main --config=configs/NAME.py [--config.key=value] [--workdir=D]

Modes (config.mode): rl (algorithm grpo | tapo), sft (cold start), eval, plan (memory per device,
tapo_jax.plan), coldstart (builds the cold-start SFT set: tapo_jax.train.coldstart). Bad flags
or config values print one line naming the key and exit with status 2 before anything is written.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # JetStream's full install imports TensorFlow

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (overrides config.workdir).")


class ConfigError(ValueError):
  """A bad config value; main() prints it on one line and exits 2."""


def _exists(path: str) -> bool:
  return bool(path) and os.path.exists(path)


def validate(cfg, num_devices: int) -> None:
  """Checks everything that can be checked before any work; raises ConfigError."""
  from tapo_jax import config as config_lib
  from tapo_jax import sharding

  try:
    config_lib.check_enums(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    sharding.mesh_shape(dict(cfg.mesh), num_devices)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  if cfg.mode in ("rl", "coldstart") and cfg.rollout.n < 2:
    raise ConfigError(f"config.rollout.n={cfg.rollout.n}: GRPO/TAPO need K >= 2 samples per query")
  if cfg.algorithm == "tapo" and cfg.tapo.construction == "divergence":
    if cfg.tapo.ref_baseline == "group":
      raise ConfigError(
        "config.tapo.ref_baseline='group' with tapo.construction='divergence': every divergence "
        "construction ends in y+'s answer, so G_ref has no variance and A_ref = 0 (nothing is "
        "learned from them); use tapo.ref_baseline=orig or tapo.construction=policy"
      )
  if cfg.tapo.synthesis_max_new_tokens and (
    cfg.tapo.synthesis_max_new_tokens < cfg.rollout.max_new_tokens
  ):
    raise ConfigError(
      f"config.tapo.synthesis_max_new_tokens={cfg.tapo.synthesis_max_new_tokens}: shorter than "
      f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}, so a copied y- may not fit; use 0 "
      "(rollout.max_new_tokens + 1024) or a larger value"
    )
  if not 0.0 <= cfg.tapo.min_anchor < 1.0:
    raise ConfigError(
      f"config.tapo.min_anchor={cfg.tapo.min_anchor}: expected a fraction in [0, 1)"
    )
  if cfg.rollout.batch_queries < 1:
    raise ConfigError(f"config.rollout.batch_queries={cfg.rollout.batch_queries}: must be >= 1")
  if cfg.rollout.max_new_tokens < 1:
    raise ConfigError(f"config.rollout.max_new_tokens={cfg.rollout.max_new_tokens}: must be >= 1")
  if cfg.train.steps < 0:
    raise ConfigError(f"config.train.steps={cfg.train.steps}: must be >= 0")
  if cfg.model.path:
    if not os.path.isdir(cfg.model.path):
      raise ConfigError(f"config.model.path={cfg.model.path!r}: no such directory")
    if not os.path.exists(os.path.join(cfg.model.path, "config.json")):
      raise ConfigError(f"config.model.path={cfg.model.path!r}: no config.json in it")
  elif cfg.model.toy != "arith":
    raise ConfigError("config.model.path is empty: set it to a local Hugging Face model directory")
  if cfg.mode in ("rl", "coldstart") and cfg.data.train_path and not _exists(cfg.data.train_path):
    raise ConfigError(f"config.data.train_path={cfg.data.train_path!r}: no such file")
  if cfg.mode in ("rl", "coldstart") and not cfg.data.train_path and cfg.model.toy != "arith":
    raise ConfigError("config.data.train_path is empty: set it to a jsonl/json/parquet file")
  window = tuple(cfg.data.pass_rate_window)
  if window and not (len(window) == 2 and 0.0 <= window[0] <= window[1] <= 1.0):
    raise ConfigError(f"config.data.pass_rate_window={window}: expected (low, high) in [0, 1]")
  if cfg.mode == "coldstart":
    validate_coldstart(cfg)
  if cfg.mode == "sft" and not _exists(cfg.sft.path):
    raise ConfigError(f"config.sft.path={cfg.sft.path!r}: no such file")
  if cfg.mode == "eval" or cfg.train.eval_every:
    for path in [p for p in cfg.eval.paths.split(",") if p.strip()]:
      if not _exists(path.strip()):
        raise ConfigError(f"config.eval.paths: {path.strip()!r}: no such file")
    if cfg.eval.k < 1:
      raise ConfigError(f"config.eval.k={cfg.eval.k}: must be >= 1")
    bad = [k for k in cfg.eval.pass_ks if not 1 <= k <= cfg.eval.k]
    if bad:
      raise ConfigError(f"config.eval.pass_ks={tuple(cfg.eval.pass_ks)}: {bad} not in [1, eval.k]")


def validate_coldstart(cfg) -> None:
  """The keys mode=coldstart reads (config.coldstart and the synthesis template)."""
  from tapo_jax.tapo import synthesis

  cs = cfg.coldstart
  if cfg.distributed:
    raise ConfigError("config.distributed=True: mode=coldstart runs on one host; set it False")
  if cfg.tapo.synthesis_template:
    try:
      synthesis.template_parts(cfg.tapo.synthesis_template)
    except ValueError as e:
      raise ConfigError(f"config.tapo.synthesis_template: {e}") from None
  for key in ("constructions", "solutions", "max_chunks", "teacher_retries"):
    if cs[key] < 0:
      raise ConfigError(f"config.coldstart.{key}={cs[key]}: must be >= 0")
  for key in ("chunk_problems", "passes", "solutions_per_problem", "teacher_workers"):
    if cs[key] < 1:
      raise ConfigError(f"config.coldstart.{key}={cs[key]}: must be >= 1")
  if cs.constructions == 0 and cs.solutions == 0:
    raise ConfigError("config.coldstart.constructions and .solutions are both 0: nothing to build")
  if cs.constructions and cfg.tapo.n_pos + cfg.tapo.n_neg > cfg.rollout.n:
    raise ConfigError(
      f"config.tapo.n_pos + tapo.n_neg = {cfg.tapo.n_pos + cfg.tapo.n_neg} > rollout.n="
      f"{cfg.rollout.n}: no problem can have a DCS pair; lower them or raise rollout.n"
    )
  if cs.teacher_temperature < 0 or not 0 < cs.teacher_top_p <= 1:
    raise ConfigError(
      f"config.coldstart.teacher_temperature={cs.teacher_temperature}, teacher_top_p="
      f"{cs.teacher_top_p}: expected temperature >= 0 and top_p in (0, 1]"
    )
  if cs.teacher_timeout_s <= 0:
    raise ConfigError(f"config.coldstart.teacher_timeout_s={cs.teacher_timeout_s}: must be > 0")
  if cs.teacher_url and cs.teacher_path:
    raise ConfigError("config.coldstart.teacher_url and teacher_path are both set: choose one")
  if cs.teacher_url:
    if not cs.teacher_url.startswith(("http://", "https://")):
      raise ConfigError(f"config.coldstart.teacher_url={cs.teacher_url!r}: expected http(s)://...")
    if not cs.teacher_model:
      raise ConfigError("config.coldstart.teacher_model is empty: the model name the server serves")
  if cs.teacher_path:
    if not os.path.exists(os.path.join(cs.teacher_path, "config.json")):
      raise ConfigError(
        f"config.coldstart.teacher_path={cs.teacher_path!r}: not a Hugging Face model directory "
        "(no config.json)"
      )


def _fail(msg: str, status: int = 2) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags raises these for an override of a key the locked config does not have.
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    name = str(e).strip("\"'")
    bad = next((a for a in overrides if a[len("--config.") :].split("=")[0].endswith(name)), None)
    _fail(f"unknown config key {name!r} in {bad}" if bad else f"bad flag: {e}")


def main(argv) -> None:
  del argv
  import jax

  cfg = _CONFIG.value
  if cfg is None:
    _fail("--config is required, e.g. --config=configs/tiny.py")
  workdir = _WORKDIR.value or cfg.workdir or os.path.join("runs", "default")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and absl INFO chatter; -v 0 brings it back
  if cfg.mode == "plan":  # abstract shapes only: no devices, weights or data needed
    from tapo_jax import plan

    sys.exit(plan.run(cfg))
  if cfg.distributed:
    from tapo_jax import distributed

    distributed.initialize(cfg)
  try:
    validate(cfg, jax.device_count())
  except ConfigError as e:
    _fail(str(e))
  logging.info("mode=%s algorithm=%s workdir=%s", cfg.mode, cfg.algorithm, workdir)
  try:
    _run_mode(cfg, workdir)
  except BaseException as e:
    if cfg.distributed and not isinstance(e, SystemExit | KeyboardInterrupt):
      from tapo_jax import distributed

      distributed.report_failure(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise


def _run_mode(cfg, workdir: str) -> None:
  if cfg.mode == "rl":
    from tapo_jax.train import loop

    loop.run(cfg, workdir)
  elif cfg.mode == "coldstart":
    from tapo_jax.data import DataError
    from tapo_jax.train import coldstart

    try:
      coldstart.run(cfg, workdir)
    except (coldstart.BuildError, DataError) as e:
      _fail(str(e))
    except coldstart.TeacherError as e:
      _fail(f"{e}; rerun to resume from the last finished chunk", status=1)
  elif cfg.mode == "sft":
    from tapo_jax.train import sft

    sft.run(cfg, workdir)
  else:
    from tapo_jax.train import eval_mode

    eval_mode.run(cfg, workdir)


def entry() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry()
