"""Typed configuration: a model is fully described by its ``ModelConfig``.

``ModelConfig`` (``looplm.config.model``) builds the network, its settings grouped by concern;
``TrainConfig`` drives the optimiser and schedule and ``DataConfig`` says where tokens come from
(``looplm.config.run``).  All are validated when constructed, refuse unknown keys, and
round-trip through JSON (saved in every checkpoint) or YAML.  ``looplm.config.values`` turns user
values into typed fields, ``looplm.config.presets`` names model shapes, and
``looplm.config.assemble`` builds a run's config in the documented order.
"""

from looplm.config.assemble import (
                                    CHECKPOINT_METADATA_KEYS,
                                    DERIVED_SIZES,
                                    RESUME_MAY_CHANGE,
                                    apply_overrides,
                                    assemble_run_config,
                                    drop_derived,
                                    model_config_from_json,
)
from looplm.config.model import (
                                    ATTENTION_KINDS,
                                    DEPTH_LORA_POSITIONS,
                                    EXIT_SPECS,
                                    FFN_KINDS,
                                    GROUPS,
                                    INITIAL_STATES,
                                    INJECTIONS,
                                    LAYER_KINDS,
                                    MAX_CONTEXT,
                                    MAX_VOCAB,
                                    MOE_SCOPES,
                                    NORM_PLACEMENTS,
                                    NORM_TYPES,
                                    TERNARY_SCOPES,
                                    AttentionConfig,
                                    ExitConfig,
                                    FFNConfig,
                                    LoopConfig,
                                    MixerConfig,
                                    ModelConfig,
                                    NormConfig,
                                    ResidualConfig,
                                    parse_exit_spec,
)
from looplm.config.presets import FAMILY_PRESETS, PRESETS, preset, preset_values
from looplm.config.run import (
                                    DEPTH_SAMPLING,
                                    FITTED_TOKENIZERS,
                                    LOG_SINKS,
                                    OBJECTIVES,
                                    OPTIMIZERS,
                                    PARALLEL,
                                    UPCYCLE_ORDERS,
                                    DataConfig,
                                    RunConfig,
                                    TrainConfig,
)
from looplm.config.values import from_dict, read_config_file

__all__ = [
    "ATTENTION_KINDS", "CHECKPOINT_METADATA_KEYS", "DEPTH_LORA_POSITIONS", "DEPTH_SAMPLING", "DERIVED_SIZES",
    "EXIT_SPECS", "FAMILY_PRESETS", "FFN_KINDS", "FITTED_TOKENIZERS", "GROUPS", "INITIAL_STATES", "INJECTIONS",
    "LAYER_KINDS", "LOG_SINKS", "MAX_CONTEXT", "MAX_VOCAB", "MOE_SCOPES", "NORM_PLACEMENTS", "NORM_TYPES",
    "OBJECTIVES", "OPTIMIZERS", "PARALLEL", "PRESETS", "RESUME_MAY_CHANGE", "TERNARY_SCOPES", "UPCYCLE_ORDERS",
    "AttentionConfig", "DataConfig", "ExitConfig", "FFNConfig", "LoopConfig", "MixerConfig", "ModelConfig",
    "NormConfig", "ResidualConfig", "RunConfig", "TrainConfig", "apply_overrides", "assemble_run_config",
    "drop_derived", "from_dict", "model_config_from_json", "parse_exit_spec", "preset", "preset_values",
    "read_config_file",
]
