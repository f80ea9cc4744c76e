"""Table 8: the prior token and the visual tokens, one run per row and task.

    python run.py train --config 'ablations/tokens:row=ROW,task=TASK' --workdir runs/tokens-ROW-TASK

Rows: prior_only (visual_tokens=False), visual_only (prior_position=off), both. Tasks: emotion, au.
"""

from configs.ablations import config_for


def get_config(arg: str = ""):
    return config_for("tokens", arg)
