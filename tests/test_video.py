"""`run.py analyze` on video: faces composed from real photographs (`tests/video_clips.py`) tracked
through every frame, checked against dlib's own detections on the decoded frames, the peak rule
against the frames the composition stretches most, the answers against `Predictor` on the same
faces, and broken inputs (a truncated file, a file with no video stream, a live pipe)."""

import csv
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from emola_jax.data.labels import EMOTIONS
from tests import video_clips
from tests.processes import RUN, cpu_env

av = pytest.importorskip("av")
dlib = pytest.importorskip("dlib")
pytest.importorskip("insightface")

MAX_NEW_TOKENS = 16


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def _rows(folder: Path) -> list[dict]:
    with open(folder / "frames.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _tracks(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "tracks.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def analysed(demo_run, tmp_path_factory):
    """One `run.py analyze` of three sources: the composition as H.264 MP4, the composition's first
    scene as Matroska cut short, and that scene again written into a pipe as the run reads it."""
    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    folder = tmp_path_factory.mktemp("video")
    starts = video_clips.write(folder / "clip.mp4")
    video_clips.write(folder / "scene.mkv", scenes=video_clips.SCENES[:1])
    whole = (folder / "scene.mkv").read_bytes()
    (folder / "cut.mkv").write_bytes(whole[: len(whole) * 6 // 10])
    pipe = folder / "camera"
    os.mkfifo(pipe)

    def feed():  # a live source: the bytes arrive while the run reads them
        with open(pipe, "wb") as writer:
            for start in range(0, len(whole), 4096):
                writer.write(whole[start:start + 4096])

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    model, onnx = workdir / "run" / "model", workdir / "landmark_model.onnx"
    result = subprocess.run([*RUN, "analyze", str(folder / "clip.mp4"), str(folder / "cut.mkv"), str(pipe),
                             "--ckpt", str(model), "--onnx", str(onnx), "--out", str(folder / "out"),
                             "--every", "1", "--max-new-tokens", str(MAX_NEW_TOKENS)],
                            capture_output=True, text=True, env=cpu_env(1), timeout=600)
    feeder.join(timeout=5)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, starts, result, model, onnx


def test_tracks_and_boxes_equal_the_composition_and_dlib(analysed):
    folder, starts, result, _, _ = analysed
    out = folder / "out" / "clip"
    rows = _rows(out)
    frames = _decoded(folder / "clip.mp4")
    assert len(frames) == sum(s.frames for s in video_clips.SCENES)
    # one row per frame and face: the composition's faces, each frame once per track
    expected_rows = sum(s.frames * s.faces for s in video_clips.SCENES)
    assert len(rows) == expected_rows == len({(r["frame"], r["face_id"]) for r in rows})
    spans = sorted((min(int(r["frame"]) for r in rows if r["face_id"] == t),
                    max(int(r["frame"]) for r in rows if r["face_id"] == t)) for t in {r["face_id"] for r in rows})
    want = sorted((start, start + scene.frames - 1) for start, scene in zip(starts, video_clips.SCENES, strict=True)
                  for _ in range(scene.faces))
    assert spans == want
    tracks = _tracks(out)
    assert [(t["first_frame"], t["last_frame"]) for t in sorted(tracks, key=lambda t: (t["first_frame"], t["track"]))
            ] == want
    # every box is dlib's HOG detection on that decoded frame (detection on every frame by default)
    detector = dlib.get_frontal_face_detector()
    for index, rgb in enumerate(frames):
        found = sorted((r.left(), r.top(), r.right(), r.bottom()) for r in detector(rgb, 1))
        boxes = sorted(tuple(int(r[k]) for k in ("x1", "y1", "x2", "y2")) for r in rows if int(r["frame"]) == index)
        assert boxes == found, index
    assert all(r["success"] == "1" for r in rows)
    # the two faces of the last scene keep their ids: each track's boxes stay on its side of the frame
    last = [t for t in tracks if t["first_frame"] == starts[-1]]
    for track in last:
        centres = [(int(r["x1"]) + int(r["x2"])) / 2 for r in rows if r["face_id"] == str(track["track"])]
        assert max(centres) - min(centres) < 60
    assert f"{len(frames)} frames" in result.stdout and f"{len(tracks)} tracks" in result.stdout


def test_keyframes_are_every_second_and_the_stretched_frames(analysed):
    folder, starts, _, _, _ = analysed
    tracks = _tracks(folder / "out" / "clip")
    peaks = sorted(k["frame"] for t in tracks for k in t["keyframes"] if "peak" in k["reasons"])
    stretched = sorted(start + scene.peak for start, scene in zip(starts, video_clips.SCENES, strict=True)
                       if scene.peak is not None)
    assert peaks == stretched  # the frames the composition changes most, and no other
    fps = 12
    for track in tracks:
        every = [k["frame"] for k in track["keyframes"] if "every" in k["reasons"]]
        assert every == list(range(track["first_frame"], track["last_frame"] + 1, fps))
        for key in track["keyframes"]:
            assert key["emotion"] in EMOTIONS and key["emotion_answer"]
        assert track["emotions"] == [k["emotion"] for k in track["keyframes"]]


def test_answers_equal_the_predictor_on_the_same_faces(analysed):
    """The keyframes' answers are `Predictor.answer_questions` on the face dlib aligns on that frame,
    and each row carries its track's latest answer."""
    from emola_jax.apps.annotate import QUESTIONS, reading
    from emola_jax.checkpoint import load_tokenizer
    from emola_jax.data.faces import FaceFinder
    from emola_jax.generate import GenerationConfig
    from emola_jax.predictor import ImageInputs, Predictor

    folder, _, _, model, onnx = analysed
    out = folder / "out" / "clip"
    tracks, rows = _tracks(out), _rows(out)
    frames = _decoded(folder / "clip.mp4")
    tokenizer = load_tokenizer(model)
    predictor = Predictor(model, generation=GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    inputs, finder = ImageInputs(predictor.config, onnx), FaceFinder("hog")
    keys = [(t["track"], k) for t in tracks for k in t["keyframes"]][:6]
    chips = []
    for track, key in keys:
        box = next(tuple(int(r[c]) for c in ("x1", "y1", "x2", "y2")) for r in rows
                   if r["face_id"] == str(track) and int(r["frame"]) == key["frame"])
        detection = next(d for d in finder.detect(frames[key["frame"]]) if d.box == box)
        chips.append(finder.align(frames[key["frame"]], detection).chip)
    replies = predictor.answer_questions(list(QUESTIONS.values()), inputs.pixels(chips),
                                         inputs.features(chips, [str(i) for i in range(len(chips))]))
    for row, (_, key) in enumerate(keys):
        want = reading(replies[0][row], replies[1][row], 0.0)
        assert {k: key[k] for k in ("emotion", "aus", "emotion_answer", "au_answer")} == \
            {k: want[k] for k in ("emotion", "aus", "emotion_answer", "au_answer")}
    latest = {t["track"]: t["keyframes"] for t in tracks}
    for row in rows:
        answered = [k for k in latest[int(row["face_id"])] if k["frame"] <= int(row["frame"])]
        assert int(row["answer_frame"]) == answered[-1]["frame"]
        assert row["emotion"] == answered[-1]["emotion"]
        assert [int(row[f"AU{n:02d}_c"]) for n in (6, 12)] == [int(f"AU{n}" in answered[-1]["aus"]) for n in (6, 12)]


def test_annotated_video_and_timelines(analysed):
    from PIL import Image

    folder, _, _, _, _ = analysed
    out = folder / "out" / "clip"
    original, annotated = _decoded(folder / "clip.mp4"), _decoded(out / "annotated.mp4")
    assert len(annotated) == len(original) and annotated[0].shape == original[0].shape
    rows = _rows(out)
    row = next(r for r in rows if r["frame"] == "30")  # the box's left edge is drawn on its frame, over the photo
    left, top, bottom = int(row["x1"]), int(row["y1"]), int(row["y2"])
    edge = annotated[30][top + 10:bottom - 10, left:left + 2].astype(int)
    assert np.abs(edge - original[30][top + 10:bottom - 10, left:left + 2]).mean() > 40
    red, green, blue = edge.mean(axis=(0, 1))  # the box colour, (255, 64, 32), as H.264's 4:2:0 colour leaves it
    assert red - max(green, blue) > 60
    assert np.abs(annotated[30][-20:].astype(int) - original[30][-20:]).mean() < 8  # below every face: as it was
    for track in _tracks(out):
        with Image.open(out / f"timeline-{track['track']}.png") as picture:
            assert picture.size[0] > 400


def test_a_cut_file_gives_the_frames_it_holds_and_a_live_pipe_is_read(analysed):
    folder, _, result, _, _ = analysed
    cut_rows = _rows(folder / "out" / "cut")
    held = len(_decoded(folder / "cut.mkv"))
    assert 0 < held < video_clips.SCENES[0].frames
    assert sorted(int(r["frame"]) for r in cut_rows) == list(range(held))
    stopped = [line for line in result.stderr.splitlines() if "cut.mkv: stopped at frame" in line]
    assert stopped == [f"{folder / 'cut.mkv'}: stopped at frame {held} ({(held - 1) / 12:.2f} s) of the "
                       f"{video_clips.SCENES[0].frames} its header declares: the file is cut short"]
    assert len(_decoded(folder / "out" / "cut" / "annotated.mp4")) == held
    live = folder / "out" / "camera"  # the whole scene, read from the pipe, recorded for the second pass
    assert len(_rows(live)) == video_clips.SCENES[0].frames
    assert len(_decoded(live / "source.ts")) == len(_decoded(live / "annotated.mp4")) == video_clips.SCENES[0].frames


def test_a_file_without_video_is_named_before_the_model_loads(demo_run, tmp_path):
    workdir, _ = demo_run
    with av.open(str(tmp_path / "speech.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    result = subprocess.run([*RUN, "analyze", str(tmp_path / "speech.mp4"), "--ckpt", str(workdir / "run" / "model"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=cpu_env(1),
                            timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'speech.mp4'} has no video stream (it holds 1 audio stream): give a video")
    assert not (tmp_path / "out").exists()


def test_tracking_between_detections_follows_the_faces():
    """`--detect-every 3`: dlib's correlation tracker's boxes on the frames between detections
    overlap dlib's own detections there (IoU >= 0.5); the tracks are those of detecting every frame."""
    from emola_jax.apps.video import Frame, Tracker, VideoSettings, iou
    from emola_jax.data.faces import FaceFinder

    finder = FaceFinder("hog")

    def run(every):
        tracker, seen_rows = Tracker(VideoSettings(detect_every=every)), []
        for index, (_, _, rgb) in enumerate(video_clips.frames()):
            cut = tracker.cut(rgb)
            detect = cut or index % every == 0
            seen, _ = tracker.step(Frame(index, index / 12, rgb), finder.detect(rgb) if detect else None, cut)
            seen_rows += [(index, track.id, detection.box, detected) for track, detection, detected in seen]
        return seen_rows

    every_frame, sparse = run(1), run(3)
    assert {(i, t) for i, t, _, _ in every_frame} == {(i, t) for i, t, _, _ in sparse}
    truth = {(i, t): box for i, t, box, _ in every_frame}
    followed = [(truth[i, t], box) for i, t, box, detected in sparse if not detected]
    assert len(followed) > 50
    assert min(iou(a, b) for a, b in followed) >= 0.5


def test_every_keyframe_on_a_model_without_a_prior_token():
    """`--keyframes every` needs no landmarks: each moment's displacement is 0 (not NaN) and the
    keyframes are the track's first frame and then one every `--every` seconds."""
    from emola_jax.apps.video import Keyframes, Moment, VideoSettings

    keys = Keyframes(VideoSettings(keyframes="every", every=0.5))
    chosen = []
    for index in range(30):
        chosen += keys.add(Moment(index, index / 10, np.zeros(0, np.float32), np.zeros((4, 4, 3), np.uint8),
                                  np.zeros(0, np.float32)))
    chosen += keys.finish()
    assert [(m.frame, m.reasons) for m in chosen] == [(f, ["every"]) for f in range(0, 30, 5)]
    assert all(displacement == 0.0 for _, displacement, _ in keys.curve) and len(keys.curve) == 30


def test_a_peak_is_the_largest_within_its_window_at_its_edge_too():
    """Two bumps exactly `--peak-window` apart on millisecond stamps (30 frames/s, as Matroska rounds
    them): only the larger is a peak, however the float stamps round."""
    from emola_jax.apps.video import Keyframes, Moment, VideoSettings

    for window in (0.3, 0.2, 0.5):
        gap = round(window * 30)
        keys, chosen = Keyframes(VideoSettings(keyframes="peaks", peak_window=window)), []
        for index in range(400):
            value = {200: 5.0, 200 + gap: 6.0}.get(index, 0.0)
            shape = np.array([value], np.float32)
            chosen += keys.add(Moment(index, round(index / 30, 3), shape, None, shape))
        chosen += keys.finish()
        assert [m.frame for m in chosen] == [200 + gap], window


def test_urls_and_devices_reach_analyze_as_videos():
    """A URL keeps its `//` through the command line, and URLs, cameras and pipes are live videos."""
    import run
    from emola_jax.apps.video import is_live, is_video

    args = run.build_parser().parse_args(["analyze", "rtsp://cam.local/live", "http://host/clip.mp4", "photo.jpg",
                                          "--ckpt", "model", "--out", "out"])
    assert args.inputs == ["rtsp://cam.local/live", "http://host/clip.mp4", "photo.jpg"]
    assert [is_video(s) for s in args.inputs] == [True, True, False]
    assert [is_live(s) for s in args.inputs] == [True, True, False]
    assert is_video("/dev/video0") and not is_video("/tmp/photo.png")


def test_a_face_without_a_prior_feature_leaves_the_others_of_its_frame(capsys):
    """One face whose prior cannot be computed is named and dropped; the frame's other faces stay."""
    from emola_jax.apps.video import _with_priors

    class Inputs:  # the prior of a face named "bad" is not finite, as a broken landmark graph gives
        priors = ("2d106det",)

        def features(self, chips, names):
            if any("bad" in n for n in names):
                raise ValueError(f"{next(n for n in names if 'bad' in n)}: 2 NaN or infinite values of 212")
            return np.stack([np.full(212, float(c)) for c in chips])

    seen, chips, features = _with_priors(Inputs(), ["a", "b", "c"], [1, 2, 3], ["face a", "face bad", "face c"])
    assert seen == ["a", "c"] and chips == [1, 3] and features[:, 0].tolist() == [1.0, 3.0]
    assert capsys.readouterr().err.strip() == "skipped face bad: 2 NaN or infinite values of 212"
