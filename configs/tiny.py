"""A tiny EmoLA with the real structure, for the demo and tests on a laptop CPU.

`python run.py train --config tiny --workdir runs/tiny` trains it from a random base on batches
made on the fly; the demo trains it on drawn faces instead.
"""

from emola_jax.config import EmolaConfig, LoRAConfig, TextConfig, VisionConfig
from emola_jax.data.synthetic import SyntheticData
from emola_jax.models.tree import LORA_PATTERN, PRIOR_PROJECTOR_PATTERN, PROJECTOR_PATTERN
from emola_jax.train.config import Experiment, TrainConfig


def get_config() -> Experiment:
    model = EmolaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14),  # 16 patch tokens
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_id=511,
        prior_position="after",
        lora=LoRAConfig(rank=16, alpha=32.0),
        dtype="float32",
    )
    # rates for a random tiny base learning drawn faces in a few hundred steps (the demo)
    trainable = ((LORA_PATTERN, 2e-3), (PRIOR_PROJECTOR_PATTERN, 2e-3), (PROJECTOR_PATTERN, 2e-3))
    train = TrainConfig(steps=300, checkpoint_every=100, remat="none", log_every=1, trainable=trainable,
                        warmup_ratio=0.05)
    return Experiment(model=model, train=train, data=SyntheticData(batch_size=8, seq_length=64))
