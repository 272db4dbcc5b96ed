"""A real Qwen2 tokenizer built offline from the BPE ranks the `dashscope` wheel ships.

`dashscope/resources/qwen.tiktoken` holds Qwen's 151,643 byte-level BPE ranks; with Qwen2's
pre-tokenizer regex and its three special tokens they give Qwen2's ids ("Hello" -> 9707). The
package is installed without its dependencies (it is never imported: only the file is read).
"""

import base64
import importlib.util
import pathlib

QWEN2_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ranks_file() -> pathlib.Path | None:
  spec = importlib.util.find_spec("dashscope")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
  return path if path.exists() else None


def qwen2_tokenizer():
  """A transformers fast tokenizer with Qwen2's vocabulary, specials and chat format."""
  import transformers
  from transformers.convert_slow_tokenizer import TikTokenConverter

  path = ranks_file()
  if path is None:
    raise FileNotFoundError("qwen.tiktoken not found: pip install --no-deps dashscope==2.0.2")

  class Converter(TikTokenConverter):
    @staticmethod
    def load_tiktoken_bpe(url):
      ranks = {}
      for line in pathlib.Path(url).read_bytes().splitlines():
        if line:
          token, rank = line.split()
          ranks[base64.b64decode(token)] = int(rank)
      return ranks

  tok = Converter(str(path), pattern=QWEN2_PATTERN, extra_special_tokens=list(SPECIALS)).converted()
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    clean_up_tokenization_spaces=False,
  )
  fast.chat_template = CHAT_TEMPLATE
  return fast
