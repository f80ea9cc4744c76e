"""EmoLA's facial prior token in PyTorch, over a transformers export (the README's recipe as code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file


def logits_with_prior(model, prior_file: str | Path, ids: np.ndarray, pixels: np.ndarray, landmarks: np.ndarray,
                      mask: np.ndarray) -> np.ndarray:
    """Logits of an `hf` export (or a PEFT model over one) with EmoLA's prior token: the token made from
    `landmarks` by `prior_projector.safetensors`, spliced after the visual tokens, fed as `inputs_embeds`.
    ids `[batch, seq]` (image placeholders expanded), pixels `[batch, size, size, 3]`, mask `[batch, seq]`."""
    prior = load_file(prior_file)
    input_ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        h = torch.nn.functional.gelu(torch.nn.functional.linear(
            torch.tensor(landmarks), prior["linear_1.weight"], prior["linear_1.bias"]))
        prior_token = torch.nn.functional.linear(h, prior["linear_2.weight"], prior["linear_2.bias"])[:, None]
        llava = model.get_base_model() if isinstance(model, PeftModel) else model
        visual = torch.stack(llava.model.get_image_features(
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), return_dict=True).pooler_output)
        image_side = torch.cat([visual, prior_token], dim=1)
        is_image = input_ids == llava.config.image_token_id
        embeds = model.get_input_embeddings()(torch.where(is_image, 0, input_ids))
        embeds[is_image] = image_side.reshape(-1, image_side.shape[-1]).to(embeds.dtype)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits.float().numpy()
