"""EmoLA on ordinary photos: every face found, aligned as the training images were, described.

For each photo: faces detected and aligned (`data.faces`), each face's prior feature computed
from its aligned crop with the model's recipe, the emotion and the AU question answered about
the crop, and what the official scoring rules read from the answers (the emotion class, the AU
list). Written to `out`:

    <photo>.png        the photo, each face boxed and labelled with its emotion and AUs
    faces/<photo>-<i>.png  each aligned crop, as the model saw it
    faces/<photo>-<i>.<prior>.npy  its feature of each of the model's priors (what
                       `run.py generate --image CROP --prior-npy ...` takes back)
    results.jsonl      one line per face (photo, box, score, emotion, AUs, both answers, seconds);
                       a photo with no face, or skipped (unreadable, over Pillow's size limit, a
                       face whose prior feature is not finite): one line saying so
    index.html         each photo with its faces and answers
    <video>/           each video: faces tracked through its frames, asked at keyframes (`video`)

Photos are decoded, and their faces found and aligned, ahead in threads; faces from several
photos share a batch through the model (padded to `batch_size` rows, or to the faces there are
when fewer: one compile per prompt). `results.jsonl` and `index.html` are written once every
photo is done, each file atomically: a run stopped early leaves no results that look complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import html
import io
import itertools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from emola_jax.apps.annotate import QUESTIONS, draw_faces, emotion_shown, label_text, reading, save_png
from emola_jax.apps.video import LIVE_SCHEMES, VideoReader, VideoSettings, analyze_video, is_live, is_video
from emola_jax.atomic import atomic_file, check_apart, write_text
from emola_jax.checkpoint import StagedDirectory
from emola_jax.data.faces import CHIP_PADDING, CHIP_SIZE, Face, FaceFinder
from emola_jax.data.image import decode_rgb
from emola_jax.predictor import ImageInputs, Predictor
from emola_jax.progress import bar as progress_bar


@dataclasses.dataclass
class Photo:
    """One photo's progress: its pixels, faces, and the seconds each step took."""

    path: Path
    name: str  # the stem its outputs are written under, unique within the run
    rgb: np.ndarray | None = None
    error: str | None = None
    faces: list[Face] = dataclasses.field(default_factory=list)
    features: np.ndarray | None = None  # [faces, prior_dim], None for a model without a prior token
    answers: list[dict] = dataclasses.field(default_factory=list)
    seconds: dict = dataclasses.field(default_factory=dict)
    waiting: int = 0  # faces not yet answered


def analyze(inputs: Sequence[str | Path], checkpoint: str | Path, out: str | Path, *,
            onnx: str | Path | None = None, detector: str = "hog", upsample: int = 1, min_score: float = 0.0,
            max_faces: int | None = None, chip_size: int = CHIP_SIZE, chip_padding: float = CHIP_PADDING,
            batch_size: int = 8, threads: int = 4, generation=None, dtype: str = "float32",
            progress: bool = True, overwrite: bool = False, fit_context: bool = False,
            video: VideoSettings | None = None) -> dict:
    """Analyses the photos and videos in `inputs` (a video: what `video.is_video` says is one) with
    the model at `checkpoint`, writing `out` (see the module; each video into `out/<video>/`, as
    `video.analyze_video` writes it, with `video`'s settings) whole: it is built in a hidden sibling
    and renamed into place when every photo and video is done, so that it
    never mixes two runs, nor looks complete after a kill (a non-empty `out` needs `overwrite`,
    and is replaced only then). `fit_context`: as `Predictor`'s.

    `onnx`: the 2d106det landmark graph, for a model with that prior (each of the model's priors
    is computed on each aligned crop: 2d106det with the official recipe, the dlib priors with
    dlib). Returns a summary: photos, faces, photos without a face, skipped photos, the rows the
    model's batches were padded to (`batch_rows`), seconds per stage, and `videos`: each video's
    summary. Raises ValueError for settings out of range, `out` overlapping an input, or a video that
    cannot be opened or has no video stream; a photo that cannot be read, or whose face gives no
    finite prior feature, is reported and skipped."""
    if batch_size < 1 or threads < 1:
        raise ValueError(f"batch size and threads must be at least 1, not {batch_size} and {threads}")
    if not inputs:
        raise ValueError("give at least one photo or video")
    video = video or VideoSettings()
    videos = [source for source in inputs if is_video(source)]
    photos = [source for source in inputs if not is_video(source)]
    check_apart("--out", out, {"input": [p for p in inputs if not str(p).startswith(LIVE_SCHEMES)],
                               "--ckpt": checkpoint, "--onnx": onnx})
    staged = StagedDirectory(out, overwrite=overwrite)  # a non-empty `out` is refused here, before any work
    for source in videos:  # a file that is no video is named before the model loads
        if not is_live(source):
            VideoReader(source).close()
    finder = FaceFinder(detector, upsample=upsample, chip_size=chip_size, chip_padding=chip_padding,
                        max_faces=max_faces)
    predictor = Predictor(checkpoint, dtype=dtype, generation=generation, fit_context=fit_context)
    for question in QUESTIONS.values():
        predictor.check_room(question)  # before any photo is read
    prior = ImageInputs(predictor.config, onnx)
    if videos:
        video.check_model(prior)
    # a video's folder takes no name a photo's output or the run's own files have
    taken = {"faces", "results.jsonl", "index.html", *(f"{n}.png" for n in _unique_names([Path(p) for p in photos]))}
    with staged:
        summary = {"photos": 0, "faces": 0, "without_face": 0, "skipped": 0, "batch_rows": 0, "seconds": {}}
        if photos:
            summary = _analyze_into(staged.staging, photos, predictor, finder, prior, min_score=min_score,
                                    batch_size=batch_size, threads=threads, progress=progress)
        summary["videos"] = [
            analyze_video(source, staged.staging / name, predictor, finder, prior, settings=video,
                          min_score=min_score, batch_size=batch_size, threads=threads, progress=progress)
            for source, name in zip(videos, _unique_names([Path(str(v)) for v in videos], taken=taken), strict=True)]
        summary["out"] = str(staged.publish())
    for clip in summary["videos"]:  # where each video's folder is now
        clip["out"] = str(Path(summary["out"]) / Path(clip["out"]).name)
    return summary


def _analyze_into(out: Path, photos, predictor: Predictor, finder: FaceFinder, prior: ImageInputs, *,
                  min_score: float, batch_size: int, threads: int, progress: bool) -> dict:
    """`analyze`'s work, written into the folder `out`; returns the summary."""
    (out / "faces").mkdir()

    stage = collections.Counter()
    queue: list[tuple[Photo, int, np.ndarray, np.ndarray | None]] = []
    done: list[Photo] = []
    queued = rows = 0  # faces queued so far; rows of the batches the model ran

    def answer(batch):
        nonlocal rows
        start = time.perf_counter()
        pixels = np.stack([b[2] for b in batch])
        features = None if batch[0][3] is None else np.stack([b[3] for b in batch])
        rows = max(rows, min(batch_size, queued))  # never padded past the faces there are
        replies = dict(zip(QUESTIONS, predictor.answer_questions(list(QUESTIONS.values()), pixels, features,
                                                                 rows=rows), strict=True))
        per_face = (time.perf_counter() - start) / len(batch)
        stage["answer"] += time.perf_counter() - start
        for row, (photo, index, _, _) in enumerate(batch):
            photo.answers[index] = reading(replies["emotion"][row], replies["au"][row], per_face)
            photo.waiting -= 1
            if photo.waiting == 0:  # drawn and saved on the writer thread, beside the next detections
                writes.append(writer.submit(_write_photo, out, photo, prior.priors))

    bar, began = _progress(len(photos), progress), time.perf_counter()
    writer, writes = concurrent.futures.ThreadPoolExecutor(1), []
    for photo in _faces_found(photos, threads, finder, min_score):
        bar.update(1)
        done.append(photo)
        stage.update(photo.seconds)
        if photo.error is None and photo.faces:
            start = time.perf_counter()
            try:
                names = [f"face {n} of {photo.path}" for n in range(1, len(photo.faces) + 1)]
                features = photo.features = prior.features([f.chip for f in photo.faces], names)
            except ValueError as err:  # a face no prior feature could be computed for: the photo is skipped
                photo.error, photo.faces, photo.rgb = str(err), [], None
            photo.seconds["prior"] = time.perf_counter() - start
            stage["prior"] += photo.seconds["prior"]
        if photo.error is not None:
            print(f"skipped {photo.path}: {photo.error}", file=sys.stderr)
            continue
        if not photo.faces:
            print(f"{photo.path}: no face found")
            continue
        start = time.perf_counter()
        pixels = prior.pixels([f.chip for f in photo.faces])
        stage["clip"] += time.perf_counter() - start
        photo.answers, photo.waiting = [{} for _ in photo.faces], len(photo.faces)
        for index in range(len(photo.faces)):
            queue.append((photo, index, pixels[index], None if features is None else features[index]))
        queued += len(photo.faces)
        while len(queue) >= batch_size:
            answer(queue[:batch_size])
            del queue[:batch_size]
    if queue:
        answer(queue)
    with writer:
        stage["write"] = sum(write.result() for write in writes)  # a failed write raises here
    bar.close()
    _write_results(out, done, prior.priors)
    stage["total"] = time.perf_counter() - began
    faces = sum(len(p.faces) for p in done)
    return {"photos": len(done), "faces": faces, "without_face": sum(p.error is None and not p.faces for p in done),
            "skipped": sum(p.error is not None for p in done), "batch_rows": rows,
            "seconds": {k: round(v, 3) for k, v in stage.items()}}


def _faces_found(paths: Sequence[str | Path], threads: int, finder: FaceFinder, min_score: float
                 ) -> Iterator[Photo]:
    """Photos in order, each decoded, its faces detected and aligned, `2 * threads` photos ahead
    in a thread pool (PIL's decoder and dlib release the GIL: the threads use every core)."""
    names = _unique_names([Path(p) for p in paths])

    def find(item):
        path, name = item
        photo = Photo(Path(path), name)
        start = time.perf_counter()
        try:
            photo.rgb = decode_rgb(path)
        except ValueError as err:
            photo.error = str(err)
        photo.seconds["decode"] = (now := time.perf_counter()) - start
        if photo.rgb is not None:
            detections = [d for d in finder.detect(photo.rgb) if d.score >= min_score]
            photo.seconds["detect"] = (start := time.perf_counter()) - now
            photo.faces = [finder.align(photo.rgb, d) for d in detections]
            photo.seconds["align"] = time.perf_counter() - start
            if not photo.faces:
                photo.rgb = None
        return photo

    items = zip(paths, names, strict=True)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        ahead = collections.deque(pool.submit(find, item) for item in itertools.islice(items, 2 * threads))
        while ahead:
            photo = ahead.popleft().result()
            ahead.extend(pool.submit(find, item) for item in itertools.islice(items, 1))
            yield photo


def _unique_names(paths: list[Path], taken: set[str] = frozenset()) -> list[str]:
    """Each input's output stem: its file's stem, or the first of `-2`, `-3`... after it that no
    earlier input has, nor `taken` holds (`p1/a.jpg`, `p2/a.png`, `p3/a-2.png`: `a`, `a-2`, `a-2-2`)."""
    used: set[str] = set(taken)
    names = []
    for path in paths:
        name, n = path.stem, 1
        while name in used:
            n += 1
            name = f"{path.stem}-{n}"
        used.add(name)
        names.append(name)
    return names


def _write_photo(out: Path, photo: Photo, priors) -> float:
    """The labelled photo, each face's crop and its prior features (each file written atomically);
    frees the pixels. Returns the seconds it took."""
    start = time.perf_counter()
    canvas = Image.fromarray(photo.rgb)
    draw_faces(canvas, [face.detection.box for face in photo.faces],
               [f"{number}: {label_text(answer)}" for number, answer in enumerate(photo.answers, 1)])
    for number, face in enumerate(photo.faces, 1):
        save_png(Image.fromarray(face.chip), out / "faces" / f"{photo.name}-{number}.png")
        if photo.features is not None:
            for prior, feature in zip(priors, _split(photo.features[number - 1], priors), strict=True):
                _save_npy(feature, out / _prior_file(photo.name, number, prior.name))
    save_png(canvas, out / f"{photo.name}.png")
    photo.rgb = None
    return time.perf_counter() - start


def _split(feature: np.ndarray, priors) -> list[np.ndarray]:
    """A concatenated feature as one array per prior."""
    return np.split(feature, np.cumsum([p.dim for p in priors])[:-1])


def _prior_file(name: str, number: int, prior: str) -> str:
    return f"faces/{name}-{number}.{prior}.npy"


def _save_npy(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_file(path) as staging:
        staging.write_bytes(buffer.getvalue())


def _lines(photo: Photo, priors) -> list[dict]:
    if photo.error is not None:
        return [{"photo": str(photo.path), "error": photo.error}]
    if not photo.faces:
        return [{"photo": str(photo.path), "faces": 0, "seconds": _rounded(photo.seconds)}]
    return [{"photo": str(photo.path), "face": number, "box": list(face.detection.box),
             "score": round(face.detection.score, 4), "image": f"{photo.name}.png",
             "crop": f"faces/{photo.name}-{number}.png",
             "priors": {p.name: _prior_file(photo.name, number, p.name) for p in priors},
             **answer, "seconds": _rounded(photo.seconds)}
            for number, (face, answer) in enumerate(zip(photo.faces, photo.answers, strict=True), 1)]


def _rounded(seconds: dict) -> dict:
    return {k: round(v, 4) for k, v in seconds.items()}


def _write_results(out: Path, photos: list[Photo], priors) -> None:
    lines = [line for photo in photos for line in _lines(photo, priors)]
    write_text(out / "results.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    write_text(out / "index.html", _index(photos))


def _index(photos: list[Photo]) -> str:
    esc = html.escape
    parts = ["<!doctype html>", '<meta charset="utf-8">', "<title>emola-jax: faces</title>",
             "<style>body{font-family:sans-serif;margin:2em}img.photo{max-width:100%;max-height:80vh}"
             "td{vertical-align:top;padding:.4em}td.text{max-width:40em}</style>"]
    for photo in photos:
        parts.append(f"<h2>{esc(str(photo.path))}</h2>")
        if photo.error is not None:
            parts.append(f"<p>skipped: {esc(photo.error)}</p>")
            continue
        if not photo.faces:
            parts.append("<p>no face found</p>")
            continue
        parts.append(f'<img class="photo" src="{esc(photo.name)}.png" alt="{esc(photo.name)}">')
        parts.append("<table><tr><th>face</th><th>emotion</th><th>AUs</th><th>answers</th></tr>")
        for number, answer in enumerate(photo.answers, 1):
            crop = f"faces/{photo.name}-{number}.png"
            parts.append(
                f'<tr><td>{number}<br><img src="{esc(crop)}" width="112"></td><td>{esc(emotion_shown(answer))}'
                f'</td><td>{esc(" ".join(answer["aus"]) or "-")}</td><td class="text"><b>emotion:</b> '
                f'{esc(answer["emotion_answer"])}<br><b>AUs:</b> {esc(answer["au_answer"])}</td></tr>')
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def _progress(total: int, enabled: bool):
    return progress_bar(total=total, unit="photo", enabled=enabled)
