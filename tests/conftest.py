import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`run.py demo` run once, as the README's main job: (workdir, completed process). Its trained
    model and landmark graph are the real inputs of the commands that need a trained model."""
    import subprocess

    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "run.py"), "demo",
                             "--workdir", str(workdir)], capture_output=True, text=True, cwd=workdir)
    return workdir, result
