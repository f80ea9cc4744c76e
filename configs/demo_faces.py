"""The demo's tiny EmoLA trained on the demo's drawn faces, from the demo's converted base.

Run `python run.py demo` first (it writes `demo_out/`), then, e.g. on two processes of one machine:

    python run.py train --config demo_faces --workdir runs/faces \
        --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0   # and --process-id 1
"""

from configs.tiny import get_config as tiny
from emola_jax.demo import DemoInputs, from_base

DEMO_DIR = "demo_out"  # relative to the working directory


def get_config():
    return from_base(tiny(), DemoInputs.in_folder(DEMO_DIR))
