"""Table 13: single-task and multi-task training, one run per row and task.

    python run.py train --config 'ablations/tasks:row=ROW,task=TASK' --workdir runs/tasks-ROW-TASK

Rows: single (task=emotion or au: one set), multi (task=multi: both sets, scored on each). Tasks: emotion, au, multi.
"""

from configs.ablations import config_for


def get_config(arg: str = ""):
    return config_for("tasks", arg)
