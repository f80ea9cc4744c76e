"""Drawn faces with FABA-style annotations: a small dataset whose answers can be learned.

Each face's brows, eyes and mouth follow its emotion and action units (FACS), so that a model can
learn from pixels (and from landmark features computed on them) what the annotations say. Faces
vary in position, size, colours and stroke widths. Written in the FABA-Instruct layout: images,
`{train,eval}_{emotion,au}_anno.json` with `id`, `image`, `conversations`, `label`, `gpt4`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from emola_jax.data.labels import AU_QUESTION, EMOTION_QUESTION, EMOTIONS

# FACS action units each emotion shows here (within FABA-Bench's 12 AUs); neutral shows none
EMOTION_AUS = {
    "happiness": (6, 12, 25), "sadness": (1, 4, 17), "surprise": (1, 2, 5, 26), "anger": (4, 5, 24),
    "neutral": (), "disgust": (4, 10), "fear": (1, 2, 4, 5, 25),
}
AU_PHRASES = {
    1: "the inner brows are raised", 2: "the outer brows are raised", 4: "the brows are lowered and drawn together",
    5: "the upper lids are raised", 6: "the cheeks are raised", 10: "the upper lip is raised",
    12: "the lip corners are pulled up", 17: "the chin is raised", 24: "the lips are pressed together",
    25: "the lips are parted", 26: "the jaw is dropped",
}
EMOTION_OPENINGS = {
    "happiness": "The face shows happiness", "sadness": "The face shows sadness", "surprise": "The face shows surprise",
    "anger": "The face shows anger", "neutral": "The face is neutral", "disgust": "The face shows disgust",
    "fear": "The face shows fear",
}


def describe_emotion(emotion: str) -> str:
    aus = EMOTION_AUS[emotion]
    detail = ", ".join(AU_PHRASES[a] for a in aus) if aus else "the brows, eyes and mouth are at rest"
    return f"{EMOTION_OPENINGS[emotion]}: {detail}."


def describe_aus(emotion: str) -> str:
    aus = EMOTION_AUS[emotion]
    names = [f"AU{a}" for a in aus]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} are active: " + ", ".join(AU_PHRASES[a] for a in aus) + "."


def draw_face(emotion: str, rng: np.random.Generator, size: int = 112):
    """One face as a PIL image."""
    aus = set(EMOTION_AUS[emotion])
    background = tuple(int(v) for v in rng.integers(200, 250, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    scale = size * rng.uniform(0.92, 1.0)
    cx, cy = size / 2 + rng.uniform(-0.02, 0.02) * size, size / 2 + rng.uniform(-0.02, 0.02) * size
    px = lambda x: cx + (x - 0.5) * scale  # noqa: E731  (face coordinates in [0, 1] -> pixels)
    py = lambda y: cy + (y - 0.5) * scale  # noqa: E731
    width = max(2, int(round(size / 25 * rng.uniform(0.8, 1.2))))
    skin = (int(rng.integers(200, 245)), int(rng.integers(160, 205)), int(rng.integers(130, 175)))
    draw.ellipse((px(0.12), py(0.06), px(0.88), py(0.94)), fill=skin, outline=(90, 60, 40), width=width)

    eye_open = 0.07 if 5 in aus else (0.025 if 6 in aus else 0.045)
    brow_lift = -0.06 if 2 in aus or 1 in aus else 0.0
    inner_drop = 0.05 if 4 in aus else (-0.04 if 1 in aus and 2 not in aus else 0.0)
    for side in (-1, 1):
        ex = 0.5 + side * 0.16
        draw.ellipse((px(ex - 0.06), py(0.40 - eye_open), px(ex + 0.06), py(0.40 + eye_open)), fill=(40, 30, 30))
        inner, outer = ex - side * 0.08, ex + side * 0.08
        draw.line((px(inner), py(0.28 + brow_lift + inner_drop), px(outer), py(0.28 + brow_lift)),
                  fill=(60, 40, 30), width=width + 1)
    if 6 in aus:  # raised cheeks
        for side in (-1, 1):
            x = 0.5 + side * 0.22
            draw.arc((px(x - 0.07), py(0.50), px(x + 0.07), py(0.58)), 200, 340, fill=(190, 110, 100), width=width)
    if 10 in aus:  # raised upper lip: nose wrinkle
        draw.line((px(0.45), py(0.55), px(0.55), py(0.55)), fill=(120, 70, 60), width=width)

    lip = (150, 40, 40)
    mouth_y = 0.72
    if 26 in aus:  # dropped jaw: open round mouth
        draw.ellipse((px(0.42), py(mouth_y - 0.06), px(0.58), py(mouth_y + 0.10)), fill=(110, 30, 30))
    elif 12 in aus:  # smile
        draw.chord((px(0.33), py(mouth_y - 0.10), px(0.67), py(mouth_y + 0.08)), 15, 165,
                   fill=(110, 30, 30) if 25 in aus else None, outline=lip, width=width + 1)
    elif 25 in aus:  # parted, stretched lips (fear)
        draw.ellipse((px(0.36), py(mouth_y - 0.03), px(0.64), py(mouth_y + 0.04)), fill=(110, 30, 30))
    elif 17 in aus:  # raised chin, corners down
        draw.arc((px(0.35), py(mouth_y), px(0.65), py(mouth_y + 0.14)), 200, 340, fill=lip, width=width + 1)
    elif 24 in aus:  # pressed lips
        draw.line((px(0.40), py(mouth_y), px(0.60), py(mouth_y)), fill=lip, width=width + 2)
    elif 10 in aus:  # raised, uneven upper lip
        draw.line((px(0.38), py(mouth_y + 0.02), px(0.5), py(mouth_y - 0.03), px(0.62), py(mouth_y + 0.01)),
                  fill=lip, width=width + 1)
    else:  # at rest
        draw.line((px(0.38), py(mouth_y), px(0.62), py(mouth_y)), fill=lip, width=width)
    return img


def annotation_files(directory: str | Path) -> dict[str, Path]:
    """The four annotation files of a drawn-faces folder, by name (`train_emotion`, `eval_au`, ...)."""
    return {f"{split}_{task}": Path(directory) / f"{split}_{task}_anno.json"
            for split in ("train", "eval") for task in ("emotion", "au")}


def write_dataset(directory: str | Path, *, train_per_emotion: int, eval_per_emotion: int, seed: int = 0,
                  size: int = 112) -> dict[str, Path]:
    """Images and the four annotation files; returns their paths by name (`train_emotion`, ...)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = annotation_files(directory)
    for split, count in (("train", train_per_emotion), ("eval", eval_per_emotion)):
        emotion_records, au_records = [], []
        for i in range(count):
            for label, emotion in enumerate(EMOTIONS):
                face_id = f"{split}_{emotion}_{i}"
                draw_face(emotion, rng, size).save(directory / "images" / f"{face_id}.png")
                emotion_records.append(_record(face_id, EMOTION_QUESTION, describe_emotion(emotion), label))
                if EMOTION_AUS[emotion]:
                    au_label = ", ".join(str(a) for a in EMOTION_AUS[emotion])
                    au_records.append(_record(face_id, AU_QUESTION, describe_aus(emotion), au_label, suffix="_au"))
        for task, records in (("emotion", emotion_records), ("au", au_records)):
            files[f"{split}_{task}"].write_text(json.dumps(records, indent=1))
    return files


def _record(face_id: str, prompt: str, answer: str, label, suffix: str = "") -> dict:
    return {
        "id": face_id + suffix, "image": f"images/{face_id}.png", "source": "drawn",
        "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}],
        "label": label, "gpt4": answer,
    }
