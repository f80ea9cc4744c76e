"""One Python file per setting; each defines `get_config()`."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent


def ablation_tables() -> list[str]:
    """The ablation tables, one config file each in `configs/ablations/` (listed, not imported: the
    command line offers them without loading the experiments)."""
    return sorted(p.stem for p in (CONFIG_DIR / "ablations").glob("*.py") if p.stem != "__init__")


def available() -> dict[str, str]:
    """Each config of `configs/` by name, with the first sentence of its docstring (read, not
    imported: `--help` lists them without loading jax)."""
    summaries = {}
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.stem != "__init__":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            first_paragraph = " ".join(doc.split("\n\n")[0].split())
            summaries[path.stem] = first_paragraph.split(". ")[0].rstrip(".")
    return summaries


def load(name_or_path: str) -> Any:
    """`tiny`, `emola_7b`, `ablations/tokens`, a path to any file with a `get_config()`, or a run's
    `WORKDIR/experiment.json`; a `:ARG` suffix (`ablations/tokens:row=both,task=au`) is passed on as
    `get_config(ARG)`."""
    name_or_path, _, arg = name_or_path.partition(":")
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.py"
    if not path.is_file():
        raise FileNotFoundError(f"config {name_or_path!r} not found; known configs: {', '.join(available())}")
    if path.suffix == ".json":  # a run's settings as a workdir keeps them (WORKDIR/experiment.json)
        if arg:
            raise ValueError(f"config {path} is a run's settings and takes no :ARG")
        from emola_jax.train import rerun  # deferred: start-up time (jax), for the configs that are Python files

        return rerun.read(path)
    if path.suffix != ".py":
        raise ValueError(f"config {path} is neither a Python file with get_config() nor a run's experiment.json")
    spec = importlib.util.spec_from_file_location(f"emola_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the file look their module up there
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as err:  # a config dataclass's own checks: name the file they failed in
        raise ValueError(f"config {path}: {err}") from err
