"""Converters between looplm checkpoints and other formats (GGUF, Hugging Face, Ouro)."""
