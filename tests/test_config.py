import json

import pytest
import torch

from looplm.config import ModelConfig, RunConfig, TrainConfig, apply_overrides, preset, read_config_file
from looplm.errors import LoopLMError
from looplm.model import LoopLM


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_the_key():
    with pytest.raises(LoopLMError) as error:
        RunConfig.from_dict({"model": {"loop_step": 3}})
    assert "model.loop_step" in one_line(error)


@pytest.mark.parametrize("values, field", [
    ({"d_model": 30, "n_heads": 4}, "n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ({"loop_steps": 0}, "loop_steps"),
    ({"norm": "post"}, "norm"),
    ({"n_core_layers": 0}, "n_core_layers"),
])
def test_bad_model_values_fail_at_construction(values, field):
    with pytest.raises(LoopLMError) as error:
        ModelConfig(**values)
    assert field in one_line(error)


def test_bad_types_are_reported():
    with pytest.raises(LoopLMError) as error:
        RunConfig.from_dict({"train": {"steps": "many"}})
    assert "train.steps" in one_line(error)
    with pytest.raises(LoopLMError):
        RunConfig.from_dict({"train": {"steps": 2.5}})


def test_dotted_overrides_coerce_strings():
    raw = apply_overrides({"model": {"d_model": 64}}, {"model.loop_steps": "6", "train.lr": "1e-3",
                                                       "model.tie_embeddings": "false"})
    run = RunConfig.from_dict(raw)
    assert run.model.loop_steps == 6 and run.model.d_model == 64
    assert run.train.lr == pytest.approx(1e-3)
    assert run.model.tie_embeddings is False


def test_bad_override_section():
    with pytest.raises(LoopLMError):
        apply_overrides({}, {"optim.lr": "1"})


def test_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  loop_steps: 5\ntrain:\n  steps: 7\n")
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"model": {"loop_steps": 5}, "train": {"steps": 7}}))
    assert RunConfig.from_dict(read_config_file(yaml_file)) == RunConfig.from_dict(read_config_file(json_file))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(LoopLMError) as error:
        read_config_file(broken)
    one_line(error)


def test_run_config_round_trips_through_json():
    run = RunConfig(model=ModelConfig(loop_steps=6), train=TrainConfig(steps=3))
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_presets_and_ouro_parameter_counts():
    with torch.device("meta"):
        small = LoopLM(preset("small"))
        ouro = LoopLM(preset("ouro-1.4b"))
        ouro_big = LoopLM(preset("ouro-2.6b"))
    assert 20e6 < small.num_parameters() < 35e6
    assert 1.3e9 < ouro.num_parameters() < 1.5e9
    assert 2.5e9 < ouro_big.num_parameters() < 2.8e9
    with pytest.raises(LoopLMError):
        preset("huge")


def test_entropy_beta_annealing():
    config = TrainConfig(steps=11, entropy_beta=0.1, entropy_beta_final=0.05)
    assert config.entropy_beta_at(0) == pytest.approx(0.1)
    assert config.entropy_beta_at(5) == pytest.approx(0.075)
    assert config.entropy_beta_at(10) == pytest.approx(0.05)
