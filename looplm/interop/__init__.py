"""Interoperability: checkpoints in other formats (docs/INTEROP.md).

- ``safetensors_io``: single-file and sharded safetensors weights (Hugging Face layout).
- ``hf_directory``: write a looplm model as a directory ``transformers`` can load.
- ``hf``: the ``transformers`` classes (``LoopLMHFConfig``, ``LoopLMForCausalLM``), registered
  with the Auto classes on import; needs the ``hf`` extra.
- ``ouro``: Ouro checkpoints ↔ looplm models.
- ``gguf``: GGUF export and reader (needs the ``gguf`` extra); int8 weights: ``looplm.quant``.

Nothing here is imported by ``import looplm``; ``transformers`` is imported only by ``hf``.
"""
