"""LLaVA-1.5-7B fine-tuned with LoRA on FABA-Instruct, no facial prior: the paper's baseline."""

from configs.emola_7b import get_config as emola_7b
from configs.emola_7b import without_prior


def get_config():
    return without_prior(emola_7b())
