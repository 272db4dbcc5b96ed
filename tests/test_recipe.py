"""The paper's recipe as configured: defaults that train constructions, sizes that hold a copied
y⁻, text anchoring on a real Qwen2 BPE vocabulary, a thinking model's output format."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tapo_jax import config as config_lib
from tapo_jax.tapo import synthesis
from tapo_jax.tapo.batch import Rollouts
from tapo_jax.tapo.loss import LossConfig, prepare_batch, tapo_loss

ROOT = pathlib.Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------- defaults train


def divergence_like_batch():
  """2 queries x K=4 originals (pass rates 1/2 and 3/4) and 3 constructions, all correct (what
  divergence constructions always are)."""
  r, t = 11, 6
  mask = np.zeros((r, t), bool)
  mask[:, 2:5] = True
  return Rollouts(
    tokens=jnp.asarray(np.arange(r * t).reshape(r, t) % 13, jnp.int32),
    positions=jnp.asarray(np.broadcast_to(np.arange(t), (r, t)), jnp.int32),
    loss_mask=jnp.asarray(mask),
    sampler_logprobs=jnp.zeros((r, t)),
    from_learner=jnp.asarray(mask),
    prompt_lens=jnp.full(r, 2, jnp.int32),
    response_lens=jnp.full(r, 3, jnp.int32),
    truncated=jnp.zeros(r, bool),
    rewards=jnp.asarray([1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1], jnp.float32),
    group_ids=jnp.asarray([0] * 4 + [1] * 4 + [2, 2, 3], jnp.int32),
    is_constructed=jnp.asarray([False] * 8 + [True] * 3),
    valid=jnp.ones(r, bool),
  )


class Stub:
  def __init__(self, w):
    self.w = w

  def hidden(self, tokens, positions, segment_ids=None):
    return jax.nn.one_hot(tokens, 13) + 0.01 * positions[..., None]

  def lm_head(self):
    return self.w


def test_the_default_tapo_settings_train_on_constructions():
  cfg = LossConfig.from_config(config_lib.base_config())
  train, _ = prepare_batch(divergence_like_batch(), cfg)
  adv = np.asarray(train.advantages)[:, 0]  # a row's value, on each of its tokens
  np.testing.assert_allclose(adv[8:], [1 - 0.5, 1 - 0.5, 1 - 0.75], rtol=1e-6)  # r - mean(G_orig)
  assert np.asarray(train.loss_mask)[8:].any(axis=1).all()
  train = train.replace(old_logprobs=jnp.full(train.tokens.shape, -2.0))
  w = jax.random.normal(jax.random.key(0), (13, 13))
  grad = jax.grad(lambda w_: tapo_loss(Stub(w_), train, cfg)[1]["loss/ref"])(w)
  assert float(jnp.abs(grad).sum()) > 1e-3


def test_group_baseline_gives_all_correct_constructions_no_signal():
  c = config_lib.base_config()
  c.tapo.ref_baseline = "group"  # why main.py rejects it with divergence
  train, _ = prepare_batch(divergence_like_batch(), LossConfig.from_config(c))
  assert not np.asarray(train.advantages)[8:].any()
  assert not np.asarray(train.loss_mask)[8:].any()


def _config(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name,margin", [("qwen7b", 512), ("tiny", 160), ("smoke", 0)])
def test_recipe_sizes_hold_a_copied_negative(name, margin):
  c = _config(name)
  assert c.tapo.max_len >= c.data.max_prompt_tokens + c.rollout.max_new_tokens
  if c.tapo.construction == "policy":
    synth = config_lib.synthesis_max_new_tokens(c)
    assert synth >= c.rollout.max_new_tokens + margin  # a whole y⁻, an analysis and a correction
    assert c.tapo.max_len >= c.data.max_prompt_tokens + synth
    assert c.tapo.ref_baseline == "group"
  else:
    assert c.tapo.ref_baseline == "orig"


# -------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
  "text,expected",
  [
    ("<think>hmm <b></think><analysis>a</analysis><reconstruction>r</reconstruction>", ("a", "r")),
    ("\n<think>\nx\n</think>\n\n<analysis>a</analysis>\n<reconstruction>r</reconstruction>",
     ("a", "r")),
    ("<think>x</think>Sure. <analysis>a</analysis><reconstruction>r</reconstruction>", None),
    ("<think>x</think><think>y</think><analysis>a</analysis><reconstruction>r</reconstruction>",
     None),
    ("<think>x<analysis>a</analysis><reconstruction>r</reconstruction>", None),  # unclosed
    ("<analysis>a</analysis><think>x</think><reconstruction>r</reconstruction>", None),
  ],
)  # fmt: skip
def test_a_leading_think_block_is_tolerated(text, expected):
  assert synthesis.parse_construction(text) == expected


# ------------------------------------------------------------------------ anchoring on real BPE


NEG = "  Let x = 12.\n\nThen 2+2=5.\nSo the answer is \\boxed{5}"
FIX = "Wait, 2+2 is 4, not 5.\nSo the answer is \\boxed{4}"


def test_anchor_keeps_leading_whitespace_and_merged_newlines(qwen_tokenizer):
  tok = qwen_tokenizer
  ids = tok.encode(NEG)
  assert tok.decode(ids[:2]) == "  Let" and ".\n\n" in [tok.decode([i]) for i in ids]
  recon = "Let x = 12.\n\nThen 2+2=5.\n" + FIX  # the parse strips the leading whitespace
  n, rest = synthesis.anchor_text(tok, ids, recon)
  assert tok.decode(ids[:n]) == "  Let x = 12.\n\nThen 2+2=5.\n"
  assert rest == FIX


def test_anchor_ignores_how_the_negative_was_split(qwen_tokenizer):
  tok = qwen_tokenizer
  canonical = tok.encode(" answer")
  assert len(canonical) == 1
  ids = tok.encode("Then 2+2=5. The") + tok.encode(" ans") + tok.encode("wer is 5")
  n, rest = synthesis.anchor_text(tok, ids, "Then 2+2=5. The answer is 4")
  assert tok.decode(ids[:n]) == "Then 2+2=5. The answer is " and rest == "4"
  # a token-level prefix would stop before " ans": the re-tokenized text splits differently
  recon_ids = tok.encode("Then 2+2=5. The answer is 4")
  token_lcp = next(i for i, (a, b) in enumerate(zip(ids, recon_ids, strict=False)) if a != b)
  assert token_lcp < n


def test_anchor_steps_back_over_a_partial_character(qwen_tokenizer):
  tok = qwen_tokenizer
  text = "Area is 5 m² so"
  ids = tok.encode(text)
  n, rest = synthesis.anchor_text(tok, ids, "Area is 5 m³ so")
  kept = tok.decode(ids[:n])
  assert (
    "\ufffd" not in kept
    and "Area is 5 m³ so".startswith(kept)
    and kept + rest == ("Area is 5 m³ so")
  )


def _anchor(tok, outputs, negatives, **kw):
  outs = [tok.encode(o) + [tok.eos_token_id] for o in outputs]
  return synthesis.anchor(
    tok, list(range(len(outs))), outs, negatives, slots=len(outs), width=64,
    eos_ids=[tok.eos_token_id], **kw,
  )  # fmt: skip


def test_full_reconstructions_are_dropped_and_counted(qwen_tokenizer):
  tok = qwen_tokenizer
  neg = tok.encode(NEG)
  fmt = "<analysis>step 2</analysis><reconstruction>{}</reconstruction>"
  outputs = [
    fmt.format("Let x = 12.\n\nThen 2+2=5.\n" + FIX),  # keeps 2 of 3 lines
    fmt.format("Let x = 12.\n" + FIX),  # keeps the first line only
    fmt.format("We compute 2+2=4.\n\\boxed{4}"),  # keeps nothing: a full reconstruction
    "no format",
  ]
  a = _anchor(tok, outputs, [neg] * 4)
  assert a.parsed.tolist() == [True, True, True, False]
  assert a.ok.tolist() == [True, True, False, False] and a.too_short.tolist() == [0, 0, 1, 0]
  assert a.metrics(4) == {"tapo/parse_rate": 0.75, "tapo/dropped_for_anchor": 1.0}
  strict = _anchor(tok, outputs, [neg] * 4, min_anchor=0.5)
  assert strict.ok.tolist() == [True, False, False, False]  # line 1 is < half of y⁻'s tokens
  ablation = _anchor(tok, outputs, [neg] * 4, anchor_prefix=False)
  assert ablation.ok.tolist() == [True, True, True, False] and not ablation.prefix_lens.any()
  rest = ablation.rest[2, : ablation.rest_lens[2] - 1].tolist()
  assert tok.decode(rest) == "We compute 2+2=4.\n\\boxed{4}"
