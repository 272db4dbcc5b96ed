"""Model shapes by name, for planning and benchmarking without the weights: the published
config.json values of the Qwen models we target, and two small random-init shapes for the benches
(config.plan.shape, `python -m tapo_jax.bench ... --shape`)."""

from tapo_jax.models.qwen import QwenConfig

SHAPES = {
  "tiny": QwenConfig(
    vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
  ),
  "small": QwenConfig(
    vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
  ),
  "qwen2.5-1.5b": QwenConfig(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
  ),
  "qwen2.5-7b": QwenConfig(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, head_dim=128, max_position_embeddings=131072,
  ),
  "qwen3-8b": QwenConfig(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, model_type="qwen3",
    max_position_embeddings=40960,
  ),
}  # fmt: skip
