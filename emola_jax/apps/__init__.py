"""Applications built on the core's public functions: the demo, the paper's ablations, photo
analysis, and converting into a quantised checkpoint. They may use the PyTorch converters; nothing
in the core imports them (`tests/test_import_graph.py`)."""
