"""ModelConfig grouped by concern: groups own their settings, the flat keys and the flat file
format keep working, and code that compares a group with a string fails loudly."""

import dataclasses
import json
from pathlib import Path

import pytest

from looplm.cli import main
from looplm.config import (
    GROUPS,
    AttentionConfig,
    FFNConfig,
    ModelConfig,
    RunConfig,
    apply_overrides,
    preset,
    read_config_file,
)
from looplm.errors import LoopLMError

# Every preset's model section as looplm wrote it before the groups existed (flat dataclass fields).
FLAT = json.loads((Path(__file__).parent / "data" / "flat-model-configs.json").read_text())


@pytest.mark.parametrize("name", sorted(FLAT))
def test_flat_files_written_before_the_groups_load_and_write_back_unchanged(name):
    config = ModelConfig.from_mapping(FLAT[name])
    assert config.to_dict() == FLAT[name]
    assert config == preset(name)


def test_every_setting_lives_in_exactly_one_place():
    keys = ModelConfig.keys()
    assert len(keys) == len(set(keys)) == len(next(iter(FLAT.values())))
    assert set(keys) == set(next(iter(FLAT.values())))
    config = preset("openmythos")
    for key in keys:
        homes = [group for group in GROUPS if key in {f.name for f in dataclasses.fields(GROUPS[group])}]
        top = key in {f.name for f in dataclasses.fields(ModelConfig)} and key not in GROUPS
        named = key in GROUPS  # attention / ffn / norm: the group's kind
        assert len(homes) + top + named == 1, key
        assert config.get(key) == config.to_dict()[key]


def test_flat_names_read_and_write_their_group():
    config = ModelConfig(n_heads=8, d_model=256, attention="mla", ffn="moe", norm="pre", loop_steps=6)
    assert (config.attention.kind, config.attention.n_heads, config.n_heads) == ("mla", 8, 8)
    assert (config.ffn.kind, config.norm.placement, config.loop.loop_steps) == ("moe", "pre", 6)
    config.loop_steps = 3
    assert config.loop.loop_steps == 3
    grouped = ModelConfig(d_model=256, attention=AttentionConfig(kind="mla", n_heads=8), ffn=FFNConfig(kind="moe"),
                          norm="pre", loop={"loop_steps": 6})
    assert grouped == ModelConfig(n_heads=8, d_model=256, attention="mla", ffn="moe", norm="pre", loop_steps=6)
    assert grouped != ModelConfig(n_heads=8, d_model=256, attention="mla", ffn="moe", norm="pre", loop_steps=5)


def test_derived_sizes_are_filled_in_their_group():
    config = ModelConfig(d_model=192, n_heads=6, ffn="moe")
    assert config.attention.n_kv_heads == 6 and config.ffn.ffn_hidden == 512
    assert config.ffn.expert_hidden == config.ffn.shared_expert_hidden == 512
    assert config.attention.mla_nope_dim == config.attention.mla_value_dim == 32


def test_replace_copies_the_groups_instead_of_sharing_them():
    base = preset("tiny")
    changed = dataclasses.replace(base, loop_steps=7, attention="gated")
    assert (changed.loop_steps, changed.attention.kind, base.loop_steps, base.attention.kind) == (7, "gated", 4, "mha")
    assert changed.loop is not base.loop and changed.attention is not base.attention
    changed.n_heads = 2
    assert base.n_heads == 4


def test_comparing_a_group_with_a_string_is_an_error_not_false():
    config = preset("tiny")
    with pytest.raises(TypeError, match=r"compare its \.kind"):
        _ = config.attention == "mha"
    with pytest.raises(TypeError, match=r"compare its \.placement"):
        _ = config.norm != "sandwich"


def test_grouped_mappings_and_their_one_line_errors():
    config = ModelConfig.from_mapping({"d_model": 256, "attention": {"kind": "mla", "n_heads": "8"},
                                       "exit": {"default_exit": "q:0.5"}})
    assert (config.attention.kind, config.n_heads, config.default_exit) == ("mla", 8, "q:0.5")
    with pytest.raises(LoopLMError, match="model.n_heads is given twice"):
        ModelConfig.from_mapping({"n_heads": 4, "attention": {"n_heads": 8}})
    with pytest.raises(LoopLMError, match="unknown config key model.attention.heads: valid keys are kind,"):
        ModelConfig.from_mapping({"attention": {"heads": 8}})
    with pytest.raises(LoopLMError, match="model.loop_steps must be an integer"):
        ModelConfig.from_mapping({"loop": {"loop_steps": "many"}})
    with pytest.raises(LoopLMError, match="model.n_heads=3 must divide model.d_model=128"):
        ModelConfig.from_mapping({"attention": {"n_heads": 3}})


def test_dotted_overrides_take_flat_and_grouped_keys(tmp_path):
    raw = apply_overrides({"model": {"attention": "gated"}}, {"model.attention.n_heads": "8", "model.loop_steps": "3"})
    run = RunConfig.from_dict(raw)
    assert (run.model.attention.kind, run.model.n_heads, run.model.loop_steps) == ("gated", 8, 3)
    path = tmp_path / "grouped.yaml"
    path.write_text("model:\n  d_model: 64\n  attention: {kind: gated, n_heads: 2}\n  ffn: {ffn_hidden: 96}\n")
    run = RunConfig.from_dict(read_config_file(path))
    assert (run.model.attention.kind, run.model.n_heads, run.model.ffn_hidden) == ("gated", 2, 96)
    saved = run.to_dict()["model"]
    assert saved["attention"] == "gated" and saved["n_heads"] == 2  # saved flat, as before


def test_grouped_config_file_trains_from_the_command_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  d_model: 32\n  n_core_layers: 1\n  max_seq_len: 64\n"
                      "  attention: {n_heads: 2}\n  loop: {loop_steps: 2}\n"
                      "train: {steps: 2, batch_size: 2, seq_len: 16, eval_every: 0, log_every: 1}\n"
                      "data: {task: binding}\n")
    code = main(["train", "--config", str(config), "--model.attention.n_kv_heads", "1", "--out", str(tmp_path / "run")])
    assert code in (0, None)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())["model"]
    assert (saved["n_heads"], saved["n_kv_heads"], saved["loop_steps"], saved["d_model"]) == (2, 1, 2, 32)
    assert "attention" in saved and saved["attention"] == "mha"


def test_a_group_merges_key_by_key_over_a_preset_a_file_and_the_command_line(tmp_path):
    from looplm.config import assemble_run_config

    path = tmp_path / "grouped.yaml"
    path.write_text("model:\n  attention: {n_heads: 8}\n  loop: {loop_steps: 3}\n")
    # the preset's gated attention keeps its kind; the file's group changes only n_heads
    run, _ = assemble_run_config(preset_name="loopcached", config_file=str(path))
    assert (run.model.attention.kind, run.model.n_heads, run.model.loop_steps) == ("gated", 8, 3)
    run, _ = assemble_run_config(preset_name="loopcached", config_file=str(path),
                                 overrides={"model.n_heads": "4", "model.attention.rope_theta": "1e5"})
    assert (run.model.attention.kind, run.model.n_heads, run.model.rope_theta) == ("gated", 4, 1e5)
    with pytest.raises(LoopLMError, match="unknown config key model.attention.heads"):
        assemble_run_config(preset_name="tiny", overrides={"model.attention.heads": "2"})


def test_resume_takes_grouped_keys_and_names_a_difference_by_its_flat_key(tmp_path):
    from looplm.config import assemble_run_config

    saved = RunConfig.from_dict({"model": {"d_model": 64, "n_heads": 4, "attention": "gated"},
                                 "data": {"task": "binding"}}).to_dict()
    run, _ = assemble_run_config(overrides={"model.attention.n_heads": "4", "train.steps": "50"}, saved=saved)
    assert (run.model.attention.kind, run.model.n_heads, run.train.steps) == ("gated", 4, 50)
    with pytest.raises(LoopLMError, match=r"--model.n_heads 8 differs from this run's 4"):
        assemble_run_config(overrides={"model.attention.n_heads": "8"}, saved=saved)


def test_the_training_guide_config_example_builds():
    import yaml

    guide = (Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md").read_text()
    raw = yaml.safe_load(guide.split("```yaml\n", 1)[1].split("```", 1)[0])
    run = RunConfig.from_dict({**raw, "data": {"task": "binding"}})
    assert (run.model.attention.kind, run.model.n_heads, run.model.loop_steps) == ("gated", 8, 6)
