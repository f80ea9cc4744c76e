"""The facial prior: insightface's 2d106det landmark model run with onnxruntime.

`official` is the recipe the released EmoLA checkpoints were trained with: `cv2.imread` (BGR,
no channel swap), the whole image resized to 192x192, divided by 255, CHW, batch 1; the feature
is the raw 212-value output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emola_jax.config import LANDMARK_DIM

INPUT_SIZE = 192


def open_session(onnx_path: str | Path):
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"{onnx_path} could not be loaded as an ONNX model: {err}") from err
    inputs = session.get_inputs()
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, INPUT_SIZE, INPUT_SIZE]:
        raise ValueError(f"{onnx_path} does not take one [N, 3, 192, 192] input like 2d106det.onnx")
    return session


def official_input(image_path: str | Path) -> np.ndarray:
    """`[3, 192, 192]` float32 in the official EmoLA recipe (BGR, whole image, /255)."""
    import cv2

    pixels = cv2.imread(str(image_path))
    if pixels is None:
        raise ValueError(f"image {image_path} could not be read")
    pixels = cv2.resize(pixels, (INPUT_SIZE, INPUT_SIZE)).astype(np.float32) / 255.0
    return pixels.transpose(2, 0, 1)


def official_features(session, image_paths: list[str | Path]) -> np.ndarray:
    """`[len(image_paths), 212]` prior features, one batched session call."""
    batch = np.stack([official_input(p) for p in image_paths])
    model_input = session.get_inputs()[0]
    # the released 2d106det.onnx has a fixed batch of 1; a graph with a free batch axis takes all at once
    step = 1 if model_input.shape[0] == 1 else len(batch)
    out = np.concatenate(
        [session.run(None, {model_input.name: batch[i:i + step]})[0] for i in range(0, len(batch), step)]
    )
    out = out.reshape(len(image_paths), -1).astype(np.float32)
    if out.shape[1] != LANDMARK_DIM:
        raise ValueError(f"the landmark model returned {out.shape[1]} values per image, not {LANDMARK_DIM}")
    return out
