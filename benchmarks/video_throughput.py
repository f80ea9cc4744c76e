"""Frames per second of `run.py analyze` on a video, answers per second, and memory against length.

The video is the tests' composition (`tests/video_clips.py`: real photographs moved, zoomed and
stretched, with cuts; 480x360) repeated to `--minutes` at `--fps`, H.264. Each configuration runs
in a fresh process (`analyze`, what `run.py analyze` calls) so that its peak resident memory is its
own:

- reading + tracking + priors, frames/s (decoding, HOG detection with upsample 1 on every frame or
  every `K` frames with dlib's correlation tracker between, alignment, the prior), over the
  first pass's wall time less the model's;
- the model's answers per second at the keyframes (both questions per keyframe, batches of 8);
- peak RSS on a one-minute and a `--minutes` video: a stream holds no more for a longer video.

The model is the demo's (`run.py demo` in `--demo`, run first if absent); the prior graph is
`landmarks_throughput.conv_graph`, 2d106det's signature at about its cost (the demo's own landmark
graph is a toy far cheaper than the real one).

    python benchmarks/video_throughput.py [--demo demo_out] [--minutes 3] [--fps 25]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.landmarks_throughput import conv_graph  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def compose(path: Path, minutes: float, fps: int) -> int:
    from tests import video_clips

    per_pass = sum(s.frames for s in video_clips.SCENES)
    repeats = max(1, round(minutes * 60 * fps / per_pass))
    video_clips.write(path, fps=fps, scenes=video_clips.SCENES * repeats)
    return repeats * per_pass


def one(args) -> None:
    """One configuration in this process; prints its summary and peak RSS as JSON."""
    from emola_jax.apps.analyze import analyze
    from emola_jax.apps.video import VideoSettings
    from emola_jax.checkpoint import load_tokenizer
    from emola_jax.generate import GenerationConfig

    model = args.demo / "run" / "model"
    tokenizer = load_tokenizer(model)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    summary = analyze([args.video], model, args.out, onnx=args.graph, generation=generation, progress=False,
                      video=VideoSettings(detect_every=args.detect_every))
    clip = summary["videos"][0]
    clip["wall_seconds"] = round(time.perf_counter() - start, 1)
    clip["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(clip))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "demo_out")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--video", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--graph", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--detect-every", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    if not (args.demo / "run" / "model").is_dir():
        subprocess.run([sys.executable, str(ROOT / "run.py"), "demo", "--workdir", str(args.demo)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        graph = conv_graph(tmp / "landmarks.onnx")
        videos = {"1 min": (tmp / "short.mp4", compose(tmp / "short.mp4", 1.0, args.fps)),
                  f"{args.minutes:g} min": (tmp / "long.mp4", compose(tmp / "long.mp4", args.minutes, args.fps))}
        print("| video | frames | detect every | frames/s (read + track + priors) | keyframes | answers/s | "
              "stage seconds | peak RSS MiB |\n|---|---|---|---|---|---|---|---|", flush=True)
        runs = [("1 min", 1), (f"{args.minutes:g} min", 1), (f"{args.minutes:g} min", 5)]
        for n, (name, every) in enumerate(runs):
            video, frames = videos[name]
            done = subprocess.run([sys.executable, __file__, "--one", "--demo", str(args.demo), "--video", str(video),
                                   "--out", str(tmp / f"out{n}"), "--graph", str(graph), "--detect-every", str(every),
                                   "--max-new-tokens", str(args.max_new_tokens)],
                                  capture_output=True, text=True, check=True)
            clip = json.loads(done.stdout.strip().splitlines()[-1])
            stages = ", ".join(f"{k} {v:.0f}" for k, v in clip["seconds"].items())
            print(f"| {name} | {clip['frames']} | {every} | {clip['frames_per_second']} | {clip['keyframes']} | "
                  f"{clip['answers_per_second']} | {stages} | {clip['peak_rss_mib']} |", flush=True)


if __name__ == "__main__":
    main()
