"""Faces per second of `run.py analyze`: the face steps alone, and the whole command.

1. Face steps on the CPU, per stage: decoding, dlib's HOG detection (upsample 1), dlib's 5-point
   alignment and face chip (336 px), and the landmark prior (the official recipe through an ONNX
   graph of 2d106det's signature and about its cost, the one `landmarks_throughput.py` builds).
   The photos are insightface's group photo t1.jpg (1280x886, 6 faces) and scikit-image's
   astronaut (512x512, 2 detections), `--repeat` times each. dlib's CNN detector is timed on
   one photo of each, as it costs seconds per photo on a CPU.
2. The whole command (`emola_jax.apps.analyze.analyze`, what `run.py analyze` calls) on the same photos with a
   trained demo model (`run.py demo` in `--demo`, run first if that folder has no model), answers up
   to `--max-new-tokens` tokens.
3. The model's stage alone on the faces the command found (their crops and prior features as it
   wrote them), in batches of `--batch-size`: the emotion and the AU question answered one after the
   other (`Predictor.answer_batch` twice: two prefills per face) against both at once from one
   prefill per face (`Predictor.answer_questions`, prefix sharing); the answers must be identical.

    python benchmarks/analyze_throughput.py [--repeat 10] [--demo demo_out] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.landmarks_throughput import conv_graph  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def photos(folder: Path, repeat: int) -> list[Path]:
    import skimage.data
    from PIL import Image

    group = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations))) / "data/images/t1.jpg"
    astronaut = folder / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(astronaut)
    return [group, astronaut] * repeat


def face_steps(paths: list[Path], graph: Path) -> dict:
    from emola_jax.data import landmarks
    from emola_jax.data.faces import FaceFinder
    from emola_jax.data.image import decode_rgb

    finder = FaceFinder("hog")
    session = landmarks.open_session(graph)
    seconds = dict.fromkeys(("decode", "detect", "align", "landmarks"), 0.0)
    faces = 0
    for path in paths:
        start = time.perf_counter()
        rgb = decode_rgb(path)
        seconds["decode"] += (now := time.perf_counter()) - start
        detections = finder.detect(rgb)
        seconds["detect"] += (then := time.perf_counter()) - now
        found = [finder.align(rgb, d) for d in detections]
        seconds["align"] += (now := time.perf_counter()) - then
        landmarks.run_session(session, np.stack([landmarks.official_array(f.chip[..., ::-1]) for f in found]))
        seconds["landmarks"] += time.perf_counter() - now
        faces += len(found)
    return {"faces": faces, **seconds}


def cnn_seconds(paths: list[Path]) -> list[float]:
    from emola_jax.data.faces import FaceFinder
    from emola_jax.data.image import decode_rgb

    finder = FaceFinder("cnn")
    times = []
    for path in paths:
        rgb = decode_rgb(path)
        start = time.perf_counter()
        finder.detect(rgb)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--demo", type=Path, default=ROOT / "demo_out")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = photos(tmp, args.repeat)
        graph = conv_graph(tmp / "landmarks.onnx")
        steps = face_steps(paths, graph)
        total = sum(v for k, v in steps.items() if k != "faces")
        print(f"photos {len(paths)}  faces {steps['faces']}")
        for stage in ("decode", "detect", "align", "landmarks"):
            print(f"  {stage:10s} {1000 * steps[stage] / steps['faces']:7.2f} ms/face")
        print(f"face_steps_faces_per_second: {steps['faces'] / total:.1f}")
        cnn = cnn_seconds(paths[:2])
        print(f"cnn_detector_seconds_per_photo: t1.jpg {cnn[0]:.2f}, astronaut {cnn[1]:.2f}")

        model = args.demo / "run" / "model"
        if not model.exists():
            subprocess.run([sys.executable, str(ROOT / "run.py"), "demo", "--workdir", str(args.demo)], check=True,
                           stdout=subprocess.DEVNULL)
        from emola_jax.apps.analyze import analyze
        from emola_jax.checkpoint import load_tokenizer
        from emola_jax.data.conversation import pad_token_id
        from emola_jax.generate import GenerationConfig

        tokenizer = load_tokenizer(model)
        generation = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=pad_token_id(tokenizer))
        analyze(paths[:2], model, tmp / "warm", onnx=args.demo / "landmark_model.onnx", generation=generation,
                batch_size=args.batch_size, progress=False)  # compiles
        start = time.perf_counter()
        summary = analyze(paths, model, tmp / "out", onnx=args.demo / "landmark_model.onnx", generation=generation,
                          batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        print(f"whole command: {summary['faces']} faces in {seconds:.1f} s; stages {summary['seconds']}")
        print(f"analyze_faces_per_second: {summary['faces'] / seconds:.2f}")
        model_stage(model, generation, tmp / "out", args.batch_size)


def model_stage(model: Path, generation, out: Path, batch_size: int) -> None:
    import json

    from emola_jax.checkpoint import load_config
    from emola_jax.data import labels
    from emola_jax.predictor import Predictor

    predictor = Predictor(model, generation=generation)
    priors = [p.name for p in load_config(model).priors]
    faces = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    faces = [f for f in faces if "crop" in f]
    pixels = np.stack([predictor.pixels(out / f["crop"]) for f in faces])
    features = np.stack([np.concatenate([np.load(out / f["priors"][p]) for p in priors]) for f in faces])
    batches = [slice(i, i + batch_size) for i in range(0, len(faces), batch_size)]
    questions = [labels.EMOTION_QUESTION, labels.AU_QUESTION]

    def separate(part):
        return [predictor.answer_batch(q, pixels[part], features[part], rows=batch_size) for q in questions]

    def shared(part):
        return predictor.answer_questions(questions, pixels[part], features[part], rows=batch_size)

    results = {}
    for name, fn in (("separate", separate), ("shared", shared)):
        fn(batches[0])  # compiles
        best, answers = float("inf"), None
        for _ in range(3):
            start = time.perf_counter()
            answers = [fn(part) for part in batches]
            best = min(best, time.perf_counter() - start)
        results[name] = (best, answers)
    assert results["separate"][1] == results["shared"][1], "prefix sharing changed an answer"
    for name, (seconds, _) in results.items():
        print(f"model stage, {name:8s}: {len(faces)} faces, two questions each, in {seconds:.3f} s "
              f"({len(faces) / seconds:.1f} faces/s)")
    print(f"answers identical: yes; prefix_sharing_speedup: {results['separate'][0] / results['shared'][0]:.2f}")


if __name__ == "__main__":
    main()
