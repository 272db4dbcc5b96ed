"""The toy models' tokenizer: byte-level, one token per byte, no merges (a tiny Qwen2 tokenizer).

Why byte-level. `transformers.AutoTokenizer` (v5) loads the tokenizer of any `model_type: qwen2`
directory as `Qwen2Tokenizer`, whatever `tokenizer_config.json` says, and that class rebuilds the
pipeline from the saved vocabulary: NFC, the Qwen split regex, then byte-level mapping (space ->
"Ġ", newline -> "Ċ", ...) into a BPE model that silently drops symbols missing from the vocabulary.
A vocabulary keyed by raw characters (" ", "\n") therefore loses every space and newline on load.
Keying the vocabulary by the byte-level alphabet makes the saved pipeline and the one
`Qwen2Tokenizer` rebuilds the same function: text -> UTF-8 bytes -> one token per byte.

Vocabulary: the specials, then the byte symbols (all 256, so nothing is ever dropped, or only the
given characters for a legacy layout), then `extra` added tokens (single-token words such as the
construction tags). encode∘decode is the identity on NFC text.
"""

from __future__ import annotations

from collections.abc import Sequence

SPECIALS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)
ALL_BYTES = bytes(range(256))


def byte_symbols() -> list[str]:
  """The byte-level alphabet in byte order: printable bytes stand for themselves, the other 68
  (controls, space, DEL, NBSP, soft hyphen) are shifted to U+0100.. in byte order."""
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  out, shifted = [], 0
  for b in range(256):
    if b in printable:
      out.append(chr(b))
    else:
      out.append(chr(256 + shifted))
      shifted += 1
  return out


def make_tokenizer(chars: str | bytes = ALL_BYTES, extra: Sequence[str] = ()):
  """A fast tokenizer with ids: SPECIALS, the byte symbols of `chars`, then `extra` tokens.

  `chars` is a str (its UTF-8 bytes, in order) or bytes; the default covers every byte."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

  raw = chars if isinstance(chars, bytes) else chars.encode("utf-8")
  table = byte_symbols()
  symbols = list(dict.fromkeys(table[b] for b in raw))
  vocab = {t: i for i, t in enumerate(SPECIALS + tuple(symbols))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIALS))
  tok.add_tokens(list(extra))
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<unk>"
  )
  fast.chat_template = CHAT_TEMPLATE
  return fast
