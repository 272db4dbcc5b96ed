"""Every check of a config that can run before any work: `validate(cfg, num_devices)` raises
ConfigError with one line naming the key, its value and the fix (main.py prints it, exit 2).

Enums are checked in one place (config.ENUMS via config.check_enums); here: the mesh against the
devices, files that must exist, the combinations that cannot train (a divergence construction
with the group baseline), values (finite hyper-parameters, counts, lengths that must fit, the
prompt template's fields) and the cold-start builder's keys.
"""

from __future__ import annotations

import math
import os
import string


class ConfigError(ValueError):
  """A bad config value; main() prints it on one line and exits 2."""


def _exists(path: str) -> bool:
  return bool(path) and os.path.exists(path)


def _check_file(key: str, path: str) -> None:
  if not os.path.exists(path):
    raise ConfigError(f"config.{key}={path!r}: no such file")
  if os.path.isdir(path):
    raise ConfigError(f"config.{key}={path!r}: is a directory; expected a jsonl/json/parquet file")


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
  elif not cfg.model.toy:
    raise ConfigError("config.model.path is empty: set it to a local Hugging Face model directory")
  if cfg.mode in ("rl", "coldstart") and cfg.data.train_path:
    _check_file("data.train_path", cfg.data.train_path)
  if cfg.mode in ("rl", "coldstart") and not cfg.data.train_path and not cfg.model.toy:
    raise ConfigError("config.data.train_path is empty: set it to a jsonl/json/parquet file")
  window = tuple(cfg.data.pass_rate_window)
  if window and not (len(window) == 2 and 0.0 <= window[0] <= window[1] <= 1.0):
    raise ConfigError(f"config.data.pass_rate_window={window}: expected (low, high) in [0, 1]")
  if cfg.mode == "coldstart":
    validate_coldstart(cfg)
  if cfg.mode == "sft":
    _check_file("sft.path", cfg.sft.path)
  if cfg.mode == "eval" or cfg.train.eval_every or cfg.train.eval_at_start:
    for path in [p.strip() for p in cfg.eval.paths.split(",") if p.strip()]:
      if not _exists(path):
        raise ConfigError(f"config.eval.paths: {path!r}: no such file")
      if os.path.isdir(path):
        raise ConfigError(f"config.eval.paths: {path!r}: is a directory; expected a data file")
    if cfg.eval.k < 1:
      raise ConfigError(f"config.eval.k={cfg.eval.k}: must be >= 1")
    bad = [k for k in cfg.eval.pass_ks if not 1 <= k <= cfg.eval.k]
    if bad:
      raise ConfigError(f"config.eval.pass_ks={tuple(cfg.eval.pass_ks)}: {bad} not in [1, eval.k]")
  validate_values(cfg)


# --- value checks (finite hyper-parameters, counts, lengths, the prompt template) ----------------

FINITE = (
  "optim.lr", "optim.b1", "optim.b2", "optim.weight_decay", "optim.grad_clip",
  "loss.eps_low", "loss.eps_high", "loss.adv_eps", "loss.overlong_penalty",
  "tapo.lam", "tapo.ots_min", "tapo.ots_max", "rollout.temperature", "rollout.top_p",
  "eval.temperature", "eval.top_p", "reward.timeout_s",
)  # fmt: skip
AT_LEAST_1 = (
  "optim.micro_batch", "optim.ppo_epochs", "optim.minibatches", "reward.workers",
  "data.max_prompt_tokens", "rollout.slots", "tapo.max_len",
)  # fmt: skip


def _get(cfg, key: str):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def _in(cfg, key: str, low: float, high: float, *, low_open=False, high_open=False, why=""):
  v = _get(cfg, key)
  ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if not ok:
    if math.isinf(high):
      bound = f"{'>' if low_open else '>='} {low}"
    else:
      bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ConfigError(f"config.{key}={v!r}: must be {bound}{why}")


def validate_values(cfg) -> None:
  """Numbers that would crash mid-run, or silently ruin it, are rejected before any work."""
  for key in FINITE:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
      raise ConfigError(f"config.{key}={v!r}: must be a finite number")
  for key in AT_LEAST_1:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f"config.{key}={v!r}: must be an integer >= 1")
  if cfg.optim.lr > 1:
    raise ConfigError(
      f"config.optim.lr={cfg.optim.lr!r}: a learning rate above 1 destroys the model in one "
      "update (typical: 1e-6 to 1e-4)"
    )
  _in(cfg, "optim.lr", 0, 1)
  _in(cfg, "optim.b1", 0, 1, high_open=True)
  _in(cfg, "optim.b2", 0, 1, high_open=True)
  for key in ("optim.weight_decay", "optim.grad_clip", "loss.overlong_penalty"):
    _in(cfg, key, 0, math.inf)
  _in(cfg, "loss.eps_low", 0, 1)
  _in(cfg, "loss.eps_high", 0, math.inf)
  _in(cfg, "loss.adv_eps", 0, math.inf, low_open=True)
  _in(cfg, "tapo.lam", 0, math.inf)
  _in(cfg, "tapo.ots_min", 0, math.inf, low_open=True)
  if cfg.tapo.ots_max < cfg.tapo.ots_min:
    raise ConfigError(
      f"config.tapo.ots_max={cfg.tapo.ots_max!r}: must be >= tapo.ots_min={cfg.tapo.ots_min!r}"
    )
  for key in ("rollout.temperature", "eval.temperature"):
    _in(cfg, key, 0, math.inf, why=" (0 is greedy)")
  for key in ("rollout.top_p", "eval.top_p"):
    _in(cfg, key, 0, 1, low_open=True)
  _in(cfg, "reward.timeout_s", 0, math.inf, low_open=True, why=": the verifier's per-item limit")
  if cfg.optim.warmup_steps < 0:
    raise ConfigError(f"config.optim.warmup_steps={cfg.optim.warmup_steps}: must be >= 0")
  buckets = tuple(cfg.rollout.prefill_buckets)
  if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
    raise ConfigError(
      f"config.rollout.prefill_buckets={buckets}: expected a non-empty tuple of positive "
      "prompt lengths, e.g. (64, 128, 256)"
    )
  if cfg.mode == "rl" and max(buckets) < cfg.data.max_prompt_tokens:
    raise ConfigError(
      f"config.rollout.prefill_buckets={buckets}: the largest must be >= "
      f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} (the longest prompt allowed)"
    )
  _check_template(cfg.data.prompt_template)
  tokens = cfg.optim.micro_batch_tokens
  if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
    raise ConfigError(
      f"config.optim.micro_batch_tokens={tokens!r}: must be an integer >= 0 (0: optim.micro_batch "
      "rows)"
    )
  if cfg.mode == "rl" and 0 < tokens < cfg.tapo.max_len:
    raise ConfigError(
      f"config.optim.micro_batch_tokens={tokens}: less than one packed row of tapo.max_len="
      f"{cfg.tapo.max_len} tokens; use 0 (optim.micro_batch rows) or >= {cfg.tapo.max_len}"
    )
  need = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
  if cfg.mode == "rl" and cfg.tapo.max_len < need:
    raise ConfigError(
      f"config.tapo.max_len={cfg.tapo.max_len}: must be >= data.max_prompt_tokens + "
      f"rollout.max_new_tokens = {cfg.data.max_prompt_tokens} + {cfg.rollout.max_new_tokens} "
      f"= {need}"
    )


def _check_template(template: str) -> None:
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ConfigError(
      f"config.data.prompt_template={template!r}: {e}; write literal braces as {{{{ and }}}}"
    ) from None
  bad = [f for f in fields if f != "problem"]
  if bad:
    raise ConfigError(
      f"config.data.prompt_template={template!r}: unknown field {{{bad[0]}}}; the only field is "
      "{problem} (write literal braces as {{ and }})"
    )


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
