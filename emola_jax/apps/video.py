"""EmoLA on video (`run.py analyze VIDEO`): every face tracked through every frame, its prior feature
computed on every frame, and the model asked, per track, at the frames that matter.

EmoLA is an image model. Here the cheap parts run on every frame (detection, tracking, dlib's
alignment, the prior's landmarks) and the MLLM only at each track's keyframes, batched across
tracks and frames through the same `Predictor` as photo analysis and evaluation.

Tracking. Faces are detected every `detect_every` frames (the photo analysis' detector) and, in
between, followed by dlib's correlation tracker. Detections are matched to the live tracks by box
overlap (IoU >= `MATCH_IOU`, Hungarian assignment); an unmatched detection starts a new track; a
track unseen for `patience` seconds ends. A cut (the mean absolute difference of two consecutive
32 x 32 grey thumbnails above `CUT_THRESHOLD` of 255) ends every track, so that a different person
framed in the same place after a cut gets a new id.

Keyframes, per track (`keyframes`: "every", "peaks" or "both"):
- every `every` seconds: the track's first frame, then the first frame at least `every` seconds
  after the previous such keyframe;
- peak frames: a frame's displacement is the root mean square difference between its prior feature
  (computed on the aligned face, so that head position, size and roll are taken out) and the track's
  neutral shape, the element-wise median of its features over the `NEUTRAL_SECONDS` before the
  frame and `peak_window` after it. A frame is a peak when its displacement is the largest within
  `peak_window` seconds on either side (the first of equals) and at least `peak_ratio` times the
  median displacement of the track's `NEUTRAL_SECONDS` before it (a face held still moves by the
  detector's and the resampling's noise alone, well under that).
A frame that is both is asked once. Deciding a peak needs `2 * peak_window` seconds of look-ahead:
only that much of each track's aligned crops is held.

Streaming. Frames are decoded one by one (a few ahead, for the detector's threads), so a long video
never sits in memory; what a track keeps is a few numbers per frame. The rows are written as they
come; once every keyframe is answered, a second pass fills in each row's latest answer and draws the
annotated video from a second decoding of the source (a live source is recorded to `source.ts`
while it is read, for that pass).

Written to `OUT/<video>/`:

    frames.csv        one row per frame and face, after OpenFace's FeatureExtraction CSV (frames
                      counted from 0, `success` before `confidence`):
                      frame, face_id (the track), timestamp (seconds), success (1: detected on this
                      frame, 0: followed by the tracker), confidence (the detector's score, on a tracked
                      frame its last detection's), x1, y1, x2, y2 (the box, frame pixels, dlib's inclusive
                      corners), then the prior feature the model would take for the face
                      (`<prior>_x_<i>`, `<prior>_y_<i>` for landmark priors: 2d106det's raw outputs in the
                      aligned crop's [-1, 1] frame, dlib68's points relative to the crop's face box;
                      `<prior>_<i>` for the face descriptor), displacement (as above), then the track's
                      latest answer at or before the frame: answer_frame, emotion, emotion_named, and
                      AU01_c ... AU43_c (1 where the AU answer names it, FABA-Bench's AUs)
    tracks.jsonl      one line per track: track (its id), first_frame, last_frame, start and end
                      (seconds), frames, keyframes (frame, time,
                      why chosen, displacement, both answers and what the official rules read from them),
                      the emotions and AU lists over the keyframes and the most frequent emotion
    annotated.mp4     every frame with each face's box, track id and latest reading (H.264)
    timeline-<id>.png per track: the emotion at each keyframe over time, an AU raster, and the
                      displacement with the peaks marked
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from emola_jax.apps.annotate import QUESTIONS, draw_faces, label_text, reading
from emola_jax.atomic import atomic_file, write_text
from emola_jax.data import labels
from emola_jax.data.faces import Detection, FaceFinder
from emola_jax.predictor import ImageInputs, Predictor
from emola_jax.progress import bar as progress_bar
from emola_jax.progress import say
from emola_jax.settings import KeyframeRule, check_choice

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"})
LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://", "srt://", "http://", "https://")
MATCH_IOU = 0.3
CUT_THRESHOLD = 20.0
NEUTRAL_SECONDS = 10.0
LANDMARK_PRIORS = ("2d106det", "dlib68")  # priors whose feature is landmark points
TIME_TOLERANCE = 1e-4  # seconds: two stamps this close are the same instant (stamps are rounded fractions)


def is_video(source: str | Path) -> bool:
    """Whether `run.py analyze` reads `source` as a video: a video file suffix, a live URL, a camera
    device, or a pipe."""
    text = str(source)
    return text.startswith("/dev/video") or Path(text).suffix.lower() in VIDEO_SUFFIXES or is_live(text)


def is_live(source: str | Path) -> bool:
    """A source read as it arrives (a URL, a device, a pipe): it cannot be read twice."""
    text = str(source)
    if text.startswith(LIVE_SCHEMES):
        return True
    try:
        mode = os.stat(text).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """How a video is read: see the module for each rule."""

    every: float = 2.0  # seconds between regular keyframes of a track
    keyframes: KeyframeRule = "both"
    peak_window: float = 1.0  # seconds either side within which a peak is the largest
    peak_ratio: float = 3.0  # a peak's displacement over the track's median displacement
    detect_every: int = 1  # frames; the correlation tracker follows the faces in between
    patience: float = 0.5  # seconds a track survives without a matching detection

    def __post_init__(self):
        check_choice(self.keyframes, KeyframeRule, "keyframes")
        if self.every <= 0 or self.peak_window <= 0 or self.peak_ratio <= 0 or self.patience < 0:
            raise ValueError(f"--every, --peak-window and --peak-ratio must be positive and the patience at least 0, "
                             f"not {self.every}, {self.peak_window}, {self.peak_ratio}, {self.patience}")
        if self.detect_every < 1:
            raise ValueError(f"--detect-every must be at least 1 frame, not {self.detect_every}")

    def check_model(self, inputs: ImageInputs) -> None:
        """ValueError where these settings need what the model lacks: peaks are found from the prior."""
        if self.keyframes != "every" and not any(p.name in LANDMARK_PRIORS for p in inputs.priors):
            raise ValueError("peak keyframes are found from the face's landmarks, and this model has no landmark "
                             f"prior ({', '.join(LANDMARK_PRIORS)}): use --keyframes every")


# ---------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Frame:
    index: int  # from 0, in decoding order
    time: float  # seconds from the stream's first frame
    rgb: np.ndarray  # [height, width, 3] uint8


@contextlib.contextmanager
def _interrupt_ends(reader: VideoReader):
    """While inside, SIGINT (Ctrl-C) ends `reader`'s frames at the next packet instead of the
    program: a camera or a stream has no end of its own. Outside the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        reader.interrupted = True

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _pyav():
    """PyAV, the video extra: imported only when a video is given."""
    try:
        # deferred: the video extra (PyAV), needed only when a video is given
        import av
    except ImportError as err:
        raise ImportError("reading videos needs PyAV: pip install -e '.[video]'") from err
    return av


class VideoReader:
    """The frames of one source, decoded as they are read (`frames()`); `record` copies the source's
    packets, unchanged, to an MPEG-TS file as they arrive (a live source's second pass reads it).
    `open` raises ValueError, in one sentence naming the source, for a source that cannot be opened
    or holds no video stream. A stream that breaks off (a truncated file, a decoding error) ends
    the frames there; `stopped` then says where, in one line."""

    def __init__(self, source: str | Path, *, record: Path | None = None):
        av = _pyav()
        self.source, self.record, self.stopped = str(source), record, None
        self.interrupted = False  # set (by a signal handler) to end a live source's reading
        options, fmt = {}, None
        if self.source.startswith(("rtsp://", "rtsps://")):
            options["rtsp_transport"] = "tcp"
        elif self.source.startswith("/dev/video"):
            fmt = "v4l2"
        try:
            self.container = av.open(self.source, format=fmt, options=options, timeout=30.0)
        except (av.FFmpegError, OSError) as err:
            raise ValueError(f"{self.source} cannot be opened as a video: {err}") from err
        if not self.container.streams.video:
            held = collections.Counter(s.type for s in self.container.streams)
            self.container.close()
            what = ", ".join(f"{n} {kind} stream{'s' * (n > 1)}" for kind, n in held.items()) or "no stream"
            raise ValueError(f"{self.source} has no video stream (it holds {what}): give a video")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.rate = Fraction(rate) if rate else Fraction(25)
        self.size = (self.stream.codec_context.width, self.stream.codec_context.height)
        duration = None
        if self.stream.duration is not None and self.stream.time_base is not None:
            duration = float(self.stream.duration * self.stream.time_base)
        elif self.container.duration:
            duration = self.container.duration / 1e6
        self.duration = duration  # seconds, as the header declares it (None for a live source)
        self.declared_frames = self.stream.frames or (round(duration * self.rate) if duration else None)

    def close(self) -> None:
        self.container.close()

    def frames(self) -> Iterator[Frame]:
        """The frames in order, each with a time that never goes back (a stamp that does, or is
        missing, is taken as one frame after the previous one)."""
        av = _pyav()
        recorder = out = None
        if self.record is not None:
            recorder = av.open(str(self.record), "w", format="mpegts")
            out = recorder.add_stream_from_template(self.stream)
        index, first, now, step = 0, None, -1.0, 1 / float(self.rate)
        last_dts, shift = None, 0
        try:
            for packet in self.container.demux(self.stream):
                if self.interrupted:  # the frames the decoder still holds, as the end of a file gives them
                    decoded = self.stream.codec_context.decode(None)
                else:
                    decoded = packet.decode()
                if recorder is not None and packet.size and not self.interrupted:  # not the flushing packet
                    packet.stream = out
                    if packet.dts is not None:  # a stream that restarts its clock is recorded with one that runs on
                        if last_dts is not None and packet.dts + shift <= last_dts:
                            shift = last_dts + 1 - packet.dts
                        packet.dts += shift
                        packet.pts = None if packet.pts is None else packet.pts + shift
                        last_dts = packet.dts
                    try:
                        recorder.mux(packet)
                    except av.FFmpegError as err:
                        raise ValueError(f"{self.source}: its packets cannot be recorded for the annotated video's "
                                         f"second pass ({err}); give it in a container (Matroska, MPEG-TS), not as a "
                                         "raw stream") from err
                for frame in decoded:
                    stamp = frame.time
                    if stamp is not None and first is None:
                        first = stamp
                    stamp = now + step if stamp is None or stamp - first <= now else stamp - first
                    now = stamp
                    yield Frame(index, now, frame.to_ndarray(format="rgb24"))
                    index += 1
                if self.interrupted:
                    self.stopped = f"{self.source}: reading ended by an interrupt after {index} frames"
                    break
        except av.FFmpegError as err:
            self.stopped = f"{self.source}: stopped at frame {index} ({max(now, 0):.2f} s): {err}"
        finally:
            try:
                if recorder is not None:
                    recorder.close()
            finally:
                self.container.close()
        cut_short = self.declared_frames and index < self.declared_frames - 1 and not is_live(self.source)
        if self.stopped is None and cut_short:
            self.stopped = (f"{self.source}: stopped at frame {index} ({max(now, 0):.2f} s) of the "
                            f"{self.declared_frames} its header declares: the file is cut short")


# --------------------------------------------------------------------------------------------- tracking


def iou(a: tuple, b: tuple) -> float:
    """Intersection over union of two inclusive-corner boxes `(left, top, right, bottom)`."""
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """`[32, 32]` float32 grey, what the cut test compares."""
    return np.asarray(Image.fromarray(rgb).convert("L").resize((32, 32), Image.BOX), np.float32)


@dataclasses.dataclass
class Track:
    """One face followed through the frames."""

    id: int
    box: tuple[int, int, int, int]
    score: float
    first_frame: int
    first_time: float
    last_frame: int = -1
    last_time: float = 0.0
    seen_time: float = 0.0  # when a detection last matched it
    frames: int = 0
    follower: object = None  # dlib's correlation tracker, between detections
    keys: Keyframes | None = None
    keyframes: list[dict] = dataclasses.field(default_factory=list)


class Tracker:
    """Detections matched to tracks, frame by frame (the rules: see the module)."""

    def __init__(self, settings: VideoSettings):
        # deferred: the faces extra
        import dlib

        self.settings, self._dlib = settings, dlib
        self.live: list[Track] = []
        self.next_id = 1
        self.previous: np.ndarray | None = None

    def cut(self, rgb: np.ndarray) -> bool:
        small = thumbnail(rgb)
        cut = self.previous is not None and float(np.abs(small - self.previous).mean()) > CUT_THRESHOLD
        self.previous = small
        return cut

    def step(self, frame: Frame, detections: list[Detection] | None, cut: bool
             ) -> tuple[list[tuple[Track, Detection, bool]], list[Track]]:
        """This frame's faces `(track, box and score, detected)`, and the tracks that ended before it.
        `detections`: the detector's on this frame, or None on a frame it skips."""
        ended = []
        if cut:
            ended, self.live = self.live, []
        if detections is None:
            seen = []
            for track in self.live:
                if track.follower is None:  # missed at the last detection: waits for the next one
                    continue
                track.follower.update(frame.rgb)
                position = track.follower.get_position()
                track.box = (round(position.left()), round(position.top()), round(position.right()),
                             round(position.bottom()))
                seen.append((track, Detection(track.box, track.score), False))
            return seen, ended
        pairs = self._match(detections)
        matched_tracks = {id(t) for t, _ in pairs}
        for track in [t for t in self.live if id(t) not in matched_tracks]:
            track.follower = None
            if frame.time - track.seen_time > self.settings.patience:
                ended.append(track)
                self.live.remove(track)
        matched = {id(d) for _, d in pairs}
        for detection in detections:
            if id(detection) not in matched:
                track = Track(self.next_id, detection.box, detection.score, frame.index, frame.time)
                self.next_id += 1
                self.live.append(track)
                pairs.append((track, detection))
        seen = []
        for track, detection in pairs:
            track.box, track.score, track.seen_time = detection.box, detection.score, frame.time
            if self.settings.detect_every > 1:
                track.follower = self._dlib.correlation_tracker()
                track.follower.start_track(frame.rgb, self._dlib.rectangle(*detection.box))
            seen.append((track, detection, True))
        seen.sort(key=lambda item: item[0].id)
        return seen, ended

    def _match(self, detections: list[Detection]) -> list[tuple[Track, Detection]]:
        if not self.live or not detections:
            return []
        # deferred: start-up time (scipy), for runs without a video
        from scipy.optimize import linear_sum_assignment

        overlap = np.array([[iou(t.box, d.box) for d in detections] for t in self.live])
        rows, cols = linear_sum_assignment(-overlap)
        return [(self.live[r], detections[c]) for r, c in zip(rows, cols, strict=True) if overlap[r, c] >= MATCH_IOU]


# -------------------------------------------------------------------------------------------- keyframes


@dataclasses.dataclass
class Moment:
    """One tracked frame of a face, held while its keyframe decision waits for the look-ahead."""

    frame: int
    time: float
    feature: np.ndarray  # the prior feature, as the model takes it
    chip: np.ndarray | None
    shape: np.ndarray  # the landmark priors' part of it: what the displacement is measured on
    displacement: float | None = None
    every: bool = False
    reasons: list[str] = dataclasses.field(default_factory=list)


class Keyframes:
    """One track's keyframe rule (see the module), fed frame by frame: `add` and `finish` return the
    moments decided as keyframes, each with `.reasons`."""

    def __init__(self, settings: VideoSettings):
        self.settings = settings
        self.history: collections.deque[Moment] = collections.deque()  # NEUTRAL_SECONDS back, look-ahead forward
        self.last_every: float | None = None
        self.measured = 0  # moments in `history` whose displacement is known
        self.decided = 0  # moments in `history` decided
        self.curve: list[tuple[float, float, float]] = []  # (time, displacement, peak threshold) per moment

    def add(self, moment: Moment) -> list[Moment]:
        settings = self.settings
        if settings.keyframes != "peaks" and (self.last_every is None
                                              or moment.time >= self.last_every + settings.every - 1e-6):
            moment.every, self.last_every = True, moment.time
        self.history.append(moment)
        # a moment is measured once a later one lies past its window, and decided once the moments of
        # its window are measured (strict, with TIME_TOLERANCE on every bound: stamps are floats)
        self._measure(moment.time - settings.peak_window - TIME_TOLERANCE)
        return self._decide(moment.time - 2 * (settings.peak_window + TIME_TOLERANCE))

    def finish(self) -> list[Moment]:
        self._measure(math.inf)
        return self._decide(math.inf)

    def _measure(self, until: float) -> None:
        """Displacements of the moments before `until` (each needs `peak_window` seconds after it)."""
        items = list(self.history)
        reach = self.settings.peak_window + TIME_TOLERANCE
        while self.measured < len(items) and items[self.measured].time < until:
            moment = items[self.measured]
            moment.displacement = 0.0  # a model without landmark priors: no displacement
            if moment.shape.size:
                around = np.stack([m.shape for m in items if moment.time - NEUTRAL_SECONDS <= m.time
                                   <= moment.time + reach])
                neutral = np.median(around, axis=0)
                moment.displacement = float(np.sqrt(np.mean((moment.shape - neutral) ** 2)))
            self.measured += 1

    def _decide(self, until: float) -> list[Moment]:
        """Keyframes among the moments before `until` (each needs `peak_window` of measured moments after it)."""
        window, chosen = self.settings.peak_window + TIME_TOLERANCE, []
        items = list(self.history)
        while self.decided < self.measured and items[self.decided].time < until:
            moment = items[self.decided]
            before = [m.displacement for m in items[:self.decided] if moment.time - window <= m.time]
            after = [m.displacement for m in items[self.decided + 1:self.measured] if m.time <= moment.time + window]
            recent = [m.displacement for m in items[:self.decided + 1] if moment.time - NEUTRAL_SECONDS <= m.time]
            floor = self.settings.peak_ratio * float(np.median(recent))
            peak = (self.settings.keyframes != "every" and moment.displacement > 0 and moment.displacement >= floor
                    and all(moment.displacement > d for d in before) and all(moment.displacement >= d for d in after))
            moment.reasons = ["every"] * moment.every + ["peak"] * peak
            self.curve.append((moment.time, moment.displacement, floor))
            if moment.reasons:
                chosen.append(moment)
            else:
                moment.chip = None  # only keyframes keep their crop
            self.decided += 1
        while self.history and self.decided and self.history[0].time < self.history[self.decided - 1].time - max(
                NEUTRAL_SECONDS, 2 * window):
            self.history.popleft()
            self.decided -= 1
            self.measured -= 1
        return chosen


# -------------------------------------------------------------------------------------------- the run


class Asker:
    """Keyframes answered in batches of `batch_size` rows (the last batch padded to the same rows:
    one compile), both questions at once (`Predictor.answer_questions`)."""

    def __init__(self, predictor: Predictor, inputs: ImageInputs, batch_size: int):
        self.predictor, self.inputs, self.batch_size = predictor, inputs, batch_size
        self.pending: list[tuple[Track, Moment]] = []
        self.seconds = 0.0

    def add(self, track: Track, moment: Moment) -> None:
        self.pending.append((track, moment))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        start = time.perf_counter()
        batch, self.pending = self.pending, []
        pixels = self.inputs.pixels([m.chip for _, m in batch])
        features = None if not self.predictor.uses_prior else np.stack([m.feature for _, m in batch])
        replies = self.predictor.answer_questions(list(QUESTIONS.values()), pixels, features, rows=self.batch_size)
        per_face = (time.perf_counter() - start) / len(batch)
        for row, (track, moment) in enumerate(batch):
            answer = reading(replies[0][row], replies[1][row], per_face)
            track.keyframes.append({"frame": moment.frame, "time": round(moment.time, 4), "reasons": moment.reasons,
                                    "displacement": round(moment.displacement, 6), **answer})
            moment.chip = None
        self.seconds += time.perf_counter() - start


def analyze_video(source: str | Path, out: Path, predictor: Predictor, finder: FaceFinder, inputs: ImageInputs, *,
                  settings: VideoSettings = VideoSettings(), min_score: float = 0.0, batch_size: int = 8,
                  threads: int = 4, progress: bool = True) -> dict:
    """Analyses one video into the folder `out` (created; see the module for what is written).
    Returns a summary: frames, faces (rows), tracks, keyframes, where the stream stopped early
    (`stopped`, or None), frames per second of reading + tracking + priors, seconds per stage.
    Raises ValueError for a source that cannot be opened or has no video stream."""
    settings.check_model(inputs)
    out.mkdir(parents=True)
    live = is_live(source)
    reader = VideoReader(source, record=out / "source.ts" if live else None)
    columns = _prior_columns(inputs)
    shape_columns = np.array([i for i, name in enumerate(columns) if name.split("_")[0] in LANDMARK_PRIORS], int)
    tracker, asker, tracks = Tracker(settings), Asker(predictor, inputs, batch_size), {}
    stage = collections.Counter()
    rows = frame_count = 0
    began = time.perf_counter()
    bar = progress_bar(total=reader.declared_frames, unit="frame", desc=Path(str(source)).name, enabled=progress)

    def found(frame: Frame, detect: bool) -> tuple[Frame, list[Detection] | None, float]:
        start = time.perf_counter()
        detections = [d for d in finder.detect(frame.rgb) if d.score >= min_score] if detect else None
        return frame, detections, time.perf_counter() - start

    def close(track: Track) -> None:
        if track.keys is None:  # ended before any frame of it had a prior feature
            return
        for moment in track.keys.finish():
            asker.add(track, moment)
        track.follower = None  # what an ended track keeps is its keyframes and its curve
        track.keys.history.clear()

    partial = out / "frames.partial.csv"
    with contextlib.ExitStack() as stack, open(partial, "w", newline="") as handle, \
            concurrent.futures.ThreadPoolExecutor(threads) as pool:
        if live:  # Ctrl-C ends a live source's reading; what was read is analysed and written
            stack.enter_context(_interrupt_ends(reader))
        writer = csv.writer(handle)
        writer.writerow(["frame", "face_id", "timestamp", "success", "confidence", "x1", "y1", "x2", "y2", *columns,
                         "displacement"])
        ahead: collections.deque = collections.deque()
        frames = stack.enter_context(contextlib.closing(reader.frames()))  # closed (the source too) on any exit
        pending_rows: list = []  # rows whose displacement is not measured yet

        def submit() -> bool:
            frame = next(frames, None)
            if frame is None:
                return False
            cut = tracker.cut(frame.rgb)
            ahead.append((pool.submit(found, frame, cut or frame.index % settings.detect_every == 0), cut))
            return True

        for _ in range(2 * threads):
            submit()
        while ahead:
            future, cut = ahead.popleft()
            frame, detections, seconds = future.result()
            frame_count += 1
            stage["detect"] += seconds
            submit()
            start = time.perf_counter()
            seen, ended = tracker.step(frame, detections, cut)
            for track in ended:
                close(track)
            stage["track"] += time.perf_counter() - start
            start = time.perf_counter()
            chips = [finder.align(frame.rgb, detection).chip for _, detection, _ in seen]
            stage["align"] += (now := time.perf_counter()) - start
            seen, chips, features = _with_priors(inputs, seen, chips, [f"{source}, frame {frame.index}, face {t.id}"
                                                                      for t, _, _ in seen])
            stage["prior"] += time.perf_counter() - now
            for number, (track, detection, detected) in enumerate(seen):
                if track.id not in tracks:  # its first frame with a prior feature
                    tracks[track.id], track.keys = track, Keyframes(settings)
                    track.first_frame, track.first_time = frame.index, frame.time
                track.last_frame, track.last_time, track.frames = frame.index, frame.time, track.frames + 1
                feature = features[number]
                moment = Moment(frame.index, frame.time, feature, chips[number], feature[shape_columns])
                for keyframe in track.keys.add(moment):
                    asker.add(track, keyframe)
                pending_rows.append((moment, [frame.index, track.id, round(frame.time, 4), int(detected),
                                              round(detection.score, 4), *detection.box,
                                              *(_values(feature))]))
            rows += len(seen)
            pending_rows = _write_measured(writer, pending_rows)
            bar.update(1)
        for track in tracker.live:
            close(track)
        _write_measured(writer, pending_rows, last=True)
    asker.flush()
    bar.close()
    if reader.stopped:
        say(reader.stopped)
    stage["answer"] = asker.seconds
    reading_seconds = time.perf_counter() - began - asker.seconds

    start = time.perf_counter()
    ordered = [tracks[k] for k in sorted(tracks)]
    for track in ordered:
        track.keyframes.sort(key=lambda k: k["frame"])
    second = out / "source.ts" if live else source
    _write_outputs(out, partial, ordered, second, frame_count, progress)
    stage["write"] = time.perf_counter() - start
    return {"video": str(source), "out": str(out), "frames": frame_count, "faces": rows, "tracks": len(tracks),
            "keyframes": sum(len(t.keyframes) for t in ordered), "stopped": reader.stopped,
            "frames_per_second": round(frame_count / max(reading_seconds, 1e-9), 2),
            "answers_per_second": round(sum(len(t.keyframes) for t in ordered) / max(asker.seconds, 1e-9), 3),
            "seconds": {k: round(v, 3) for k, v in stage.items()}}


def _with_priors(inputs: ImageInputs, seen: list, chips: list, names: list[str]) -> tuple[list, list, np.ndarray]:
    """This frame's faces, their crops and `[faces, prior_dim]` features, less any face whose prior
    cannot be computed (each named in one line; the other faces of the frame are kept)."""
    if not seen or not inputs.priors:
        return seen, chips, np.zeros((len(seen), 0), np.float32)
    try:
        return seen, chips, inputs.features(chips, names)
    except ValueError:
        kept, features = [], []
        for number, (chip, name) in enumerate(zip(chips, names, strict=True)):
            try:
                features.append(inputs.features([chip], [name])[0])
                kept.append(number)
            except ValueError as err:
                say(f"skipped {err}")
        return ([seen[n] for n in kept], [chips[n] for n in kept],
                np.stack(features) if features else np.zeros((0, 0), np.float32))


def _values(feature: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in feature.tolist()]


def _write_measured(writer, pending: list, last: bool = False) -> list:
    """Writes the rows, in order, whose displacement is known (all of them when `last`)."""
    done = 0
    for moment, row in pending:
        if moment.displacement is None and not last:
            break
        writer.writerow([*row, "" if moment.displacement is None else f"{moment.displacement:.6g}"])
        done += 1
    return pending[done:]


def _prior_columns(inputs: ImageInputs) -> list[str]:
    """The column names of the prior feature, in the model's order."""
    names = []
    for prior in inputs.priors:
        if prior.name in LANDMARK_PRIORS:
            points = prior.dim // 2
            names += [f"{prior.name}_{axis}_{i}" for i in range(points) for axis in "xy"]
        else:
            names += [f"{prior.name}_{i}" for i in range(prior.dim)]
    return names


AU_COLUMNS = [f"AU{n:02d}_c" for n in labels.FABA_AUS]


def _write_outputs(out: Path, partial: Path, tracks: list[Track], source, frames: int, progress: bool) -> None:
    """frames.csv (the rows with each track's latest answer), the annotated video of the first `frames`
    frames (those the first pass read), tracks.jsonl and the timelines; each file written whole or not
    at all."""
    answers = {t.id: t.keyframes for t in tracks}
    cursor = dict.fromkeys(answers, -1)
    reader = VideoReader(source)
    with contextlib.ExitStack() as stack, open(partial, newline="") as rows_in, \
            atomic_file(out / "frames.csv") as staging, open(staging, "w", newline="") as rows_out, \
            _annotated_video(out / "annotated.mp4", reader) as draw:
        rows = csv.reader(rows_in)
        header = next(rows)
        writer = csv.writer(rows_out)
        writer.writerow([*header, "answer_frame", "emotion", "emotion_named", *AU_COLUMNS])
        row = next(rows, None)
        bar = progress_bar(total=frames, unit="frame", desc="annotating", enabled=progress)
        for frame in stack.enter_context(contextlib.closing(reader.frames())):
            if frame.index >= frames:  # a recording may hold the few frames a decoder still held at an interrupt
                break
            boxes, texts = [], []
            while row is not None and int(row[0]) == frame.index:
                latest = _latest(answers, cursor, row)
                writer.writerow([*row, *_answer_columns(latest)])
                texts.append(f"#{row[1]}" if latest is None else f"#{row[1]}: {label_text(latest)}")
                boxes.append(tuple(int(v) for v in row[5:9]))
                row = next(rows, None)
            draw(frame, boxes, texts)
            bar.update(1)
        bar.close()
        if row is not None:  # the second reading gave fewer frames than the first: rows are kept, undrawn
            say(f"{source}: read again for the annotated video, it ended before frame {row[0]}; the video ends there")
            while row is not None:
                writer.writerow([*row, *_answer_columns(_latest(answers, cursor, row))])
                row = next(rows, None)
    partial.unlink()
    lines = []
    for track in tracks:
        emotions = [k["emotion"] for k in track.keyframes]
        lines.append({"track": track.id, "first_frame": track.first_frame, "last_frame": track.last_frame,
                      "start": round(track.first_time, 4), "end": round(track.last_time, 4), "frames": track.frames,
                      "keyframes": track.keyframes, "emotions": emotions, "aus": [k["aus"] for k in track.keyframes],
                      "emotion": collections.Counter(emotions).most_common(1)[0][0] if emotions else None})
        _timeline(track, out / f"timeline-{track.id}.png")
    write_text(out / "tracks.jsonl", "".join(json.dumps(line) + "\n" for line in lines))


def _latest(answers: dict[int, list[dict]], cursor: dict[int, int], row: list[str]) -> dict | None:
    """The latest answered keyframe of the row's track at or before the row's frame (rows come in
    frame order: `cursor` holds each track's place)."""
    track, frame = int(row[1]), int(row[0])
    keys = answers[track]
    while cursor[track] + 1 < len(keys) and keys[cursor[track] + 1]["frame"] <= frame:
        cursor[track] += 1
    return keys[cursor[track]] if cursor[track] >= 0 else None


def _answer_columns(latest: dict | None) -> list:
    if latest is None:
        return ["", "", "", *[""] * len(AU_COLUMNS)]
    return [latest["frame"], latest["emotion"], int(latest["emotion_named"]),
            *[int(f"AU{n}" in latest["aus"]) for n in labels.FABA_AUS]]


@contextlib.contextmanager
def _annotated_video(path: Path, reader: VideoReader):
    """Yields `write(frame, boxes, texts)`: each frame with its faces drawn, encoded as H.264 in MP4
    (MPEG-4 part 2 where libx264 is absent) at the source's frame rate, cropped to even sizes
    (yuv420p). Written to a staging file, renamed into place only when the block ends normally."""
    av = _pyav()
    with atomic_file(path) as staging, contextlib.closing(av.open(str(staging), "w", format="mp4")) as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=reader.rate)
        width, height = reader.size
        stream.width, stream.height = width // 2 * 2, height // 2 * 2
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "23", "preset": "veryfast"}

        def write(frame: Frame, boxes, texts) -> None:
            canvas = Image.fromarray(frame.rgb)
            if boxes:
                draw_faces(canvas, boxes, texts)
            rgb = np.ascontiguousarray(np.asarray(canvas)[: stream.height, : stream.width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)

        yield write
        for packet in stream.encode():  # the frames the encoder still holds
            container.mux(packet)


def _timeline(track: Track, path: Path) -> None:
    """The emotion at each keyframe, an AU raster and the displacement curve of one track, over time."""
    # deferred: start-up time (matplotlib), for runs without a video
    from matplotlib.figure import Figure

    keys = track.keyframes
    times = [k["time"] for k in keys]
    figure = Figure(figsize=(9, 6.5))  # drawn straight to a file: no pyplot state
    emotion_axis, au_axis, curve_axis = figure.subplots(3, 1, sharex=True,
                                                        gridspec_kw={"height_ratios": [2.2, 2.6, 1.6]})
    emotion_axis.step(times, [labels.EMOTIONS.index(k["emotion"]) for k in keys], where="post", color="0.6")
    emotion_axis.scatter(times, [labels.EMOTIONS.index(k["emotion"]) for k in keys],
                         c=["tab:red" if "peak" in k["reasons"] else "tab:blue" for k in keys], zorder=3)
    emotion_axis.set_yticks(range(len(labels.EMOTIONS)), labels.EMOTIONS)
    emotion_axis.set_title(f"track {track.id}: frames {track.first_frame}-{track.last_frame} "
                           f"({track.first_time:.1f}-{track.last_time:.1f} s); red: peak keyframes")
    for row, au in enumerate(labels.FABA_AUS):
        shown = [t for t, k in zip(times, keys, strict=True) if f"AU{au}" in k["aus"]]
        au_axis.scatter(shown, [row] * len(shown), marker="s", color="tab:green", s=30, zorder=3)
    au_axis.set_yticks(range(len(labels.FABA_AUS)), [f"AU{n}" for n in labels.FABA_AUS], fontsize=7)
    au_axis.set_ylim(-0.7, len(labels.FABA_AUS) - 0.3)
    au_axis.grid(axis="y", color="0.92", zorder=0)
    au_axis.set_axisbelow(True)
    if track.keys.curve:
        times_all, displacement, floor = zip(*track.keys.curve, strict=True)
        curve_axis.plot(times_all, displacement, color="tab:purple", lw=1, label="displacement")
        curve_axis.plot(times_all, floor, color="0.6", lw=0.8, ls="--", label="peak threshold")
        peaks = [(k["time"], k["displacement"]) for k in keys if "peak" in k["reasons"]]
        if peaks:
            curve_axis.scatter(*zip(*peaks, strict=True), color="tab:red", zorder=3, s=18, label="peaks")
        curve_axis.legend(fontsize=7, loc="upper right")
    curve_axis.set_xlabel("seconds")
    curve_axis.set_ylabel("displacement", fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as staging:
        figure.savefig(staging, format="png", dpi=90)
