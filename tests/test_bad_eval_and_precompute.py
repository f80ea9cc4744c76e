"""Bad input and interrupted work for `precompute-landmarks` and `evaluate`, run as a user runs them
(`run.py` in a subprocess, or its `main` for a checkpoint's evaluation; real files): a kill at any
step of the landmark merge leaves a state the next run completes from; labels are checked before any
answer is generated and scored as the annotation file says them now; every error is one line naming
the file (and line, record or graph)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import run
from emola_jax.apps.demo_models import toy_landmark_graph
from emola_jax.config import LANDMARK_DIM
from emola_jax.data import landmark_store, precompute
from emola_jax.eval import scoring
from tests.processes import ROOT, RUN, cpu_env
from tests.test_precompute_landmarks import make_images

TIMEOUT = 300


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, env=cpu_env(1))


def _one_error(result: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a refused command prints, without the prefix."""
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0][len("error: "):]


def _hidden(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*"))


# --- precompute-landmarks ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Six images, their annotation file, the first three in a second one, a toy landmark graph, and
    the features of a clean run over all six."""
    root = tmp_path_factory.mktemp("faces")
    records = make_images(root / "images", 6)
    (root / "anno.json").write_text(json.dumps(records))
    (root / "first.json").write_text(json.dumps(records[:3]))
    graph = toy_landmark_graph(root / "g.onnx", "N")
    clean = root / "clean.array_record"
    result = _precompute(root, root / "anno.json", clean)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, graph, landmark_store.read_landmarks(clean)


def _precompute(root: Path, annotations: Path, out: Path, *, images_root=None, graph=None):
    return _run("precompute-landmarks", "--annotations", annotations, "--images-root", images_root or root,
                "--onnx", graph or root / "g.onnx", "--out", out, "--no-progress")


def _same_features(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7)


# `run.py precompute-landmarks` with parts of two records, SIGKILLed at one step of its writes
KILLED_AT = """
import os, shutil, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import run
from emola_jax import atomic
from emola_jax.data import precompute

step, out = sys.argv[2], Path(sys.argv[3])
precompute.precompute_priors.__kwdefaults__["part_size"] = 2  # the command's code path
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
replace, rmtree, fsync_dir, renamed = os.replace, shutil.rmtree, atomic.fsync_dir, []

def replace_then_die(src, dst):
    if (step == "second part written, not renamed" and len(renamed) == 1
            or step == "merged file written, not renamed" and Path(dst) == out):
        die()
    replace(src, dst)
    renamed.append(Path(dst))

def sync_then_die(directory):
    if step == "merged file renamed, folder not synced" and renamed[-1] == out:
        die()
    fsync_dir(directory)

def remove_then_die(path, *args, **kwargs):
    if step == "one part removed":
        sorted(Path(path).glob("part-*"))[0].unlink()
    die()

os.replace, atomic.fsync_dir, shutil.rmtree = replace_then_die, sync_then_die, remove_then_die
sys.exit(run.main(sys.argv[4:]))
"""

STEPS = {  # step -> what it leaves (OUT holds all six, part files, hidden files beside OUT), what the rerun computes
    "second part written, not renamed": (False, 1, 0, 1),
    "merged file written, not renamed": (False, 2, 1, 0),
    "merged file renamed, folder not synced": (True, 2, 0, 0),
    "parts not yet removed": (True, 2, 0, 0),
    "one part removed": (True, 1, 0, 0),
}


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_the_merge_is_completed_by_a_rerun(faces, tmp_path, step):
    root, graph, clean = faces
    out = tmp_path / "features.array_record"
    precompute.precompute_landmarks(root / "first.json", root, graph, out, progress=False)  # an earlier run
    args = ["precompute-landmarks", "--annotations", root / "anno.json", "--images-root", root, "--onnx", graph,
            "--out", out, "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, ROOT, step, out, *map(str, args)],
                            capture_output=True, text=True, timeout=TIMEOUT, env=cpu_env(1))
    assert killed.returncode == -9, killed.stderr[-2000:]
    complete, parts, hidden, left = STEPS[step]
    assert (len(landmark_store.read_landmarks(out)) == 6) == complete  # the kill came where it was meant to
    assert len(list((tmp_path / "features.array_record.parts").glob("part-*"))) == parts
    assert len(_hidden(tmp_path)) == hidden

    rerun = _precompute(root, root / "anno.json", out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.startswith(f"landmarks: written {left}, skipped {6 - left} (already done), failed 0")
    _same_features(landmark_store.read_landmarks(out), clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.array_record"]  # no part, temporary or error


def test_a_part_that_disagrees_with_the_output_is_named(faces, tmp_path):
    root, graph, clean = faces
    out = tmp_path / "features.array_record"
    landmark_store.write_file(out, clean.items())
    (tmp_path / "features.array_record.parts").mkdir()
    part = tmp_path / "features.array_record.parts" / "part-00000.array_record"
    landmark_store.write_file(part, [("r1", clean["r1"] + 1)])
    message = _one_error(_precompute(root, root / "anno.json", out))
    assert message == f"record id r1 has one feature in {out} and another in {part}; remove the wrong file"
    assert part.exists()
    _same_features(landmark_store.read_landmarks(out), clean)


def test_no_readable_image_is_an_error_and_some_are_counted(faces, tmp_path):
    root, _, _ = faces
    out = tmp_path / "features.array_record"
    errors = tmp_path / "features.errors.jsonl"
    message = _one_error(_precompute(root, root / "anno.json", out, images_root=root / "imgs"))  # mistyped
    assert message.startswith(f"none of the 6 images could be read (image {root / 'imgs' / 'images' / 'img_0.png'}")
    assert message.endswith(f"; each reason is listed in {errors}")
    assert len(errors.read_text().splitlines()) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [errors.name]  # no empty feature file

    records = json.loads((root / "anno.json").read_text())
    records[2]["image"] = records[4]["image"] = "images/none.jpg"
    (tmp_path / "anno.json").write_text(json.dumps(records))
    some = _precompute(root, tmp_path / "anno.json", out)
    assert some.returncode == 0, some.stderr[-2000:]
    assert some.stdout.strip() == (f"landmarks: written 4, skipped 0 (already done), failed 2 (listed in {errors}) "
                                   f"-> {out}")
    assert [json.loads(line)["id"] for line in errors.read_text().splitlines()] == ["r2", "r4"]

    message = _one_error(_run("precompute-landmarks", "--annotations", root / "anno.json", "--import-npy",
                              root / "nowhere", "--out", tmp_path / "imported.array_record", "--no-progress"))
    assert message.startswith("none of the 6 landmark files could be read (landmark file ")


def test_an_output_that_is_a_folder_or_under_a_file_is_named(faces, tmp_path):
    root, _, _ = faces
    folder = tmp_path / "features"
    folder.mkdir()
    message = _one_error(_precompute(root, root / "anno.json", folder))
    assert message == (f"{folder} is a folder; the output is the ArrayRecord file to write, e.g. "
                       f"{folder / 'features.array_record'}")
    assert list(folder.iterdir()) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = _one_error(_precompute(root, root / "anno.json", blocker / "sub" / "f.array_record"))
    assert message == f"{blocker} is a file, where a folder is needed for {blocker / 'sub'}"


def _wrong_graph(path: Path, width: int, flatten: bool) -> Path:
    """A landmark graph whose output is `[N, width]`, or `[1, N * width]` with `flatten` (a shape
    the graph cannot declare, so only running it shows it)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, width)).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["data", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["projected" if flatten else "fc1"])]
    nodes += [helper.make_node("Flatten", ["projected"], ["fc1"], axis=0)] if flatten else []
    graph = helper.make_graph(
        nodes, "landmark_106", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, None if flatten else ["N", width])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
         helper.make_tensor("w", TensorProto.FLOAT, list(weight.shape), weight.ravel())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_graph_with_the_wrong_output_is_named_with_the_expected_shape(faces, tmp_path):
    root, _, _ = faces
    out = tmp_path / "features.array_record"
    undeclared = _wrong_graph(tmp_path / "flat.onnx", LANDMARK_DIM, flatten=True)
    message = _one_error(_precompute(root, root / "anno.json", out, graph=undeclared))
    assert message == f"{undeclared} returned an output of shape [1, 1272] for 6 images, not [6, 212]"
    narrow = _wrong_graph(tmp_path / "narrow.onnx", 200, flatten=False)
    message = _one_error(_precompute(root, root / "anno.json", out, graph=narrow))
    assert message == f"{narrow} declares an output of shape [N, 200], not [N, 212] like 2d106det.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.onnx", "narrow.onnx"]


# --- evaluate ------------------------------------------------------------------------------------


def test_labels_are_checked_before_generating_and_scored_as_the_annotation_says(eval_checkpoint, tmp_path, capsys):
    """`run.main` in this process, where jax is imported and the checkpoint built already: the
    same command line as a subprocess, without a jax start-up per run."""
    root, ckpt = eval_checkpoint

    def _evaluate(ckpt, data, out, images_root) -> subprocess.CompletedProcess:
        args = ["evaluate", "--ckpt", ckpt, "--data", data, "--images-root", images_root, "--task", "emotion",
                "--out", out, "--max-new-tokens", "6", "--batch-size", "5"]
        code = run.main(list(map(str, args)))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    records = json.loads((root / "data" / "eval_emotion_anno.json").read_text())
    records[3]["label"] = "hapy"
    data, out = tmp_path / "anno.json", tmp_path / "out"
    data.write_text(json.dumps(records))
    message = _one_error(_evaluate(ckpt, data, out, root / "data"))
    assert message == (f"{data}: record img3: emotion label 'hapy' is neither an id 0-6 nor one of happiness, "
                       "sadness, surprise, anger, neutral, disgust, fear")
    assert not out.exists()  # refused before a single answer

    records[3]["label"] = "happiness"  # the user fixes the label: the rerun generates and scores
    data.write_text(json.dumps(records))
    fixed = _evaluate(ckpt, data, out, root / "data")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    written = (out / "predictions.jsonl").read_text()
    lines = [json.loads(line) for line in written.splitlines()]
    predicted = [scoring.emotion_of(line["prediction"]) for line in lines]
    labels = [scoring.emotion_label(r["label"]) for r in records]
    accuracy = 100 * sum(p == t for p, t in zip(predicted, labels, strict=True)) / 5
    assert json.loads((out / "metrics.json").read_text())["s_re"] == pytest.approx(accuracy)

    for record, label in zip(records, predicted, strict=True):  # labels changed once every answer is written
        record["label"] = label
    data.write_text(json.dumps(records))
    relabelled = _evaluate(ckpt, data, out, root / "data")
    assert relabelled.returncode == 0, relabelled.stderr[-2000:]
    assert (out / "predictions.jsonl").read_text() == written  # nothing generated again
    assert json.loads((out / "metrics.json").read_text())["s_re"] == 100.0

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _one_error(_evaluate(ckpt, data, blocker, root / "data")) == f"{blocker} is a file, where a folder is needed"


def test_predictions_and_annotation_errors_name_the_file_and_line(tmp_path):
    good = {"prediction": "The person looks happy.", "reference": "The person looks happy.", "label": 0}
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({**good, "label": i % 7}) + "\n" for i in range(7))
                           + json.dumps({**good, "label": "joy"}) + "\n")
    out = tmp_path / "out"
    message = _one_error(_run("evaluate", "--predictions", predictions, "--task", "emotion", "--out", out))
    assert message == (f"{predictions}, line 8: emotion label 'joy' is neither an id 0-6 nor one of happiness, "
                       "sadness, surprise, anger, neutral, disgust, fear")

    lines = predictions.read_bytes().splitlines(keepends=True)
    predictions.write_bytes(b"".join(lines[:2]) + b'{"prediction": "caf\xe9", "reference": "r", "label": 1}\n')
    message = _one_error(_run("evaluate", "--predictions", predictions, "--task", "emotion", "--out", out))
    assert message == f"{predictions}, line 3: byte 0xe9 is not UTF-8 text (save the file as UTF-8)"
    assert not out.exists()

    predictions.write_bytes(b"".join(lines[:2]))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = _one_error(_run("evaluate", "--predictions", predictions, "--task", "emotion", "--out",
                              blocker / "report"))
    assert message == f"{blocker} is a file, where a folder is needed for {blocker / 'report'}"

    annotations = tmp_path / "anno.json"
    annotations.write_bytes(b'[\n  {"id": "a",\n   "image": "caf\xe9.png"}\n]\n')
    message = _one_error(_run("precompute-landmarks", "--annotations", annotations, "--import-npy", tmp_path,
                              "--out", tmp_path / "f.array_record", "--no-progress"))
    assert message == f"annotation file {annotations}, line 3: byte 0xe9 is not UTF-8 text (save the file as UTF-8)"
