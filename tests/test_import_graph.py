"""The layering of the project's imports (`tests/import_graph.py`): no import circle, no import of a
layer above, and no import inside a function unless it defers a heavy library (and says so)."""

import textwrap

from tests import import_graph


def test_the_project_keeps_its_layers():
    result = import_graph.report()
    assert result.problems() == []
    assert result.modules > 60 and result.arrows > 200  # the whole project was read


def test_each_rule_names_the_statement_that_breaks_it(tmp_path):
    files = {
        "run.py": "",
        "emola_jax/__init__.py": "",
        "emola_jax/config.py": "import emola_jax.lora\n",  # circle with lora
        "emola_jax/lora.py": "from emola_jax import config\n",
        "emola_jax/data/__init__.py": "",
        "emola_jax/data/pipeline.py": """
            def read():
                from emola_jax import checkpoint
                # deferred: start-up time (torch)
                import torch
                import tensorflow_datasets
            """,
        "emola_jax/checkpoint.py": "from converters import tables\n",
        "converters/__init__.py": "",
        "converters/tables.py": "",
        "configs/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    result = import_graph.report(tmp_path)
    assert result.cycles == [["emola_jax.config", "emola_jax.lora"]]
    assert sorted(result.upward) == [
        "emola_jax/checkpoint.py:1: emola_jax.checkpoint (storage and decoding) imports converters.tables (converters)",
        "emola_jax/data/pipeline.py:3: emola_jax.data.pipeline (data) imports emola_jax.checkpoint "
        "(storage and decoding)",
    ]
    # the comment covers the block of imports below it, up to a statement that is not an import
    assert result.uncommented == ["emola_jax/data/pipeline.py:3: emola_jax.checkpoint"]
    assert (result.local_imports, result.local_project_imports) == (3, 1)
