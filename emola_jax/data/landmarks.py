"""The facial prior: insightface's 2d106det landmark model run with onnxruntime.

Two recipes turn an image into the model's input and its output into the 212-value feature:

- `official` is the recipe the released EmoLA checkpoints were trained with: `cv2.imread` (BGR,
  no channel swap), the whole image resized to 192x192, divided by 255, CHW; the feature is the
  raw 212-value output.
- `insightface` is what the insightface library's `Landmark.get` does: crop around a face box
  (default: the whole image) at scale 192 / (1.5 * max(w, h)) with `cv2.warpAffine`, RGB,
  `(x - mean) / std` with mean/std read from the graph (0/1 for graphs that normalise inside,
  else 127.5/128); the feature is the 106 points mapped back to image pixels, flattened (x, y).
  A model trained on official features needs the official recipe.

Any ONNX graph with 2d106det's signature works: one `[N or 1, 3, 192, 192]` input, `[N, 212]` out.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from emola_jax.config import LANDMARK_DIM
from emola_jax.data.image import decode_rgb, exif_orientation, mode_problem, too_large, upright

INPUT_SIZE = 192


def open_session(onnx_path: str | Path, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU session, checked for 2d106det's signature (as far as the graph declares
    its output shape; `run_session` checks what it returns). `spinning=False` stops idle
    onnxruntime threads from busy-waiting, which would take cores from image decoding."""
    # deferred: start-up time (onnxruntime)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: graph-optimiser notices are not the user's concern
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"{onnx_path} could not be loaded as an ONNX model: {err}") from err
    inputs = session.get_inputs()
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, INPUT_SIZE, INPUT_SIZE]:
        raise ValueError(f"{onnx_path} does not take one [N, 3, 192, 192] input like 2d106det.onnx")
    declared = session.get_outputs()[0].shape
    per_image = declared[1:]
    if len(declared) < 2 or (all(isinstance(d, int) for d in per_image) and np.prod(per_image) != LANDMARK_DIM):
        raise ValueError(f"{onnx_path} declares an output of shape {_shape(declared)}, not [N, {LANDMARK_DIM}] "
                         "like 2d106det.onnx")
    session.source = str(onnx_path)  # named by run_session's errors
    return session


def _shape(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def run_session(session, batch: np.ndarray) -> np.ndarray:
    """`[N, 212]` outputs for `[N, 3, 192, 192]` inputs. A graph with a fixed batch size (the
    released 2d106det.onnx has 1) is run in chunks of that size, the last one zero-padded."""
    model_input = session.get_inputs()[0]
    fixed = model_input.shape[0] if isinstance(model_input.shape[0], int) and model_input.shape[0] > 0 else None
    step = fixed or len(batch)
    outputs = []
    for start in range(0, len(batch), step):
        chunk = batch[start:start + step]
        if fixed and len(chunk) < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out = np.asarray(session.run(None, {model_input.name: np.ascontiguousarray(chunk)})[0])
        if out.ndim < 2 or out.shape[0] != len(chunk) or out.size != len(chunk) * LANDMARK_DIM:
            raise ValueError(f"{getattr(session, 'source', 'the landmark model')} returned an output of shape "
                             f"{_shape(out.shape)} for {len(chunk)} images, not [{len(chunk)}, {LANDMARK_DIM}]")
        outputs.append(out.reshape(len(chunk), -1)[:min(step, len(batch) - start)])
    return np.concatenate(outputs).astype(np.float32)


def check_complete(data: bytes) -> str | None:
    """Why an encoded image is incomplete, or None. OpenCV decodes a truncated JPEG without an
    error (the missing rows come out grey), so the end-of-image marker is checked by hand."""
    if not data:
        return "empty file"
    if data[:2] == b"\xff\xd8":
        # entropy-coded data never holds a marker; an EOI before the last SOS is a thumbnail's
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-16:]:
        return "truncated PNG (no IEND chunk at the end)"
    return None


def read_bgr(image_path: str | Path) -> np.ndarray:
    """`cv2.imread` (BGR uint8) of a complete image file, upright by its EXIF orientation as
    Pillow reads it; anything else is a ValueError saying why. A file CLIP's decoder
    (`image.decode_rgb`) refuses (its pixel mode, its size over Pillow's limit) is refused here
    too, and OpenCV's own orientation handling is replaced by Pillow's, so the two models never
    see different pictures of one file."""
    # deferred: start-up time (cv2)
    import cv2


    try:
        data = Path(image_path).read_bytes()
    except OSError as err:
        raise ValueError(f"image {image_path} could not be read: {err.strerror or err}") from None
    problem, unreadable, orientation, tiff = check_complete(data), None, 1, False
    if problem is None:
        try:
            with Image.open(io.BytesIO(data)) as opened:  # the header only: no pixels are decoded
                problem, tiff = mode_problem(opened), opened.format == "TIFF"
                if problem is None:
                    try:
                        orientation = exif_orientation(opened, data)
                    except ValueError as err:
                        problem = str(err)
        except Image.DecompressionBombError as err:
            problem = too_large(err)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            unreadable = f"not a decodable image for CLIP's reader (PIL: {err})"
    if problem is None and tiff and orientation != 1:
        # OpenCV's TIFF reader turns orientations 2-4 itself whatever the flags and cannot read 5-8:
        # Pillow decodes these few files, into the 8-bit picture OpenCV gives every other mode
        return np.ascontiguousarray(decode_rgb(image_path)[..., ::-1])
    if problem is None:
        pixels = cv2.imread(str(image_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        problem = "not a decodable image" if pixels is None else unreadable
    if problem is not None:
        raise ValueError(f"image {image_path}: {problem}")
    return upright(pixels, orientation)


def official_input(image_path: str | Path) -> np.ndarray:
    """`[3, 192, 192]` float32 in the official EmoLA recipe (BGR, whole image, /255)."""
    return official_array(read_bgr(image_path))


def official_array(bgr: np.ndarray) -> np.ndarray:
    # deferred: start-up time (cv2)
    import cv2

    pixels = cv2.resize(bgr, (INPUT_SIZE, INPUT_SIZE)).astype(np.float32) / 255.0
    return pixels.transpose(2, 0, 1)


def official_features(session, image_paths: list[str | Path]) -> np.ndarray:
    """`[len(image_paths), 212]` prior features, one batched session call."""
    return run_session(session, np.stack([official_input(p) for p in image_paths]))


def graph_normalisation(onnx_path: str | Path) -> tuple[float, float]:
    """`(mean, std)` as insightface's `Landmark` decides it: a graph whose first nodes subtract and
    multiply (names `Sub*`/`_minus*` and `Mul*`/`_mul*`, or a leading `bn_data`) normalises
    inside and gets 0/1; any other gets 127.5/128."""
    # deferred: start-up time (onnx)
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node[:8]
    names = [node.name for node in nodes]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names) or "bn_data" in names[:3]
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names) or "bn_data" in names[:3]
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 128.0)


@dataclasses.dataclass(frozen=True)
class InsightfaceInput:
    blob: np.ndarray  # [3, 192, 192] float32, RGB, normalised
    inverse: np.ndarray  # [2, 3] float64: crop pixels -> image pixels


def insightface_array(bgr: np.ndarray, mean: float, std: float, bbox=None) -> InsightfaceInput:
    """The crop `Landmark.get` feeds the graph, for `bbox = (x1, y1, x2, y2)` (default: the
    whole image)."""
    # deferred: start-up time (cv2)
    import cv2

    height, width = bgr.shape[:2]
    # float32 throughout, as insightface computes it from a detector's float32 box
    box = np.asarray((0, 0, width, height) if bbox is None else bbox, dtype=np.float32)
    x1, y1, x2, y2 = box
    scale = np.float32(INPUT_SIZE) / (max(x2 - x1, y2 - y1) * np.float32(1.5))
    centre_x, centre_y = (x2 + x1) / np.float32(2) * scale, (y2 + y1) / np.float32(2) * scale
    half = INPUT_SIZE / 2
    # skimage's similarity chain (scale, -centre, rotation 0, +half) collapses to this matrix exactly
    centre_x, centre_y = np.float64(centre_x), np.float64(centre_y)  # the chain itself runs in float64
    matrix = np.array([[scale, 0.0, half - centre_x], [0.0, scale, half - centre_y]], dtype=np.float64)
    crop = cv2.warpAffine(bgr, matrix, (INPUT_SIZE, INPUT_SIZE), borderValue=0.0)
    blob = (crop[..., ::-1].astype(np.float32) - np.float32(mean)) * np.float32(1.0 / std)
    return InsightfaceInput(np.ascontiguousarray(blob.transpose(2, 0, 1)), cv2.invertAffineTransform(matrix))


def insightface_points(output: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Raw `[212]` output -> 106 (x, y) image pixels, flattened, as `Landmark.get` maps them."""
    points = output.astype(np.float32).reshape(-1, 2)
    points = (points + np.float32(1)) * np.float32(INPUT_SIZE // 2)
    mapped = points.astype(np.float64) @ inverse[:, :2].T + inverse[:, 2]
    return mapped.astype(np.float32).reshape(-1)
