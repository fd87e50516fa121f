"""Assembling a run's config in the documented order (preset → config file → source checkpoint
→ command-line options → dotted overrides), reading a checkpoint's ``config.json``, and
re-deriving sizes a change leaves stale."""

from __future__ import annotations

import dataclasses
import json
import shlex
import warnings
from pathlib import Path
from typing import Any

from looplm.config.model import KEY_TYPES, ModelConfig, flat_dotted, flat_model_values, model_differences
from looplm.config.presets import preset_values
from looplm.config.run import RunConfig
from looplm.config.values import check as _check
from looplm.config.values import from_dict, read_config_file
from looplm.errors import JSON_ERRORS, LoopLMError, is_int
from looplm.file_names import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_FILE,
    META_FILE,
    RUN_CONFIG_FILE,
    TOKENIZER_FILE,
)

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
    except JSON_ERRORS as error:
        raise LoopLMError(f"{str(path)!r} is not valid JSON ({error.__class__.__name__}):"
                          " the checkpoint is corrupt") from None
    if not isinstance(raw, dict):
        raise LoopLMError(f"{str(path)!r} holds {type(raw).__name__ if raw is not None else 'null'}, not a model"
                          " config mapping: the checkpoint is corrupt")
    _refuse_hugging_face_config(raw, path.parent)
    _check_format_marker(raw, path)
    raw = {k: v for k, v in raw.items() if k not in CHECKPOINT_METADATA_KEYS}
    _warn_missing_keys(raw, path)
    return from_dict(ModelConfig, raw, "model")


# Model keys added after looplm 0.1 (whose checkpoints lack them): each one's default is what the
# models of 0.1 did, so an older file without them is read right.  A key added later joins them.
KEYS_ADDED_SINCE_0_1 = frozenset({
    "act_mixing", "attnres_block_size", "auto_size", "default_exit", "depth_lora_position", "dropout",
    "embed_norm", "hyper_connections", "kv_append_first", "max_loop_steps", "mc_detach", "min_loop_steps",
    "mla_nope_dim", "mla_value_dim", "moe_scope", "norm_type", "shared_expert_hidden", "ternary"})


def _warn_missing_keys(raw: dict, path: Path) -> None:
    """looplm writes every model key into config.json; keys a file lacks (written by hand or by
    another tool, beyond those older checkpoints lack) take looplm's defaults, which may not be what
    the weights were trained with — a RoPE base or a step norm changes the outputs and no tensor's
    shape: say so."""
    missing = sorted(set(KEY_TYPES) - set(flat_model_values(raw)) - KEYS_ADDED_SINCE_0_1)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        warnings.warn(f"{str(path)!r} lacks {len(missing)} model key(s) ({shown}): they take looplm's defaults;"
                      " if the model was trained with other values, add them to the file", stacklevel=3)


def _check_format_marker(raw: dict, path: Path) -> None:
    """The format marker and version, where the file has them (a config saved by transformers'
    ``save_pretrained`` has neither): another format, or a version newer than this looplm reads,
    is one line instead of a model built from keys it may misread."""
    marker, version = raw.get("format", CHECKPOINT_FORMAT), raw.get("version", CHECKPOINT_VERSION)
    if marker != CHECKPOINT_FORMAT:
        raise LoopLMError(f"{str(path)!r} says format {marker!r}, not {CHECKPOINT_FORMAT!r}: not a looplm checkpoint")
    if not is_int(version) or version < 1:
        raise LoopLMError(f"{str(path)!r}: its version is {version!r}, not a whole number >= 1: the checkpoint is"
                          " corrupt")
    if version > CHECKPOINT_VERSION:
        raise LoopLMError(f"{str(path)!r} uses looplm checkpoint format version {version}; this looplm reads up to"
                          f" {CHECKPOINT_VERSION}: upgrade looplm")


def _refuse_hugging_face_config(raw: dict, directory: Path) -> None:
    """A Hugging Face config (``hidden_size``, no looplm ``d_model``), such as Ouro's: one line
    saying how to convert it, not a list of unknown keys."""
    if "hidden_size" not in raw or "d_model" in raw:
        return
    if raw.get("model_type", "ouro") == "ouro":
        raise LoopLMError(f"{str(directory)!r} is an Ouro (Hugging Face) checkpoint: convert it with looplm convert"
                          f" ouro SRC DST first (here: looplm convert ouro {shlex.quote(str(directory))} DST, then use"
                          " DST)")
    raise LoopLMError(f"{str(directory)!r} is a Hugging Face checkpoint (model_type {raw['model_type']!r}), not a"
                      " looplm one: looplm reads its own checkpoints and converts Ouro ones (looplm convert ouro SRC"
                      " DST)")


# Sizes ``ModelConfig`` derives when they are left out, and the fields each is derived from.
DERIVED_SIZES = {"n_kv_heads": ("n_heads",), "ffn_hidden": ("d_model",), "expert_hidden": ("ffn_hidden",),
                 "shared_expert_hidden": ("expert_hidden",), "mla_nope_dim": ("d_model", "n_heads"),
                 "mla_value_dim": ("d_model", "n_heads")}
SECTIONS = ("model", "train", "data")
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


def read_config_sections(config_file: str) -> dict:
    """A config file's contents, each model/train/data section a mapping (an empty one is left out)."""
    file_config = read_config_file(config_file)
    _check(isinstance(file_config, dict), f"config file {config_file!r} must hold a mapping with model/train/data"
           " sections")
    sections = {}
    for name, values in file_config.items():
        if name in SECTIONS and values is None:  # "train:" with nothing under it
            continue
        _check(name not in SECTIONS or isinstance(values, dict),
               f"section {name!r} of config file {config_file!r} must be a mapping of settings, got"
               f" {type(values).__name__} {values!r}: put each setting on its own line, indented under {name}:")
        sections[name] = values
    return sections


def checkpoint_tokenizer(source: Any) -> Path | None:
    """The tokenizer file of checkpoint directory ``source`` (or of a run directory's newest
    checkpoint), or None."""
    if not isinstance(source, str) or not source:
        return None
    directory = Path(source)
    if not (directory / CONFIG_FILE).is_file():
        steps = [step for step in sorted(directory.glob("checkpoints/step_*")) if (step / CONFIG_FILE).is_file()]
        directory = steps[-1] if steps else directory
    return directory / TOKENIZER_FILE if (directory / TOKENIZER_FILE).is_file() else None


def prepared_tokenizer(path: Any) -> Path | None:
    """The tokenizer file of a prepared data directory (``looplm prepare``), or None for other data."""
    if not isinstance(path, str) or not path:
        return None
    directory = Path(path)
    is_prepared = (directory / META_FILE).is_file() and (directory / TOKENIZER_FILE).is_file()
    return directory / TOKENIZER_FILE if is_prepared else None


def default_tokenizer(raw: dict) -> dict:
    """``raw`` with ``data.tokenizer`` set to the tokenizer its ids must come from, for a run whose
    user chose none: the source checkpoint's (``train.init``/``train.upcycle_from``: its model knows
    no other ids), else a prepared data directory's own.  Without either it stays as it is."""
    data, train = raw.get("data"), raw.get("train")
    if not isinstance(data, dict):
        return raw
    source = (train.get("init") or train.get("upcycle_from")) if isinstance(train, dict) else None
    tokenizer = checkpoint_tokenizer(source) or prepared_tokenizer(data.get("path"))
    return raw if tokenizer is None else {**raw, "data": {**data, "tokenizer": str(tokenizer)}}


def saved_tokenizer(saved: Any) -> Any:
    """A saved run config whose ``data.tokenizer`` is the default "byte" with a prepared directory:
    that directory's own tokenizer, as such a run was trained (configs saved before the default
    named it); anything else as it is."""
    data = saved.get("data") if isinstance(saved, dict) else None
    if not isinstance(data, dict) or data.get("tokenizer", "byte") != "byte":
        return saved
    tokenizer = prepared_tokenizer(data.get("path"))
    return saved if tokenizer is None else {**saved, "data": {**data, "tokenizer": str(tokenizer)}}


def check_init_model(run: RunConfig, source_model: dict, changed_by: list[str], vocab_given: bool) -> None:
    """``--init`` trains the checkpoint's own model: refuse, in one line naming them, the options
    (``changed_by``) that made this run's model another one.  An unchosen vocabulary is left to
    the trainer, which fits it to the tokenizer."""
    source = from_dict(ModelConfig, source_model, "model")
    model = run.model if vocab_given else dataclasses.replace(run.model, vocab_size=source.vocab_size)
    if model == source:
        return
    culprits = " and ".join(changed_by) or "this run's model options"
    one = len(changed_by) == 1
    raise LoopLMError(f"--init {run.train.init!r} trains the checkpoint's own model, but {culprits}"
                      f" {'asks' if one else 'ask'} for another ({model_differences(source, model)}): leave"
                      f" {'it' if one else 'them'} out"
                      " to train the checkpoint's model, or use --upcycle to start from it with more layers or loop"
                      " steps")


def _model_sources(preset_name: str | None, config_file: str | None, file_config: dict, dotted: dict) -> list[str]:
    """What besides a source checkpoint set this run's model: the preset, the config file's model
    section, the --model.* options."""
    sources = [f"--preset {preset_name}"] if preset_name else []
    if "model" in file_config:
        sources.append(f"the model section of {config_file!r}")
    options = [f"--{key}" for key in dotted if key.startswith("model.")]
    if options:
        sources.append(", ".join(options))
    return sources


def assemble_run_config(*, preset_name: str | None = None, config_file: str | None = None,
                        source_model: dict | None = None, source_data: dict | None = None,
                        options: dict | None = None, overrides: dict[str, str] | None = None,
                        saved: Any = None, saved_where: str = RUN_CONFIG_FILE) -> tuple[RunConfig, bool]:
    """Build a run config in the documented order: preset → config file → the source checkpoint's
    model and data (``--init``/``--upcycle``) → command-line options (``options``, dotted keys such
    as ``data.path``) → dotted ``overrides``.  Returns the config and whether the user chose the
    vocabulary (else the trainer fits it to the tokenizer).  A data tokenizer left unchosen is the
    source checkpoint's, else a prepared data directory's own (``default_tokenizer``).

    ``saved`` (``--resume``): the run's saved config is the base; whatever is given again must
    equal it, except ``RESUME_MAY_CHANGE``, else one line names the first difference."""
    dotted = flat_dotted({**(options or {}), **(overrides or {})})
    raw: dict = {}
    file_config: dict = {}
    if preset_name:
        raw["model"] = preset_values(preset_name)
    if config_file:
        file_config = read_config_sections(config_file)
        if "model" in file_config:  # groups spelled flat, so a group merges key by key
            file_config = {**file_config, "model": flat_model_values(file_config["model"])}
        raw = _merge(raw, file_config)
    if source_model is not None and "model" not in raw:
        raw["model"] = drop_derived(source_model, {key[len("model."):] for key in dotted if key.startswith("model.")})
    if source_data is not None and "data" not in raw and not any(key.startswith("data.") for key in dotted):
        raw["data"] = source_data
    given = apply_overrides(raw, dotted)
    if saved is None:
        tokenizer_chosen = "data.tokenizer" in dotted or "tokenizer" in file_config.get("data", {})
        run = RunConfig.from_dict(given if tokenizer_chosen else default_tokenizer(given))
        vocab_given = ("vocab_size" in raw.get("model", {}) and not preset_name) or "model.vocab_size" in dotted
        if source_model is not None and run.train.init:
            check_init_model(run, source_model, _model_sources(preset_name, config_file, file_config, dotted),
                             vocab_given)
        return run, vocab_given
    saved = saved_tokenizer(saved)
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
