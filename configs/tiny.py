"""A tiny EmoLA with the real structure, for the demo and tests on a laptop CPU.

`python run.py train --config tiny --workdir runs/tiny` trains it from a random base on batches
made on the fly; the demo trains it on drawn faces instead.
"""

from emola_jax.config import EmolaConfig, LoRAConfig, TextConfig, VisionConfig
from emola_jax.data.synthetic import SyntheticData
from emola_jax.train.config import Experiment, TrainConfig


def get_config() -> Experiment:
    model = EmolaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14),  # 16 patch tokens
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_id=511,
        prior_position="after",
        lora=LoRAConfig(rank=8, alpha=16.0),
        dtype="float32",
    )
    train = TrainConfig(steps=20, checkpoint_every=10, remat="none", log_every=1)
    return Experiment(model=model, train=train, data=SyntheticData(batch_size=8, seq_length=64))
