"""A tiny EmoLA with the real structure, for the demo and tests on a laptop CPU."""

from emola_jax.config import EmolaConfig, LoRAConfig, TextConfig, VisionConfig


def get_config() -> EmolaConfig:
    return EmolaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14),  # 16 patch tokens
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_id=511,
        prior_position="after",
        lora=LoRAConfig(rank=8, alpha=16.0),
        dtype="float32",
    )
