"""looplm models inside Hugging Face ``transformers`` (the ``hf`` extra).

Importing this module registers ``LoopLMHFConfig`` (model_type ``"looplm"``) and
``LoopLMForCausalLM`` with ``AutoConfig`` / ``AutoModelForCausalLM``, so

    import looplm.interop.hf
    model = AutoModelForCausalLM.from_pretrained(directory)

loads a directory written by ``save_hf`` / ``looplm convert hf``.  Without importing looplm,
``from_pretrained(directory, trust_remote_code=True)`` reaches the same classes through the
directory's ``auto_map`` and ``modeling_looplm.py``.

``LoopLMForCausalLM`` is a thin wrapper: its modules ARE the wrapped ``LoopLM``'s modules
(registered under the same names, so the safetensors names are looplm's own), and
``forward`` runs ``LoopLM.forward``.  It returns the logits of the last loop step (or of
``steps=N``; more than the trained T extrapolates).  ``generate()`` works without a KV cache:
every new token re-runs the whole sequence (exact, but O(S²) per sequence); padding masks
are refused.  For per-step logits and exit probabilities use ``model.looplm(ids)``.
"""

from __future__ import annotations

from looplm.errors import LoopLMError

try:
    import torch
    from torch.nn import functional as F
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput
except ImportError:
    raise LoopLMError("looplm.interop.hf needs transformers: pip install 'looplm[hf]'") from None

from looplm.config import ModelConfig, from_dict
from looplm.interop.hf_directory import MODEL_TYPE, save_hf
from looplm.model.lm import LoopLM

MODEL_KEYS = ModelConfig.keys()
CHECKPOINT_MARKERS = ("format", "version")


class LoopLMHFConfig(PretrainedConfig):
    """A ``PretrainedConfig`` holding looplm's ``ModelConfig`` keys as attributes (validated
    by building the ModelConfig); the usual HF names map onto them."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
                     "num_hidden_layers": "n_core_layers", "intermediate_size": "ffn_hidden",
                     "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs):
        looplm_values = {key: kwargs.pop(key) for key in MODEL_KEYS if key in kwargs}
        for key in CHECKPOINT_MARKERS:
            kwargs.pop(key, None)
        for key, value in from_dict(ModelConfig, looplm_values, "model").to_dict().items():
            setattr(self, key, value)
        super().__init__(**kwargs)

    def to_looplm(self) -> ModelConfig:
        return from_dict(ModelConfig, {key: getattr(self, key) for key in MODEL_KEYS}, "model")


class LoopLMForCausalLM(PreTrainedModel, GenerationMixin):
    """``transformers`` view of a ``LoopLM``: same modules, same weight names, same logits."""

    config_class = LoopLMHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"

    def __init__(self, config: LoopLMHFConfig, looplm_model: LoopLM | None = None):
        super().__init__(config)
        self._adopt(looplm_model if looplm_model is not None else LoopLM(config.to_looplm()))
        self.post_init()

    def _adopt(self, looplm_model: LoopLM) -> None:
        """Register the LoopLM's children as this module's own (shared objects, same names)."""
        object.__setattr__(self, "looplm", looplm_model)  # a plain attribute: not a second copy in state_dict
        for name, child in looplm_model.named_children():
            self.add_module(name, child)

    @classmethod
    def from_looplm(cls, looplm_model: LoopLM) -> "LoopLMForCausalLM":
        """Wrap an existing LoopLM (weights shared, nothing copied)."""
        config = LoopLMHFConfig(**looplm_model.config.to_dict())
        return cls(config, looplm_model).train(looplm_model.training)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the buffers looplm derives from the config
        (RoPE tables) are rebuilt; missing, unexpected or mismatched weights raise."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {kind: sorted(map(str, info.get(kind) or ()))
                    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        for kind, names in problems.items():
            if names:
                raise LoopLMError(f"{args[0] if args else 'checkpoint'}: {kind.replace('_', ' ')} {names[:3]}:"
                                  " the weights do not match config.json")
        model.looplm.rebuild_derived_buffers(model.looplm.embed.weight.device)
        model._adopt(model.looplm)
        return (model, info) if wants_info else model

    def train(self, mode: bool = True):
        super().train(mode)
        self.looplm.training = mode
        return self

    def _init_weights(self, module) -> None:
        """LoopLM initialises its own weights when built; loaded weights replace them."""

    def get_input_embeddings(self):
        return self.looplm.embed

    def set_input_embeddings(self, value) -> None:
        self.looplm.embed = value
        self._adopt(self.looplm)

    def get_output_embeddings(self):
        return self.looplm.head  # None when tied: looplm reads the embedding matrix directly

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, steps=None, **kwargs):
        """No KV cache: every decoding step sees the whole sequence."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "steps": steps}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int | None = None,
                labels: torch.Tensor | None = None, **ignored) -> CausalLMOutput:
        """input_ids [B, S] → CausalLMOutput(logits [B, S, V] of loop step ``steps`` (default T),
        loss = next-token cross-entropy when ``labels`` are given, -100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise LoopLMError("LoopLMForCausalLM does not support padding masks: pass unpadded sequences"
                              " (batch of equal lengths) or use looplm.generate")
        logits = self.looplm(input_ids, steps=steps).logits()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, LoopLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopLMHFConfig, LoopLMForCausalLM, exist_ok=True)

__all__ = ["LoopLMForCausalLM", "LoopLMHFConfig", "save_hf"]
