"""Table 9: what trains, one run per row and task.

    python run.py train --config 'ablations/tuning:row=ROW,task=TASK' --workdir runs/tuning-ROW-TASK

Rows: projector_only (LoRA frozen), lora_only (prior projector frozen), both. Tasks: emotion, au.
"""

from configs.ablations import config_for


def get_config(arg: str = ""):
    return config_for("tuning", arg)
