"""The teachers of mode=coldstart: who rewrites y⁻ given the synthesis prompt (as text).

Both take the filled synthesis template as one user message and return one completion per prompt:
  LocalTeacher  a local HF directory loaded by our model code (the policy itself by default) on its
                own engine; the text goes through the teacher's own tokenizer and chat template, so
                a teacher with another vocabulary works.
  HttpTeacher   an OpenAI-compatible server (e.g. a local vLLM): POST {url}/v1/chat/completions,
                concurrent requests, timeouts, retries with backoff; a failure is one line.
The reply is text only; nothing in it is executed.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp

from tapo_jax import config as config_lib
from tapo_jax import sampling
from tapo_jax.data import text as text_lib
from tapo_jax.data.prompts import format_prompt
from tapo_jax.models import load_pretrained
from tapo_jax.tapo import synthesis
from tapo_jax.train import engines as engines_lib


class TeacherError(RuntimeError):
  """The teacher server failed after its retries; main prints it on one line, exit 1."""


class LocalTeacher:
  """A local HF model (the policy when coldstart.teacher_path is empty) on its own engine."""

  def __init__(self, cfg, template: str, mesh, policy, policy_tokenizer):
    model, self.tokenizer = policy, policy_tokenizer
    if cfg.coldstart.teacher_path:
      import transformers

      dtype = jnp.dtype(cfg.model.dtype)  # inference only: no float32 master weights
      with jax.set_mesh(mesh):
        model = load_pretrained(
          cfg.coldstart.teacher_path, dtype=dtype, param_dtype=dtype, mesh=mesh
        )
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.coldstart.teacher_path)
    self.chat = cfg.data.use_chat_template
    literal = synthesis.encode_template(self.tokenizer, template, self.chat).literal_tokens
    self.engine = engines_lib.synthesis_engine(cfg, model, mesh, literal)
    self.params = self.engine.load_params(model)  # the decode copy, made once
    self.eos = text_lib.default_eos_ids(self.tokenizer)
    cs = cfg.coldstart
    self.sampling = sampling.Sampling(cs.teacher_temperature, cs.teacher_top_p, 0, tuple(self.eos))
    self.max_new_tokens = config_lib.synthesis_max_new_tokens(cfg)

  def write(self, prompts: list[str], seed: int) -> list[str | None]:
    """One completion per prompt; None for a prompt longer than the largest prefill bucket (its
    y⁻ and y⁺ take more of the teacher's tokens than the policy's)."""
    ids = [format_prompt(p, "{problem}", self.tokenizer, self.chat) for p in prompts]
    fits = [i for i, x in enumerate(ids) if len(x) <= self.engine.max_prefill_length]
    out: list[str | None] = [None] * len(prompts)
    if fits:
      gen = sampling.generate(
        self.engine, self.params, [ids[i] for i in fits], self.sampling,
        n=1, max_new_tokens=self.max_new_tokens, seed=seed,
      )  # fmt: skip
      texts = text_lib.decode_responses(self.tokenizer, gen.completions, self.eos)
      for i, text in zip(fits, texts, strict=True):
        out[i] = text
    return out


class HttpTeacher:
  """An OpenAI-compatible chat server: one request per prompt, teacher_workers at a time."""

  def __init__(self, cfg):
    self.cs, self.max_new_tokens = cfg.coldstart, config_lib.synthesis_max_new_tokens(cfg)

  def write(self, prompts: list[str], seed: int) -> list[str | None]:
    cs = self.cs

    def one(i: int) -> str:
      return chat_completion(
        cs.teacher_url, cs.teacher_model, prompts[i], temperature=cs.teacher_temperature,
        top_p=cs.teacher_top_p, max_tokens=self.max_new_tokens, seed=seed + i,
        timeout_s=cs.teacher_timeout_s, retries=cs.teacher_retries,
      )  # fmt: skip

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=cs.teacher_workers)
    try:
      return list(pool.map(one, range(len(prompts))))
    finally:
      pool.shutdown(wait=False, cancel_futures=True)


def make_teacher(cfg, template: str, mesh, policy, policy_tokenizer):
  """The configured teacher: coldstart.teacher_url, else teacher_path, else the policy."""
  if cfg.coldstart.teacher_url:
    return HttpTeacher(cfg)
  return LocalTeacher(cfg, template, mesh, policy, policy_tokenizer)


def _one_line(text, limit: int = 200) -> str:
  text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
  return " ".join(text.split())[:limit]


def chat_completion(
  url: str,
  model: str,
  prompt: str,
  *,
  temperature: float,
  top_p: float,
  max_tokens: int,
  seed: int,
  timeout_s: float,
  retries: int,
) -> str:
  """The first choice's text from {url}/v1/chat/completions. Connection errors, timeouts and HTTP
  429 / 5xx are retried after 1, 2, 4 ... s (at most 30); anything else is a TeacherError."""
  base = url.rstrip("/")
  endpoint = base + ("" if base.endswith("/v1") else "/v1") + "/chat/completions"
  body = dict(
    model=model, messages=[{"role": "user", "content": prompt}], temperature=temperature,
    top_p=top_p, max_tokens=max_tokens, seed=seed, n=1,
  )  # fmt: skip
  data = json.dumps(body).encode()
  for attempt in range(retries + 1):
    request = urllib.request.Request(endpoint, data, {"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=timeout_s) as response:
        raw = response.read()
      break
    except urllib.error.HTTPError as e:
      why = f"HTTP {e.code}: {_one_line(e.read())}"
      if e.code != 429 and e.code < 500:
        raise TeacherError(f"teacher {endpoint}: {why}") from None
    except (OSError, http.client.HTTPException) as e:  # refused, DNS, reset, timeout, cut short
      why = _one_line(getattr(e, "reason", None) or e)
    if attempt < retries:
      time.sleep(min(2.0**attempt, 30.0))
  else:
    raise TeacherError(f"teacher {endpoint}: {why} (after {retries + 1} attempts)")
  try:
    content = json.loads(raw)["choices"][0]["message"]["content"]
  except (ValueError, KeyError, IndexError, TypeError):
    raise TeacherError(f"teacher {endpoint}: not a chat completion: {_one_line(raw)}") from None
  return content or ""
