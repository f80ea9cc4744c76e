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


def pad_token_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its unk token (LLaVA's choice for
    Vicuna, which has no pad token), else 0. Padding is always masked, so only its presence matters."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


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


# --- training: multi-turn prompts and LLaVA's label masking ---------------------------------------

IGNORE_INDEX = -100
SEPARATORS = (" ", "</s>")  # after a user turn, after an assistant turn
_SPEAKERS = {"human": ROLES[0], "gpt": ROLES[1]}


class BadRecord(ValueError):
    """A record that cannot become a training example; the message names the record and why."""


def conversation_turns(record_id: str, conversations) -> list[tuple[str, str]]:
    """`(role, text)` pairs of a FABA/LLaVA `conversations` list, checked: `from` is human or gpt,
    turns alternate starting with the user (a leading assistant turn is dropped, as LLaVA does),
    the last turn is an answer, and exactly one user turn holds `<image>` (moved to its front)."""
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord(f"record {record_id}: conversations must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in _SPEAKERS or not isinstance(turn.get("value"), str):
            raise BadRecord(f"record {record_id}: turn {i} is not {{'from': 'human'|'gpt', 'value': text}}")
        turns.append((_SPEAKERS[turn["from"]], turn["value"]))
    if turns[0][0] == ROLES[1]:
        turns = turns[1:]
    for i, (role, _) in enumerate(turns):
        if role != ROLES[i % 2]:
            raise BadRecord(f"record {record_id}: turns must alternate user, assistant (turn {i} is {role})")
    if not turns or len(turns) % 2:
        raise BadRecord(f"record {record_id}: the conversation must end with an assistant answer")
    with_image = [i for i, (_, text) in enumerate(turns) if IMAGE_PLACEHOLDER in text]
    if len(with_image) != 1 or turns[with_image[0]][1].count(IMAGE_PLACEHOLDER) != 1 or with_image[0] % 2:
        raise BadRecord(f"record {record_id}: exactly one user turn must hold one {IMAGE_PLACEHOLDER}")
    i = with_image[0]
    turns[i] = (turns[i][0], question_with_image(turns[i][1]))
    return turns


def training_prompt(turns: list[tuple[str, str]]) -> str:
    """`{system} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>`: LLaVA's `vicuna_v1` prompt."""
    parts = [SYSTEM + SEPARATORS[0]]
    for i, (role, text) in enumerate(turns):
        parts.append(f"{role}: {text}{SEPARATORS[i % 2]}")
    return "".join(parts)


def training_ids(tokenizer, record_id: str, turns: list[tuple[str, str]], image_token_id: int,
                 image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, labels)`, int32, with `image_tokens` image ids where `<image>` stands.

    The labels follow LLaVA's `preprocess_v1` (what EmoLA trained with): the prompt is cut into
    rounds at `</s>`; each round's token count and its instruction's (the round up to and including
    `" ASSISTANT: "`, minus 2: the BOS and the trailing space that merges into the answer's first
    token) come from tokenising that text on its own; rounds after the first count one token less
    each for a non-legacy LLaMA tokenizer (no prefix space after `</s>`). Everything outside the
    answers and their `</s>` is `IGNORE_INDEX`. Where those counts do not add up to the whole
    prompt's tokens, LLaVA silently masks the whole sample; here it is a `BadRecord`.
    """
    prompt = training_prompt(turns)
    ids = tokenize_with_image(tokenizer, prompt, image_token_id, 1).tolist()
    labels = list(ids)
    non_legacy = getattr(tokenizer, "legacy", True) is False
    answer_sep = SEPARATORS[0] + ROLES[1] + ": "
    labels[0] = IGNORE_INDEX
    cursor = 1
    for i, round_text in enumerate(prompt.split(SEPARATORS[1])):
        if not round_text:
            break
        pieces = round_text.split(answer_sep)
        if len(pieces) != 2:
            raise BadRecord(f"record {record_id}: round {i} does not split into one question and one answer at "
                            f"{answer_sep!r} (a turn holds that text itself)")
        round_len = len(tokenize_with_image(tokenizer, round_text, image_token_id, 1))
        instruction_len = len(tokenize_with_image(tokenizer, pieces[0] + answer_sep, image_token_id, 1)) - 2
        if i > 0 and non_legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cursor:cursor + instruction_len] = [IGNORE_INDEX] * max(instruction_len, 0)
        cursor += round_len
    if cursor != len(ids):
        raise BadRecord(f"record {record_id}: the rounds tokenise to {cursor} tokens but the whole prompt to "
                        f"{len(ids)}; its label mask would be wrong")
    position = ids.index(image_token_id)
    ids[position:position + 1] = [image_token_id] * image_tokens
    labels[position:position + 1] = [IGNORE_INDEX] * image_tokens
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)
