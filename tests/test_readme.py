"""The README's Python, run as written on the demo's trained model."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_block(after: str) -> str:
    """The first ```python block of README.md that follows the line starting with `after`."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n" + after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_prior_token_snippet_gives_the_models_logits(demo_run, tmp_path, dtype):
    import torch
    from transformers import LlavaForConditionalGeneration

    from emola_jax.apps.demo import held_out_inputs
    from emola_jax.apps.demo_models import logits_with_prior

    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    model_dir, faces = workdir / "run" / "model", workdir / "faces"
    export = tmp_path / "hf"
    done = subprocess.run([sys.executable, "run.py", "export", str(model_dir), str(export), "--format", "hf",
                           "--dtype", dtype], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ids, pixels, landmarks, mask = held_out_inputs(model_dir, faces / "eval_emotion_anno.json",
                                                   faces / "landmarks.array_record")
    code = readme_block("The prior token in PyTorch").replace("exported/emola-7b-hf", str(export))
    scope = {"input_ids": torch.tensor(ids), "pixel_values": torch.tensor(pixels).permute(0, 3, 1, 2),
             "landmarks": torch.tensor(landmarks), "mask": torch.tensor(mask)}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's code, as a reader runs it
    theirs = scope["logits"].float().numpy()

    reference = LlavaForConditionalGeneration.from_pretrained(workdir / "export" / "hf").eval()  # the demo's float32
    expected = logits_with_prior(reference, workdir / "export" / "hf" / "prior_projector.safetensors", ids, pixels,
                                 landmarks, mask)
    if dtype == "float32":
        np.testing.assert_allclose(theirs, expected, atol=1e-5, rtol=0)
    else:  # bfloat16 weights and activations: within its rounding, the same top token nearly everywhere
        scale = np.abs(expected).max()
        assert np.abs(theirs - expected).max() < 0.05 * scale
        assert (theirs.argmax(-1) == expected.argmax(-1)).mean() > 0.9


def test_generate_and_analyze_defaults_fit_the_demo_model(demo_run, tmp_path):
    """The demo's model has 512 positions in all: the default answer length is what the prompt leaves,
    while a length given beyond it is still refused."""
    workdir, demo = demo_run
    model, graph = workdir / "run" / "model", workdir / "landmark_model.onnx"
    faces = workdir / "faces"
    face = faces / json.loads((faces / "eval_emotion_anno.json").read_text())[0]["image"]
    answered = subprocess.run([sys.executable, "run.py", "generate", str(model), "--image", str(face), "--prompt",
                               "What emotions are conveyed by this face?", "--onnx", str(graph)],
                              capture_output=True, text=True, cwd=ROOT)
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert answered.stdout.strip()
    from PIL import Image
    from skimage import data as skimage_data

    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "astronaut.png")
    analyzed = subprocess.run([sys.executable, "run.py", "analyze", str(tmp_path / "astronaut.png"), "--ckpt",
                               str(model), "--onnx", str(graph), "--out", str(tmp_path / "out"), "--no-progress",
                               "--min-score", "0.5"], capture_output=True, text=True, cwd=ROOT)
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    faces_found = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(faces_found) == 1 and faces_found[0]["emotion_answer"]
    refused = subprocess.run([sys.executable, "run.py", "generate", str(model), "--image", str(face), "--prompt",
                              "?", "--onnx", str(graph), "--max-new-tokens", "512"],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 1
    assert "with --max-new-tokens 512 that exceeds the model's context of 512 positions" in refused.stderr


def test_the_predictor_snippet_answers_as_generate_does(demo_run, tmp_path):
    """The README's inference-engine snippet, as written (bfloat16), on the demo's model and a held-out
    face: the answer `run.py generate` gives with the same weights, dtype and prior feature."""
    import emola_jax
    from emola_jax.apps.demo import held_out_inputs
    from emola_jax.data.labels import AU_QUESTION

    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    model, faces = workdir / "run" / "model", workdir / "faces"
    face = faces / json.loads((faces / "eval_emotion_anno.json").read_text())[0]["image"]
    question = "What emotions are conveyed by this face?"
    _, pixels, features, _ = held_out_inputs(model, faces / "eval_emotion_anno.json", faces / "landmarks.array_record")
    np.save(tmp_path / "feature.npy", features[0])
    generated = subprocess.run([sys.executable, "run.py", "generate", str(model), "--image", str(face), "--prompt",
                                question, "--prior-npy", str(tmp_path / "feature.npy"), "--dtype", "bfloat16"],
                               capture_output=True, text=True, cwd=ROOT)
    assert generated.returncode == 0, generated.stderr[-2000:]
    code = readme_block("Answers rather than logits").replace("checkpoints/emola-7b", str(model))
    scope = {"emola_jax": emola_jax, "feature": features[0], "question": question, "pixels": pixels,
             "features": features, "au_question": AU_QUESTION}
    exec(compile(code.replace('"face.jpg"', repr(str(face))), "README.md", "exec"), scope)  # noqa: S102
    assert scope["text"] == generated.stdout.strip() != ""
    assert scope["answers"][0][0] == scope["text"]  # the same face, as a batch of one
    assert scope["both"][0] == scope["answers"]  # the shared prefix changes no answer


def readme_commands(after: str) -> list[list[str]]:
    """The `python run.py ...` commands of the first ```bash block after the line starting with
    `after`, continuation lines joined, each as its `run.py` arguments."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("\n" + after):], re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split()[2:] for line in lines if line.startswith("python run.py ")]


def test_training_on_your_own_files_as_written(demo_run, tmp_path):
    """The README's three commands from one's own annotation files to a scored model, run as written
    on a few of the demo's faces copied into `my_faces/`; only the model changes (`demo_faces` and the
    demo's base, landmark graph, context and a short run in place of the 7B's)."""
    import shutil

    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    faces = workdir / "faces"
    (tmp_path / "demo_out").symlink_to(workdir)  # where demo_faces finds its base
    mine = {"train.json": json.loads((faces / "train_emotion_anno.json").read_text())[::20],
            "test.json": json.loads((faces / "eval_emotion_anno.json").read_text())[::7]}
    for name, records in mine.items():
        for record in records:
            (tmp_path / "my_faces" / record["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(faces / record["image"], tmp_path / "my_faces" / record["image"])
        (tmp_path / "my_faces" / name).write_text(json.dumps(records))
    changes = {"~/.insightface/models/buffalo_l/2d106det.onnx": str(workdir / "landmark_model.onnx"),
               "emola_7b": "demo_faces", "200": "2"}
    commands = readme_commands("From your own files to a scored model")
    assert [c[0] for c in commands] == ["precompute-landmarks", "train", "evaluate"]
    for command in commands:
        args = [changes.get(arg, arg) for arg in command]
        if command[0] == "evaluate":
            args += ["--max-new-tokens", "16"]  # the demo's model has 512 positions in all
        done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                              cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    steps = (tmp_path / "runs" / "my-faces" / "examples" / "process_0-of-1.jsonl").read_text().splitlines()
    trained = {i for line in steps for i in json.loads(line)["ids"]}
    assert len(steps) == 2 and trained == {r["id"] for r in mine["train.json"]}  # the given file, not the config's
    predictions = (tmp_path / "results" / "my-faces" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in predictions] == [r["id"] for r in mine["test.json"]]
