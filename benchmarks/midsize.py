"""The mid-size LLaVA-shaped model the CPU benchmarks share (decoder 8 x 1024, FFN 2816, vocab
32000; a 4-layer CLIP at 224 px, so 256 image tokens)."""

IMAGE_TOKEN = 31999


def llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=224, patch_size=14),
        text_config=LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048),
        image_token_index=IMAGE_TOKEN,
    )
