"""EmoLA-7B: LLaVA-1.5-7B (CLIP ViT-L/14-336, Vicuna-7B v1.5) + facial prior token + LoRA r=128."""

from emola_jax.config import EmolaConfig, LoRAConfig, TextConfig, VisionConfig


def get_config() -> EmolaConfig:
    return EmolaConfig(
        vision=VisionConfig(),  # ViT-L/14 at 336 px: 576 patch tokens of width 1024
        text=TextConfig(),  # Vicuna-7B v1.5: 32 layers, width 4096, vocab 32000
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_id=-200,  # LLaVA's placeholder id; 576 visual + 1 prior placeholders per image
        prior_position="after",
        lora=LoRAConfig(rank=128, alpha=256.0),
        dtype="bfloat16",
    )
