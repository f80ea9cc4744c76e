"""The paper's ablations as configs: one file per table, `get_config("row=ROW,task=TASK")` one run.

    python run.py train --config 'ablations/tokens:row=prior_only,task=emotion' --workdir runs/tok-p-emo

Each starts from `configs/emola_7b.py` (FABA-Instruct, LLaVA-1.5-7B base; paths changed with
`--set`) and applies the row (`emola_jax/ablation.py`, which also holds the paper's numbers).
TASK is emotion or au (one set, one epoch of it; the paper trains the tasks individually), or
multi for the tasks table's multi-task row. Without an argument: the table's last row (EmoLA
as published), on emotion. `python run.py ablation TABLE` trains and scores a whole table.
"""

from __future__ import annotations

from emola_jax import ablation


def config_for(table: str, arg: str = ""):
    """The experiment of one row and task of `table`; `arg` is `row=ROW,task=TASK` (either may be left out)."""
    from configs.emola_7b import get_config as emola_7b

    settings = dict(row=ablation.TABLES[table][-1].name, task=None)
    for part in filter(None, arg.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in settings:
            raise ValueError(f"ablation config argument {part!r} is not row=ROW or task=TASK")
        settings[key] = value
    row = ablation.row(table, settings["row"])
    task = settings["task"] or ("emotion" if row.tasks == ablation.TASKS else row.tasks[0])
    return ablation.experiment_for(emola_7b(), table, row.name, task)
