"""Assembling a run's config in the documented order (preset → config file → source checkpoint
→ command-line options → dotted overrides), reading a checkpoint's ``config.json``, and
re-deriving sizes a change leaves stale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from looplm.config.model import ModelConfig, flat_dotted, flat_model_values
from looplm.config.presets import preset_values
from looplm.config.run import RunConfig
from looplm.config.values import check as _check
from looplm.config.values import from_dict, read_config_file
from looplm.errors import LoopLMError

# Keys of a checkpoint's config.json that describe the file, not the model: looplm's format
# marker and the Hugging Face metadata that makes the directory loadable by transformers
# (looplm.interop.hf_directory; save_pretrained adds transformers_version and dtype).
CHECKPOINT_METADATA_KEYS = ("format", "version", "architectures", "model_type", "auto_map", "transformers_version",
                            "dtype", "torch_dtype")


def model_config_from_json(path: str | Path) -> ModelConfig:
    """Load a checkpoint's ``config.json`` (a ModelConfig, unknown keys rejected)."""
    path = Path(path)
    _check(path.is_file(), f"missing {path.name} in {str(path.parent)!r}: not a looplm checkpoint")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoopLMError(f"{str(path)!r} is not valid JSON ({error.__class__.__name__}):"
                          " the checkpoint is corrupt") from None
    if not isinstance(raw, dict):
        raise LoopLMError(f"{str(path)!r} holds {type(raw).__name__ if raw is not None else 'null'}, not a model"
                          " config mapping: the checkpoint is corrupt")
    raw = {k: v for k, v in raw.items() if k not in CHECKPOINT_METADATA_KEYS}
    return from_dict(ModelConfig, raw, "model")


# Sizes ``ModelConfig`` derives when they are left out, and the fields each is derived from.
DERIVED_SIZES = {"n_kv_heads": ("n_heads",), "ffn_hidden": ("d_model",), "expert_hidden": ("ffn_hidden",),
                 "shared_expert_hidden": ("expert_hidden",), "mla_nope_dim": ("d_model", "n_heads"),
                 "mla_value_dim": ("d_model", "n_heads")}
# Keys a resumed run may change: they steer how long it runs, how it logs and saves, and where it
# runs, not the model, the data or the optimisation (docs/TRAINING.md).
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.save_every",
                     "train.keep_last", "train.log_to", "train.threads", "train.device", "train.parallel")


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Patch a nested run-config dict with dotted keys: {"model.loop_steps": "6"}.  The model
    section and grouped keys (``model.attention.n_heads``) are spelled flat first, so an override
    replaces exactly the setting it names."""
    result = json.loads(json.dumps(raw))
    if isinstance(result.get("model"), dict):
        result["model"] = flat_model_values(result["model"])
    for dotted, value in flat_dotted(overrides).items():
        parts = dotted.split(".")
        _check(len(parts) >= 2 and parts[0] in ("model", "train", "data"),
               f"override {dotted!r} must look like model.KEY, train.KEY or data.KEY")
        node = result.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


def drop_derived(model: dict, changed: set[str]) -> dict:
    """A full model section (e.g. a checkpoint's) without the derived sizes whose base is in
    ``changed``, so they are derived again from the new values.  A size counts as derived when it
    equals what the rest of its config derives for it; a size in ``changed`` stays."""
    result, dropped = dict(model), set()
    for name, bases in DERIVED_SIZES.items():
        if name in changed or name not in model or not set(bases) & (changed | dropped):
            continue
        dependents = {other for other, other_bases in DERIVED_SIZES.items() if name in other_bases}
        reference = from_dict(ModelConfig, {key: value for key, value in model.items()
                                            if key != name and key not in dependents}, "model")
        if getattr(reference, name) == model[name]:
            result.pop(name)
            dropped.add(name)
    return result


def _merge(base: dict, sections: dict) -> dict:
    """``sections`` over ``base``, section by section (a section's keys replace base's keys)."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def _flat(run: RunConfig) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in run.to_dict().items() for key, value in values.items()}


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "data.path" and a and b:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def assemble_run_config(*, preset_name: str | None = None, config_file: str | None = None,
                        source_model: dict | None = None, source_data: dict | None = None,
                        options: dict | None = None, overrides: dict[str, str] | None = None,
                        saved: Any = None, saved_where: str = "run_config.json") -> tuple[RunConfig, bool]:
    """Build a run config in the documented order: preset → config file → the source checkpoint's
    model and data (``--init``/``--upcycle``) → command-line options (``options``, dotted keys such
    as ``data.path``) → dotted ``overrides``.  Returns the config and whether the user chose the
    vocabulary (else the trainer fits it to the tokenizer).

    ``saved`` (``--resume``): the run's saved config is the base; whatever is given again must
    equal it, except ``RESUME_MAY_CHANGE``, else one line names the first difference."""
    dotted = flat_dotted({**(options or {}), **(overrides or {})})
    raw: dict = {}
    if preset_name:
        raw["model"] = preset_values(preset_name)
    if config_file:
        file_config = read_config_file(config_file)
        _check(isinstance(file_config, dict), f"config file {config_file!r} must hold a mapping with model/train/data"
               " sections")
        if isinstance(file_config.get("model"), dict):  # groups spelled flat, so a group merges key by key
            file_config = {**file_config, "model": flat_model_values(file_config["model"])}
        raw = _merge(raw, file_config)
    if source_model is not None and "model" not in raw:
        raw["model"] = drop_derived(source_model, {key[len("model."):] for key in dotted if key.startswith("model.")})
    if source_data is not None and "data" not in raw and not any(key.startswith("data.") for key in dotted):
        raw["data"] = source_data
    given = apply_overrides(raw, dotted)
    if saved is None:
        vocab_given = ("vocab_size" in raw.get("model", {}) and not preset_name) or "model.vocab_size" in dotted
        return RunConfig.from_dict(given), vocab_given
    try:
        run = RunConfig.from_dict(saved)
    except LoopLMError as error:
        raise LoopLMError(f"{saved_where} is damaged ({error}): resume is impossible; train a new run") from None
    requested = RunConfig.from_dict(_merge(saved, given))
    before = _flat(run)
    for key, value in _flat(requested).items():
        if not _same(key, value, before[key]) and key not in RESUME_MAY_CHANGE:
            raise LoopLMError(f"--{key} {value!r} differs from this run's {before[key]!r} (saved in {saved_where}):"
                              " leave it out to resume as saved, or train a new run into another --out")
    return requested, True
