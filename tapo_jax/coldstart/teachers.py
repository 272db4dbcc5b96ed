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

import http.client
import json
import socket
import threading
import urllib.parse

import jax
import jax.numpy as jnp

from tapo_jax import config as config_lib
from tapo_jax import sampling
from tapo_jax.data import text as text_lib
from tapo_jax.data.prompts import format_prompt
from tapo_jax.models import load_pretrained
from tapo_jax.sampling import engines as engines_lib
from tapo_jax.tapo import synthesis


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
  """An OpenAI-compatible chat server: one request per prompt, teacher_workers at a time.

  Every request is bounded: coldstart.teacher_timeout_s covers a whole attempt (connect, headers
  and body, however slowly the server sends them) and a reply is at most MAX_REPLY_BYTES. The
  requests run on daemon threads; when one fails for good, or Ctrl-C interrupts the wait, the
  others are aborted (their sockets shut down) and nothing waits for them."""

  def __init__(self, cfg):
    self.cs, self.max_new_tokens = cfg.coldstart, config_lib.synthesis_max_new_tokens(cfg)

  def write(self, prompts: list[str], seed: int) -> list[str | None]:
    cs, session = self.cs, Session()
    out: list[str | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    todo = iter(range(len(prompts)))
    lock, finished = threading.Lock(), threading.Event()
    remaining = [len(prompts)]

    def worker():
      while not session.stopped.is_set():
        with lock:
          i = next(todo, None)
        if i is None:
          return
        try:
          out[i] = chat_completion(
            cs.teacher_url, cs.teacher_model, prompts[i], temperature=cs.teacher_temperature,
            top_p=cs.teacher_top_p, max_tokens=self.max_new_tokens, seed=seed + i,
            timeout_s=cs.teacher_timeout_s, retries=cs.teacher_retries, session=session,
          )  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
          with lock:
            errors.append(e)
          finished.set()
          return
        with lock:
          remaining[0] -= 1
          if not remaining[0]:
            finished.set()

    if not prompts:
      return out
    for _ in range(min(cs.teacher_workers, len(prompts))):
      threading.Thread(target=worker, daemon=True, name="teacher").start()
    try:
      while not finished.wait(0.2):  # a timed wait: Ctrl-C reaches this thread
        pass
    finally:
      if errors or remaining[0]:
        session.abort()  # the requests still in flight end now; nobody joins their threads
    if errors:
      raise errors[0]
    return out


class Session:
  """The open sockets of one batch of requests: `abort` shuts them all down (a blocked read
  returns at once) and stops the retries."""

  def __init__(self):
    self.stopped, self._lock, self._open = threading.Event(), threading.Lock(), set()

  def open(self, sock) -> None:
    with self._lock:
      self._open.add(sock)
      if not self.stopped.is_set():
        return
    _shutdown(sock)  # aborted while it connected

  def close(self, sock) -> None:
    with self._lock:
      self._open.discard(sock)

  def abort(self) -> None:
    with self._lock:
      self.stopped.set()
      socks = list(self._open)
    for sock in socks:
      _shutdown(sock)


def _shutdown(sock) -> None:
  """Ends `sock` from another thread: shutdown() wakes a recv blocked on it (close() may not)."""
  try:
    sock.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass


def make_teacher(cfg, template: str, mesh, policy, policy_tokenizer):
  """The configured teacher: coldstart.teacher_url, else teacher_path, else the policy."""
  if cfg.coldstart.teacher_url:
    return HttpTeacher(cfg)
  return LocalTeacher(cfg, template, mesh, policy, policy_tokenizer)


MAX_REPLY_BYTES = 16 << 20  # a reply (or error body) larger than this is an error, not read on


def _one_line(text, limit: int = 200) -> str:
  """`text` (bytes or anything) as one printable line: whitespace runs become one space, other
  control characters are escaped (a teacher's bytes never reach the terminal raw)."""
  text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
  text = " ".join(text.split())[:limit]
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Timeout(OSError):
  """An attempt that did not complete within teacher_timeout_s."""


def _post(endpoint: str, data: bytes, timeout_s: float, session: Session) -> tuple[int, bytes]:
  """(HTTP status, body) of one POST that ends within `timeout_s` in all (a server sending a byte
  at a time is cut off at the deadline) and reads at most MAX_REPLY_BYTES."""
  url = urllib.parse.urlsplit(endpoint)
  cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
  conn = cls(url.hostname, url.port, timeout=timeout_s)
  timed_out, sock = threading.Event(), []

  def expire():
    timed_out.set()
    if sock:
      _shutdown(sock[0])

  if session.stopped.is_set():
    raise TeacherError(f"teacher {endpoint}: aborted")
  timer = threading.Timer(timeout_s, expire)
  timer.daemon = True
  timer.start()
  try:
    conn.connect()  # its own timeout bounds it; the response may drop conn.sock, so keep it
    sock.append(conn.sock)
    session.open(conn.sock)
    if timed_out.is_set():
      _shutdown(conn.sock)
    path = url.path + (f"?{url.query}" if url.query else "")
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    body = bytearray()
    while chunk := response.read1(1 << 16):
      body += chunk
      if len(body) > MAX_REPLY_BYTES:
        raise TeacherError(
          f"teacher {endpoint}: a reply larger than {MAX_REPLY_BYTES >> 20} MiB; not read on"
        )
    if timed_out.is_set() or session.stopped.is_set():
      raise _Timeout("cut off")
    return response.status, bytes(body)
  except (OSError, http.client.HTTPException) as e:
    if session.stopped.is_set():
      raise TeacherError(f"teacher {endpoint}: aborted") from None
    if timed_out.is_set():
      raise _Timeout(f"no complete reply within {timeout_s:g} s") from None
    raise e
  finally:
    timer.cancel()
    if sock:
      session.close(sock[0])
    conn.close()


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
  session: Session | None = None,
) -> str:
  """The first choice's text from {url}/v1/chat/completions. Connection errors, timeouts (each
  attempt ends within `timeout_s`, headers and body included) and HTTP 429 / 5xx are retried
  after 1, 2, 4 ... s (at most 30); anything else is a TeacherError."""
  session = session or Session()
  base = url.rstrip("/")
  endpoint = base + ("" if base.endswith("/v1") else "/v1") + "/chat/completions"
  body = dict(
    model=model, messages=[{"role": "user", "content": prompt}], temperature=temperature,
    top_p=top_p, max_tokens=max_tokens, seed=seed, n=1,
  )  # fmt: skip
  data = json.dumps(body).encode()
  for attempt in range(retries + 1):
    try:
      status, raw = _post(endpoint, data, timeout_s, session)
      if status < 300:
        break
      why = f"HTTP {status}: {_one_line(raw)}"
      if status != 429 and status < 500:
        raise TeacherError(f"teacher {endpoint}: {why}")
    except (OSError, http.client.HTTPException) as e:  # refused, DNS, reset, timeout, cut short
      why = _one_line(getattr(e, "reason", None) or str(e) or type(e).__name__)
    if attempt < retries and session.stopped.wait(min(2.0**attempt, 30.0)):
      raise TeacherError(f"teacher {endpoint}: aborted")
  else:
    raise TeacherError(f"teacher {endpoint}: {why} (after {retries + 1} attempts)")
  try:
    content = json.loads(raw)["choices"][0]["message"]["content"]
  except (ValueError, KeyError, IndexError, TypeError):
    raise TeacherError(f"teacher {endpoint}: not a chat completion: {_one_line(raw)}") from None
  if content is not None and not isinstance(content, str):
    raise TeacherError(
      f"teacher {endpoint}: not a chat completion: message.content is a "
      f"{type(content).__name__}, not text: {_one_line(raw)}"
    )
  return content or ""
