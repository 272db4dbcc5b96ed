"""The samplers of a run: one engine per purpose, sized from the config, built once over the
samplers' devices by the mode that runs (each compiles on first use and then takes new params at
every call without recompiling).

Every engine decodes in the decode layout (tapo_jax/sampling/engine.py): the same devices as
(data, 1, tensor), tensor = rollout.decode_tensor (0: the largest divisor of the kv heads inside
one host), weights in rollout.weight_dtype. All engines of a run share that layout, so one weight
sync per RL step (`Engines.sync`) serves them all."""

from __future__ import annotations

import dataclasses

from tapo_jax import config
from tapo_jax.sampling.engine import QwenEngine
from tapo_jax.sampling.sample import Sampling
from tapo_jax.tapo import synthesis


@dataclasses.dataclass(frozen=True)
class Engines:
  """One engine per purpose, each on the training mesh (None: not needed by this config)."""

  rollout: QwenEngine  # rollouts and the difficulty filter
  synthesis: QwenEngine | None  # tapo.construction = policy: the policy writes constructions
  eval: QwenEngine | None  # periodic / mode=eval evaluation

  def sync(self, params, *, copy: bool = False):
    """The trainer's params -> the samplers' decode copy (one on-device reshard; `copy`: a new
    buffer even where nothing changes, for a sampler that runs while the trainer donates)."""
    return self.rollout.load_params(params, copy=copy)

  @property
  def syncs(self) -> int:
    """Decode copies made so far (every engine of a run shares the rollout engine's)."""
    return sum(e.syncs for e in self.unique().values())

  def unique(self) -> dict[str, QwenEngine]:
    """{purpose: engine} of the engines built (an engine serving two purposes is listed once)."""
    out: dict[str, QwenEngine] = {}
    for name in ("rollout", "synthesis", "eval"):
      engine = getattr(self, name)
      if engine is not None and all(engine is not e for e in out.values()):
        out[name] = engine
    return out


def decode_layout(cfg) -> dict:
  """The engines' decode layout keys: weight dtype and tensor-parallel size."""
  return dict(weight_dtype=cfg.rollout.weight_dtype, tensor=int(cfg.rollout.decode_tensor))


def _engine(cfg, model, mesh, buckets, max_new_tokens: int) -> QwenEngine:
  """An engine over `mesh` in the decode layout: prompts up to the largest of `buckets`, then
  `max_new_tokens` past it."""
  buckets = tuple(sorted(buckets))
  return QwenEngine(
    model,
    slots=cfg.rollout.slots,
    max_len=buckets[-1] + max_new_tokens,
    prefill_buckets=buckets,
    mesh=mesh,
    **decode_layout(cfg),
  )


def eval_engine(cfg, model, mesh) -> QwenEngine:
  """The engine that evaluation samples with (eval.max_new_tokens past the prompt buckets)."""
  return _engine(cfg, model, mesh, cfg.rollout.prefill_buckets, cfg.eval.max_new_tokens)


def rollout_engine(cfg, model, mesh) -> QwenEngine:
  """The engine rollouts sample with (rollout.max_new_tokens past the prompt buckets)."""
  return _engine(cfg, model, mesh, cfg.rollout.prefill_buckets, cfg.rollout.max_new_tokens)


def synthesis_engine(cfg, model, mesh, literal_tokens: int) -> QwenEngine:
  """The engine that writes constructions (the policy, or mode=coldstart's teacher): prompts of
  the template's `literal_tokens` + a query + y⁻ + y⁺ (bodies of rollouts)."""
  longest = literal_tokens + cfg.data.max_prompt_tokens + 2 * cfg.rollout.max_new_tokens
  buckets = synthesis.prompt_buckets(longest)
  return _engine(cfg, model, mesh, buckets, config.synthesis_max_new_tokens(cfg))


def build_engines(cfg, model, mesh, template: synthesis.Template | None) -> Engines:
  """The engines this config samples with, built once (each compiles on first use)."""
  rollout = rollout_engine(cfg, model, mesh)
  synth = None
  if template is not None:
    synth = synthesis_engine(cfg, model, mesh, template.literal_tokens)
  evaluator = None
  if cfg.train.eval_every or cfg.train.eval_at_start:
    same = cfg.eval.max_new_tokens == cfg.rollout.max_new_tokens
    evaluator = rollout if same else eval_engine(cfg, model, mesh)
  return Engines(rollout=rollout, synthesis=synth, eval=evaluator)


def rollout_sampling(cfg, eos) -> Sampling:
  r = cfg.rollout
  return Sampling(float(r.temperature), float(r.top_p), int(r.top_k), tuple(eos))
