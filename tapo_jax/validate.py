"""Every check of a config that can run before any work: `validate(cfg, num_devices)` raises
ConfigError with one line naming the key, its value and the fix (main.py prints it, exit 2).

Enums are checked in one place (`check_enums`, over the names each reading module defines:
`enums`); then the mesh against the devices, files that must exist, the combinations that cannot
train (a divergence construction with the group baseline), values (finite hyper-parameters,
counts, lengths that must fit, the prompt template's fields) and, for mode=coldstart, the
builder's own check of its keys (coldstart.build.check_config).
"""

from __future__ import annotations

import json
import math
import os
import re
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


def validate_distributed(cfg) -> None:
  """The distributed_* keys, checked before jax.distributed.initialize uses them."""
  for key in ("distributed_timeout_s", "distributed_heartbeat_s"):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v < math.inf:
      raise ConfigError(f"config.{key}={v!r}: must be a finite number of seconds >= 1")
  n, i = cfg.distributed_num_processes, cfg.distributed_process_id
  if n == 0 or n < -1 or i < -1 or (n > 0 and i >= n):
    raise ConfigError(
      f"config.distributed_process_id={i}, distributed_num_processes={n}: expected "
      "0 <= id < processes (or -1 for both: detected)"
    )
  address = cfg.distributed_coordinator
  if address and not re.fullmatch(r"\[?[^\s\[\]]*\]?:\d{1,5}", address):
    raise ConfigError(f"config.distributed_coordinator={address!r}: expected HOST:PORT")


def enums() -> dict[str, tuple[str, ...]]:
  """{key: its allowed names} for every key whose value is one of a fixed set of names, each set
  as the module that reads the key defines it."""
  from tapo_jax import config, toy
  from tapo_jax.models import attention, qwen
  from tapo_jax.opsd import teacher
  from tapo_jax.rewards import extract
  from tapo_jax.sampling import engine
  from tapo_jax.tapo import advantages, construct, loss

  return {
    "mode": config.MODES,
    "algorithm": config.ALGORITHMS,
    "model.dtype": tuple(qwen.DTYPES),
    "model.param_dtype": tuple(qwen.DTYPES),
    "rollout.weight_dtype": engine.WEIGHT_DTYPES,
    "model.attention_impl": attention.IMPLS,
    "model.toy": ("", *toy.DOMAINS),
    "tapo.construction": construct.CONSTRUCTIONS,
    "tapo.ref_scope": advantages.REF_SCOPES,
    "tapo.ref_baseline": advantages.REF_BASELINES,
    "reward.extract": extract.EXTRACT_MODES,
    "loss.rollout_is": loss.ROLLOUT_IS,
    "loss.aggregation": loss.AGGREGATIONS,
    "opsd.solution_source": teacher.SOLUTION_SOURCES,
  }


def check_enums(cfg) -> None:
  """Raises ConfigError naming the first key of `enums()` whose value is not one of its names."""
  for key, names in enums().items():
    value = _get(cfg, key)
    if value not in names:
      raise ConfigError(f"config.{key}={value!r}: expected one of {', '.join(names)}")


def validate(cfg, num_devices: int) -> None:
  """Checks everything that can be checked before any work; raises ConfigError."""
  check_enums(cfg)
  if cfg.mode == "plan":  # no devices, data or weights: the planned slice and mode instead
    validate_plan(cfg)
    return
  _check_meshes(cfg, num_devices)
  if cfg.mode in ("rl", "coldstart"):
    _check_samples(cfg)
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
    from tapo_jax.coldstart import build as coldstart

    try:
      coldstart.check_config(cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if cfg.mode == "rl" and cfg.algorithm == "opsd":
    validate_opsd(cfg)
  if cfg.mode == "sft":
    _check_file("sft.path", cfg.sft.path)
  periodic = cfg.train.eval_every or cfg.train.eval_at_start
  if cfg.mode == "eval" or (cfg.mode == "rl" and periodic):
    paths = [p.strip() for p in cfg.eval.paths.split(",") if p.strip()]
    if not paths and not cfg.model.toy:
      when = "mode=eval"
      if cfg.mode == "rl":
        when = f"train.eval_every={cfg.train.eval_every}, eval_at_start={cfg.train.eval_at_start}"
      raise ConfigError(
        f"config.eval.paths is empty with {when}: only the toy models have a built-in held-out "
        "set; set eval.paths to eval files, or train.eval_every=0 and train.eval_at_start=False"
      )
    for path in paths:
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
  _check_positions(cfg)
  validate_decode_layout(cfg, num_devices)


def _model_config(cfg) -> tuple[dict, str] | None:
  """(the policy's config.json as a dict, its path), None when unreadable (loading the model
  reports that)."""
  from tapo_jax import policy

  directory = policy.model_dir(cfg)
  path = os.path.join(directory, "config.json")
  try:
    with open(path, "rb") as f:
      d = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError):
    return None
  return (d, path) if isinstance(d, dict) else None


def _model_positions(cfg) -> tuple[int, str] | None:
  """(max_position_embeddings, the config.json it is from) of the policy, None when unreadable."""
  found = _model_config(cfg)
  if found is None:
    return None
  try:
    return int(found[0].get("max_position_embeddings", 32768)), found[1]
  except (TypeError, ValueError):
    return None


def _check_positions(cfg) -> None:
  """Every sequence the run builds (a prompt bucket + its generation, a trainer row) fits the
  model's positions; past them RoPE extrapolates silently."""
  from tapo_jax import config as config_lib
  from tapo_jax.tapo import synthesis

  found = _model_positions(cfg)
  if found is None:
    return
  limit, where = found
  bucket = max(cfg.rollout.prefill_buckets)
  lengths = []  # (what, positions)
  if cfg.mode in ("rl", "coldstart"):
    n = cfg.rollout.max_new_tokens
    what = f"max(rollout.prefill_buckets) + rollout.max_new_tokens = {bucket} + {n}"
    lengths.append((what, bucket + n))
  if cfg.mode == "rl":
    lengths.append(("tapo.max_len", cfg.tapo.max_len))
  if cfg.mode == "rl" and cfg.algorithm == "opsd":  # a teacher row: its prompt holds a solution
    o, n = cfg.opsd, cfg.rollout.max_new_tokens
    solution = o.max_solution_tokens or n
    what = (
      f"opsd.max_len = {o.max_len}"
      if o.max_len
      else "an OPSD teacher row, at least "
      f"data.max_prompt_tokens + opsd.max_solution_tokens + rollout.max_new_tokens = "
      f"{cfg.data.max_prompt_tokens} + {solution} + {n}"
    )
    lengths.append((what, o.max_len or cfg.data.max_prompt_tokens + solution + n))
  periodic = cfg.train.eval_every or cfg.train.eval_at_start
  if cfg.mode == "eval" or (cfg.mode == "rl" and periodic):
    n = cfg.eval.max_new_tokens
    what = f"max(rollout.prefill_buckets) + eval.max_new_tokens = {bucket} + {n}"
    lengths.append((what, bucket + n))
  if cfg.mode == "sft":
    lengths.append(("sft.max_len", cfg.sft.max_len))
  policy = cfg.mode == "rl" and cfg.algorithm == "tapo" and cfg.tapo.construction == "policy"
  own_teacher = cfg.coldstart.teacher_url or cfg.coldstart.teacher_path  # its own positions
  if policy or (cfg.mode == "coldstart" and not own_teacher):
    longest = cfg.data.max_prompt_tokens + 2 * cfg.rollout.max_new_tokens  # + the template's
    top, n = synthesis.prompt_buckets(longest)[-1], config_lib.synthesis_max_new_tokens(cfg)
    what = f"a synthesis prompt bucket + tapo.synthesis_max_new_tokens >= {top} + {n}"
    lengths.append((what, top + n))
  for what, total in lengths:
    if total > limit:
      raise ConfigError(
        f"config: {what} = {total} positions > the model's max_position_embeddings={limit} "
        f"({where}); lower them"
      )


MAX_SAMPLES = 1024  # rollout.n: a step samples n x batch_queries responses (DAPO, TAPO: 8-16)
MAX_ROWS = 65536  # rollout.n x batch_queries: SIGTERM and Ctrl-C are acted on between steps


def _check_samples(cfg) -> None:
  """rollout.n within [2, MAX_SAMPLES] and a step's responses within MAX_ROWS."""
  n, q = cfg.rollout.n, cfg.rollout.batch_queries
  if n < 2 and not _opsd_without_groups(cfg):
    raise ConfigError(f"config.rollout.n={n}: GRPO/TAPO need K >= 2 samples per query")
  if n > MAX_SAMPLES:
    raise ConfigError(
      f"config.rollout.n={n}: more than {MAX_SAMPLES} samples per query (the paper: 8); a step "
      "that long never reaches the point where SIGTERM and Ctrl-C are acted on"
    )
  if q >= 1 and n * q > MAX_ROWS:
    raise ConfigError(
      f"config.rollout.n x rollout.batch_queries = {n} x {q} = {n * q}: more than {MAX_ROWS} "
      "responses in one step; SIGTERM and Ctrl-C are acted on between steps"
    )


def _check_meshes(cfg, num_devices: int) -> None:
  """config.mesh over the devices the trainer gets (all, or those after rollout.sampler_devices);
  the samplers lay theirs out themselves (validate_decode_layout)."""
  from tapo_jax import sharding

  n = cfg.rollout.sampler_devices
  if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < num_devices:
    raise ConfigError(
      f"config.rollout.sampler_devices={n!r}: must be an integer in [0, {num_devices - 1}] "
      f"({num_devices} devices; 0 shares them all, N > 0 leaves the rest to the trainer)"
    )
  where = f" (the {num_devices - n} devices after rollout.sampler_devices={n})" if n else ""
  try:
    sharding.mesh_shape(dict(cfg.mesh), num_devices - n)
  except ValueError as e:
    raise ConfigError(f"config.{e}{where}") from None


def validate_plan(cfg) -> None:
  """mode=plan: the plan.* keys, the mesh against the planned slice and the values of the planned
  mode (plan.mode), before anything is planned."""
  from tapo_jax import plan as plan_lib
  from tapo_jax import sharding

  p = cfg.plan
  if isinstance(p.chips, bool) or not isinstance(p.chips, int) or p.chips < 0:
    raise ConfigError(f"config.plan.chips={p.chips!r}: must be an integer >= 0 (0: from the name)")
  u = p.usable
  if isinstance(u, bool) or not isinstance(u, int | float) or not 0 < u <= 1:
    raise ConfigError(f"config.plan.usable={u!r}: must be a fraction of HBM in (0, 1]")
  if p.mode not in ("rl", "sft"):
    raise ConfigError(f"config.plan.mode={p.mode!r}: expected rl or sft")
  try:
    sl = plan_lib.resolve_slice(p.device, p.chips)
  except plan_lib.PlanError as e:
    raise ConfigError(str(e)) from None
  if sl.chips < 1:
    raise ConfigError(f"config.plan.device={p.device!r}: a slice of {sl.chips} chips")
  try:
    sharding.mesh_shape(dict(cfg.mesh), sl.chips)
  except ValueError as e:
    raise ConfigError(f"config.{e} (planning for {sl.chips} chips of {sl.device})") from None
  if p.mode == "rl":
    _check_samples(cfg)
    for key in ("rollout.batch_queries", "rollout.max_new_tokens"):
      if _get(cfg, key) < 1:
        raise ConfigError(f"config.{key}={_get(cfg, key)}: must be >= 1")
  validate_values(cfg, mode=p.mode)


def validate_decode_layout(cfg, num_devices: int) -> None:
  """The samplers' decode layout (rollout.decode_tensor) and where their devices come from."""
  t = cfg.rollout.decode_tensor
  if not isinstance(t, int) or t < 0:
    raise ConfigError(f"config.rollout.decode_tensor={t!r}: must be 0 (auto) or a positive int")
  n = int(cfg.rollout.sampler_devices) or num_devices
  if t and n % t:
    raise ConfigError(
      f"config.rollout.decode_tensor={t}: does not divide the samplers' {n} devices"
    )
  found = _model_config(cfg) if t and cfg.mode != "plan" else None
  if found:
    kv, path = found[0].get("num_key_value_heads") or 0, found[1]
    if isinstance(kv, int) and kv and kv % t:
      raise ConfigError(
        f"config.rollout.decode_tensor={t}: does not divide the model's {kv} kv heads ({path})"
      )
  if cfg.distributed and cfg.rollout.async_steps:
    # Disjoint sampler devices: JAX has no device-to-device copy between the device sets of
    # several processes. Shared devices: the sampler's programs would be launched from a second
    # thread, in an order against the trainer's that differs between processes (collectives of
    # different programs would meet: a hang).
    raise ConfigError(
      f"config.rollout.async_steps={cfg.rollout.async_steps} with distributed=True "
      f"(rollout.sampler_devices={cfg.rollout.sampler_devices}): one-step-off rollouts run in "
      "one process only (a multi-process run cannot copy weights between disjoint device sets "
      "nor launch the sampler's programs from a second thread); use rollout.async_steps=0"
    )


# --- value checks (finite hyper-parameters, counts, lengths, the prompt template) ----------------

FINITE = (
  "optim.lr", "optim.b1", "optim.b2", "optim.weight_decay", "optim.grad_clip",
  "loss.eps_low", "loss.eps_high", "loss.adv_eps", "loss.overlong_penalty",
  "tapo.lam", "tapo.ots_min", "tapo.ots_max", "rollout.temperature", "rollout.top_p",
  "opsd.beta", "opsd.grpo_coef",
  "eval.temperature", "eval.top_p", "reward.timeout_s",
)  # fmt: skip
AT_LEAST_1 = (
  "optim.micro_batch", "optim.ppo_epochs", "optim.minibatches", "reward.workers",
  "data.max_prompt_tokens", "rollout.slots", "tapo.max_len", "loss.vocab_chunk",
  "sft.batch_size", "sft.max_len", "sft.epochs", "eval.max_new_tokens", "eval.toy_problems",
)  # fmt: skip
AT_LEAST_0 = (
  "rollout.top_k", "rollout.resample_rounds", "sft.steps", "sft.stop_at", "train.eval_every",
  "train.dump_rollouts_every",
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


def validate_values(cfg, mode: str | None = None) -> None:
  """Numbers that would crash mid-run, or silently ruin it, are rejected before any work; `mode`
  (default: config.mode) is the one whose lengths must fit (mode=plan passes plan.mode)."""
  mode = mode or cfg.mode
  for key in FINITE:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
      raise ConfigError(f"config.{key}={v!r}: must be a finite number")
  for key in AT_LEAST_1:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f"config.{key}={v!r}: must be an integer >= 1")
  for key in AT_LEAST_0:
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ConfigError(f"config.{key}={v!r}: must be an integer >= 0 (0 = off)")
  if cfg.rollout.async_steps not in (0, 1):
    raise ConfigError(
      f"config.rollout.async_steps={cfg.rollout.async_steps!r}: expected 0 (sample, then update) "
      "or 1 (one-step-off overlap)"
    )
  ratio = cfg.optim.max_update_ratio
  if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < math.inf:
    raise ConfigError(
      f"config.optim.max_update_ratio={ratio!r}: must be a finite number >= 0 (0 = off)"
    )
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
  if mode == "rl" and max(buckets) < cfg.data.max_prompt_tokens:
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
  if mode == "rl" and cfg.tapo.max_len < need:
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


def _opsd_without_groups(cfg) -> bool:
  """OPSD from reference solutions alone, without a GRPO term, needs no group (K = 1 is the
  paper's setting)."""
  o = cfg.opsd
  return cfg.algorithm == "opsd" and o.solution_source == "reference" and not o.grpo_coef


def validate_opsd(cfg) -> None:
  """The opsd.* keys (tapo_jax/opsd); the template overhead is checked with the tokenizer at
  start-up (opsd.Distiller)."""
  from tapo_jax.opsd import teacher

  o = cfg.opsd
  _in(cfg, "opsd.beta", 0, 1, why=": 0 forward KL, 1 reverse KL, 0.5 JSD")
  _in(cfg, "opsd.grpo_coef", 0, math.inf)
  for key in ("max_solution_tokens", "max_len"):
    v = o[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ConfigError(f"config.opsd.{key}={v!r}: must be an integer >= 0 (0 = the default)")
  need = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
  if o.max_len and o.max_len < need:
    raise ConfigError(
      f"config.opsd.max_len={o.max_len}: a teacher row holds the problem and the response, so it "
      f"must be >= data.max_prompt_tokens + rollout.max_new_tokens = {need} (0 sizes it)"
    )
  if o.teacher_template:
    try:
      teacher.template_fields(o.teacher_template)
    except ValueError as e:
      raise ConfigError(f"config.opsd.teacher_template={o.teacher_template!r}: {e}") from None
