"""EmoLA-13B: EmoLA's recipe over LLaVA-1.5-13B (CLIP ViT-L/14-336, Vicuna-13B v1.5).

The paper trains the 7B; this is the same run on the 13B base, for `run.py plan` and for users
with the memory for it. The decoder's shapes are Vicuna-13B's (40 layers of 5120, FFN 13824,
40 heads); everything else is `emola_7b`'s.
"""

import dataclasses

from configs.emola_7b import get_config as emola_7b
from emola_jax.config import EmolaConfig, TextConfig
from emola_jax.train.config import Experiment

VICUNA_13B = TextConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40)


def get_config() -> Experiment:
    experiment = emola_7b()
    model = experiment.model.apply_to(EmolaConfig(text=VICUNA_13B))  # the whole model: its base is 13B
    train = dataclasses.replace(experiment.train, base="checkpoints/llava-1.5-13b")
    return dataclasses.replace(experiment, model=model, train=train)
