import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole run, made by the first process (xdist's workers and every
# `run.py` the tests start inherit it): the same tiny programs compile once, not once per process.
OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="emola-jax-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(2)


import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

from tests.processes import SMALL_TRAIN, cpu_env  # noqa: E402
from tests.reference import official_emola_run, write_eval_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The demo first, then the files that do not need it, then those that do: with one worker
    building the shared demo run (a minute or more), the others have other work than waiting."""
    uses_demo = {item.path for item in items if "demo_run" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: 0 if item.path.name == "test_demo.py" else 2 if item.path in uses_demo else 1)


def pytest_unconfigure(config):
    if OWN_XLA_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def shared_once(tmp_path_factory, name: str, make):
    """`make(folder)` run once for the whole test run, whatever the number of xdist workers: the
    first worker to get here runs it in a folder all workers see, under a lock; the others wait,
    then read what it returned (`make`'s JSON-able result, kept beside `folder` as `NAME.json`)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's own folder, above each worker's
    folder, done = shared / name, shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            folder.mkdir()
            done.write_text(json.dumps(make(folder)))
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`run.py demo` run once, as the README's main job: (workdir, completed process). Its trained
    model and landmark graph are the real inputs of the commands that need a trained model."""

    def demo(workdir):
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), "demo", "--workdir", str(workdir)],
                                capture_output=True, text=True, cwd=workdir)
        return {"args": result.args, "returncode": result.returncode, "stdout": result.stdout,
                "stderr": result.stderr}

    workdir, result = shared_once(tmp_path_factory, "demo", demo)
    return workdir, subprocess.CompletedProcess(**result)


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory):
    """A tiny random EmoLA checkpoint and five evaluation records (`reference.write_eval_checkpoint`),
    written once per test run: `(root, checkpoint)`. Tests read it and write elsewhere."""
    _, paths = shared_once(tmp_path_factory, "eval", lambda folder: list(map(str, write_eval_checkpoint(folder))))
    return tuple(map(Path, paths))


@pytest.fixture(scope="session")
def emola_run(tmp_path_factory):
    """An official EmoLA run on disk with the PyTorch modules that are its truth
    (`reference.official_emola_run`); once per worker, as it holds live PyTorch modules."""
    return official_emola_run(tmp_path_factory.mktemp("emola"))


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """`SMALL_TRAIN` run once for the whole test run: 4 steps, checkpoints at 2 and 4, WORKDIR/model.
    Read it, or copy it before changing anything (other workers read it at the same time)."""

    def train(folder):
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), *SMALL_TRAIN, "--workdir", str(folder / "run")],
                                cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
        return {"returncode": result.returncode, "stderr": result.stderr[-3000:]}

    folder, result = shared_once(tmp_path_factory, "small_run", train)
    assert result["returncode"] == 0, result["stderr"]
    return folder / "run"
