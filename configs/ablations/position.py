"""Table 14: where the prior token goes, one run per row and task.

    python run.py train --config 'ablations/position:row=ROW,task=TASK' --workdir runs/position-ROW-TASK

Rows: before, after. Tasks: emotion, au.
"""

from configs.ablations import config_for


def get_config(arg: str = ""):
    return config_for("position", arg)
