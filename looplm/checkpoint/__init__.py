"""Checkpoint I/O, the foundation below the model, training, interop and serving layers.

It owns the file formats (``FORMATS``: the looplm checkpoint directory of JSON + safetensors,
and GGUF) and the one atomic-write helper every writer uses (``looplm.checkpoint.atomic``).
The package's modules: ``atomic`` (writes), ``directory`` and ``gguf`` (the formats),
``formats`` (the registry and ``read_model``), ``stored`` (what a format reads).  Formats read
and write configs and tensors only; building a model from them is the model
layer's job (``looplm.model.loading``), so nothing here imports the model.
"""
