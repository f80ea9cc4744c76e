"""EmoLA-7B: LLaVA-1.5-7B (CLIP ViT-L/14-336, Vicuna-7B v1.5) + facial prior token + LoRA r=128.

Training as the paper's official scripts do: LoRA (r 128, alpha 256, dropout 0.05) on every
decoder projection and the prior projector at 1e-4, the multi-modal projector at 2e-5, AdamW
without weight decay, cosine schedule with 3% warmup, global batch 64, length 2048, bf16, one
epoch over FABA-Instruct's emotion and AU training sets (35,309 records: 552 steps).
Paths are relative to the working directory; point them elsewhere with --set.
"""

import dataclasses

from emola_jax.config import LoRAConfig
from emola_jax.data.pipeline import PipelineConfig
from emola_jax.models.tree import PRIOR_PROJECTOR_PATTERN
from emola_jax.train.config import Experiment, FromBase, TrainConfig

FABA = "data/FABA-Instruct"


def get_config() -> Experiment:
    # The towers (CLIP ViT-L/14-336, Vicuna-7B v1.5), vocabulary and image token id are the base's;
    # the run adds LoRA and the prior token (576 visual + 1 prior placeholders per image).
    model = FromBase(prior_position="after", lora=LoRAConfig(rank=128, alpha=256.0, dropout=0.05), dtype="bfloat16")
    train = TrainConfig(
        base="checkpoints/llava-1.5-7b",  # python run.py convert llava-hf/llava-1.5-7b-hf checkpoints/llava-1.5-7b
        steps=552, remat="full", checkpoint_every=100, keep_checkpoints=3,
    )
    data = PipelineConfig(
        annotations=(f"{FABA}/train/train_emotion_anno.json", f"{FABA}/train/train_au_anno.json"),
        images_root=FABA, landmarks="data/faba_landmarks.array_record",  # python run.py precompute-landmarks ...
        max_length=2048, batch_size=64, pad_to_square=True, seed=0,
    )
    return Experiment(model=model, train=train, data=data)


def without_prior(experiment: Experiment) -> Experiment:
    """The same run without the facial prior token (plain LLaVA-1.5 fine-tuning)."""
    trainable = tuple(rule for rule in experiment.train.trainable if rule[0] != PRIOR_PROJECTOR_PATTERN)
    return dataclasses.replace(
        experiment,
        model=dataclasses.replace(experiment.model, prior_position="off"),
        train=dataclasses.replace(experiment.train, trainable=trainable),
    )
