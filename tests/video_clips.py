"""Face videos composed from real photographs that installed packages ship (no package ships a face
video): insightface's `Tom_Hanks_54745.png` and `t1.jpg`, scikit-image's astronaut. Each scene moves
and zooms one photo across the frame and, around one known frame, stretches it vertically (the face
changes shape there: what the peak rule must find); scenes are joined by hard cuts."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (480, 360)  # width, height: even, as yuv420p needs


def insightface_photo(name: str) -> np.ndarray:
    folder = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations)))
    return np.asarray(Image.open(folder / "data" / "images" / name).convert("RGB"))


def photos() -> dict[str, np.ndarray]:
    """The photographs the scenes are cut from, each cropped around its faces."""
    from skimage import data

    return {"hanks": insightface_photo("Tom_Hanks_54745.png"),
            "astronaut": data.astronaut()[20:260, 110:330],  # her face; the mission patch left out
            "pair": insightface_photo("t1.jpg")[275:560, 0:640]}  # two faces of the group, none behind them


@dataclasses.dataclass(frozen=True)
class Scene:
    photo: str
    frames: int
    scale: tuple[float, float]  # the photo's zoom at the scene's first and last frame
    centre: tuple[tuple[float, float], tuple[float, float]]  # its centre (x, y) at the first and last frame
    peak: int | None = None  # the frame (within the scene) stretched most
    stretch: float = 0.35  # the vertical stretch there: height x (1 + stretch)
    faces: int = 1


SCENES = (
    Scene("hanks", 36, (2.0, 2.4), ((170, 170), (300, 190)), peak=22),
    Scene("astronaut", 36, (1.1, 1.0), ((300, 180), (200, 170)), peak=20),
    Scene("pair", 24, (0.62, 0.7), ((240, 170), (250, 190)), faces=2),
)


def stretch_at(scene: Scene, frame: int) -> float:
    """The vertical stretch of `scene`'s photo at one of its frames: a triangle 5 frames each side of
    the peak, 0 elsewhere."""
    if scene.peak is None:
        return 0.0
    return scene.stretch * max(0.0, 1 - abs(frame - scene.peak) / 5)


def render(scene: Scene, frame: int, photo: np.ndarray) -> np.ndarray:
    """One `[height, width, 3]` uint8 frame: the photo zoomed, moved and stretched on grey."""
    t = frame / max(1, scene.frames - 1)
    zoom = scene.scale[0] + t * (scene.scale[1] - scene.scale[0])
    (x0, y0), (x1, y1) = scene.centre
    cx, cy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    width = round(photo.shape[1] * zoom)
    height = round(photo.shape[0] * zoom * (1 + stretch_at(scene, frame)))
    pasted = Image.fromarray(photo).resize((width, height), Image.BICUBIC)
    canvas = Image.new("RGB", SIZE, (118, 118, 118))
    canvas.paste(pasted, (round(cx - width / 2), round(cy - height / 2)))
    return np.asarray(canvas)


def frames(scenes=SCENES):
    """Every frame of the composition in order, `(scene index, frame within the scene, rgb)`."""
    images = photos()
    for index, scene in enumerate(scenes):
        for frame in range(scene.frames):
            yield index, frame, render(scene, frame, images[scene.photo])


def write(path: Path, fps: int = 12, scenes=SCENES, codec: str = "libx264", audio: bool = False) -> list[int]:
    """The composition encoded at `path` (the container from its suffix) with PyAV; returns each
    scene's first frame."""
    import av

    starts, total = [], 0
    for scene in scenes:
        starts.append(total)
        total += scene.frames
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast", "g": str(fps)}
        if audio:
            container.add_stream("aac", rate=16000)  # declared, left empty
        for _, _, rgb in frames(scenes):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return starts
