"""The face priors (not in the paper): each alone, and dlib68 beside 2d106det, one run per row and task.

    python run.py train --config 'ablations/priors:row=ROW,task=TASK' --workdir runs/priors-ROW-TASK

Rows: 2d106det, dlib68, descriptor (dlib-face-descriptor), 2d106det_dlib68 (data.landmarks: one file
per prior, in the order 2d106det, dlib68, dlib-face-descriptor). Tasks: emotion, au.
"""

from configs.ablations import config_for


def get_config(arg: str = ""):
    return config_for("priors", arg)
