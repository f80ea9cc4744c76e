"""LLaVA's `vicuna_v1` conversation template, and prompts with the image placeholder expanded."""

from __future__ import annotations

import numpy as np

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("USER", "ASSISTANT")


def question_with_image(question: str) -> str:
    """The `<image>` placeholder moved to the front of the first question, as LLaVA does."""
    return IMAGE_PLACEHOLDER + "\n" + question.replace(IMAGE_PLACEHOLDER, "").strip()


def generation_prompt(question: str) -> str:
    """`{system} USER: <image>\\n{question} ASSISTANT:`: the text the model continues."""
    return f"{SYSTEM} {ROLES[0]}: {question_with_image(question)} {ROLES[1]}:"


def tokenize_with_image(tokenizer, prompt: str, image_token_id: int, image_tokens: int) -> np.ndarray:
    """Token ids with `image_tokens` copies of `image_token_id` where `<image>` stands.

    As LLaVA's `tokenizer_image_token`: each text chunk is tokenised on its own, only the first
    keeps the BOS token.
    """
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        chunk_ids = tokenizer(chunk).input_ids
        if i > 0:
            if tokenizer.bos_token_id is not None and chunk_ids[:1] == [tokenizer.bos_token_id]:
                chunk_ids = chunk_ids[1:]
            ids.extend([image_token_id] * image_tokens)
        ids.extend(chunk_ids)
    return np.asarray(ids, np.int32)
