"""LLaVA-1.5-7B fine-tuned with LoRA, no facial prior: the paper's baseline."""

from configs.emola_7b import get_config as emola_7b


def get_config():
    return emola_7b().replace(prior_position="off")
