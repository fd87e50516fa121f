"""Mistakes made through the Python API get one ``LoopLMError`` line, never a crash, another
exception from deep inside, or a silent wrong result — in particular never a token id or a
position past what the C paths index (they would read or write out of bounds)."""

from __future__ import annotations

import pytest
import torch

from looplm.batch import generate_batch
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.exit_policy import FixedSteps, QExit
from looplm.generate import BatchSession, Decoder, Generation, Settings, generate, stream
from looplm.model import LoopLM

from conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LoopLM(tiny_config()).eval()  # vocabulary 64, context 48, 3 loop steps


@pytest.mark.parametrize("backend", ["native", "torch", "reference"])
@pytest.mark.parametrize("bad", [64, -1, 10**6])
def test_a_token_id_outside_the_vocabulary_is_refused_on_every_backend(model, backend, bad):
    with pytest.raises(LoopLMError, match=f"token id {bad}, outside the model's vocabulary"):
        generate(model, [1, bad], 2, backend=backend)
    decoder = Decoder(model, FixedSteps(), 8, backend=backend)
    decoder.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(LoopLMError, match=f"token id {bad}"):
        decoder.step(bad)
    assert decoder.step(3)[1] == 3  # the decoder goes on


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_a_decoder_never_writes_past_its_positions(model, backend):
    decoder = Decoder(model, FixedSteps(), 4, backend=backend)
    decoder.prefill(torch.tensor([[1, 2, 3]]))
    decoder.step(4)
    with pytest.raises(LoopLMError, match="positions are all used"):
        decoder.step(5)
    with pytest.raises(LoopLMError, match="the model's context"):
        Decoder(model, FixedSteps(), 100, backend=backend)
    fresh = Decoder(model, FixedSteps(), 8, backend=backend)
    with pytest.raises(LoopLMError, match="after prefill"):
        fresh.step(1)
    with pytest.raises(LoopLMError, match=r"shape \[1, S\]"):
        fresh.prefill(torch.tensor([[1, 2], [3, 4]]))
    fresh.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(LoopLMError, match="already holds a sequence"):
        fresh.prefill(torch.tensor([[1, 2]]))


def test_the_depth_rules_hold_in_the_api_as_on_the_command_line(model):
    with pytest.raises(LoopLMError, match=r"min_steps \(5\) exceeds the 3 loop steps"):
        generate(model, [1, 2], 2, exit_policy=QExit(0.5, min_steps=5))
    with pytest.raises(LoopLMError, match="steps must be at most 12"):
        generate_batch(model, [[1, 2]], 2, exit_policy=FixedSteps(100))


def test_per_prompt_lists_must_match_the_prompts(model):
    session = BatchSession(model, 4, 16)
    for bad in ({"limits": [3]}, {"limits": [3, 3], "settings": [Settings()]},
                {"limits": [3, 3], "on_tokens": [None]}, {"limits": [3, 3], "results": [Generation()]}):
        with pytest.raises(LoopLMError, match="for 2 prompts: give one per prompt"):
            session.admit([[1, 2], [3, 4]], **bad)
    with pytest.raises(LoopLMError, match="limits must be ints >= 0"):
        session.admit([[1, 2]], [-5])
    with pytest.raises(LoopLMError, match="for 3 prompts"):
        generate_batch(model, [[1], [2], [3]], 3, settings=[Settings()])
    assert session.free_slots == 4  # nothing was admitted on the way


def test_a_generation_to_fill_must_be_new(model):
    result = Generation()
    list(stream(model, [1, 2], 3, result=result))
    assert len(result.ids) == 3
    with pytest.raises(LoopLMError, match="already holds tokens"):
        list(stream(model, [7, 8], 3, result=result))


def test_stop_strings_are_strings_and_need_a_tokenizer(model):
    assert Settings(stop="ab").stop == ("ab",)  # one stop string, not its characters
    with pytest.raises(LoopLMError, match="must be strings"):
        Settings(stop=[5])
    with pytest.raises(LoopLMError, match="give the tokenizer"):
        BatchSession(model, 1, 16, stop_strings=["x"])
    with pytest.raises(LoopLMError, match="unknown layout"):
        Settings(layout="bogus")
    with pytest.raises(LoopLMError, match="sampling must be a Sampling"):
        Settings(sampling=0.5)
    assert Settings(exit_policy="q:0.5").exit_policy == QExit(0.5)


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(model):
    with pytest.raises(LoopLMError, match="259 ids but the model only 64"):
        generate(model, [1, 2], 2, tokenizer=byte_tokenizer())


def test_save_never_removes_a_users_file_and_refuses_inference_only_models(tmp_path):
    from looplm.quant import quantize_model

    model = LoopLM(tiny_config())
    target = tmp_path / "ckpt"
    model.save(target)
    for name in ("vocab_notes.txt", "merges_backup.txt", "tokenizer_experiments.py"):
        (target / name).write_text("mine")
        with pytest.raises(LoopLMError, match=f"holds {name}"):
            model.save(target)
        (target / name).unlink()
    model.save(target)  # its own files only: replaced
    with pytest.raises(LoopLMError, match="save the trained float32 model"):
        quantize_model(LoopLM(tiny_config())).save(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_smaller_api_mistakes_are_one_line(model):
    from looplm.exit_policy import parse_exit
    from looplm.training.upcycle import plan_upcycle

    output = model(torch.tensor([[1, 2, 3]]))
    for step in (0, -1, 4):  # step 0 had returned the last step's logits, -1 the one before it
        with pytest.raises(LoopLMError, match="step must be in 1..3"):
            output.logits(step)
    assert torch.equal(output.logits(3), output.logits())
    assert parse_exit(QExit(0.5), steps=5) == QExit(0.5, steps=5)  # the steps asked for are not dropped
    with pytest.raises(LoopLMError, match="min_steps applies to the early exits"):
        parse_exit(FixedSteps(), min_steps=2)
    with pytest.raises(LoopLMError, match="exit q has no thresh"):
        parse_exit({"name": "q", "thresh": 0.5})
    with pytest.raises(LoopLMError, match="takes numbers"):
        parse_exit({"name": "q", "threshold": "0.5"})
    with pytest.raises(LoopLMError, match="cycle or interleave"):
        plan_upcycle(model.config, model.config, order="bogus-order")


def test_loading_converting_and_tokenizer_training_mistakes(tmp_path):
    import looplm
    from looplm.data.tokenizer import train_bpe
    from looplm.interop.safetensors_io import write_tensors

    with pytest.raises(LoopLMError, match="got one string"):
        train_bpe("some text", 300)  # had trained on its characters as texts
    with pytest.raises(LoopLMError, match="max_shard_bytes must be"):
        write_tensors({"a": torch.zeros(2)}, tmp_path, max_shard_bytes=-1)  # had written a shard per tensor
    checkpoint = LoopLM(tiny_config()).save(tmp_path / "ckpt")
    with pytest.raises(LoopLMError, match="unknown device 'gpu'"):  # had blamed the file
        looplm.load(checkpoint, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(LoopLMError, match="CUDA is not available"):
            looplm.load(checkpoint, device="cuda")


def test_a_model_config_built_in_python_checks_its_types():
    """``ModelConfig(**kwargs)`` takes values as they are (files and the command line coerce): a
    string where a bool belongs had been truthy, a float count accepted."""
    from looplm.config import ModelConfig

    for bad, words in (({"exit_gate": "false"}, "model.exit_gate must be bool"),
                       ({"tie_embeddings": "no"}, "model.tie_embeddings must be bool"),
                       ({"loop_steps": 2.5}, "model.loop_steps must be int"),
                       ({"vocab_size": 64.0}, "model.vocab_size must be int"),
                       ({"loop_stepz": 3}, "unknown config key model.loop_stepz")):
        with pytest.raises(LoopLMError, match=words):
            ModelConfig(**bad)
    assert ModelConfig(init_std=1).init_std == 1  # an int where a float belongs is a number


def test_sampling_types_stream_options_and_resuming_nothing(tmp_path):
    from looplm.config import RunConfig, TrainConfig
    from looplm.generate import Sampling
    from looplm.serve.protocol import CompletionRequest
    from looplm.training.trainer import Trainer

    for bad in ({"temperature": "0.5"}, {"top_k": 2.5}, {"top_p": "0.9"}, {"seed": 1.5}):
        with pytest.raises(LoopLMError, match="must be a number"):
            Sampling(**bad)
    with pytest.raises(Exception, match="include_usage"):  # typed: "no" is not true (pydantic's 400)
        CompletionRequest(prompt="a", stream_options={"include_usage": "no"})
    assert CompletionRequest(prompt="a", stream_options={"include_usage": True}).include_usage
    missing = tmp_path / "never-trained"
    with pytest.raises(LoopLMError, match="nothing to resume"):
        Trainer(RunConfig(train=TrainConfig(steps=1)), missing, resume=True)
    assert not missing.exists()  # nothing was created on the way


def test_generate_batch_says_when_settings_override_its_arguments(model):
    with pytest.warns(UserWarning, match="arguments are ignored"):
        result = generate_batch(model, [[1, 2]], 2, exit_policy=FixedSteps(2), settings=[Settings(FixedSteps(3))])
    assert result.per_row_steps == [[3, 3]]


def test_forward_and_loss_mistakes_are_one_line(model):
    """The model's own forward and the objective name a wrong input instead of failing deep in
    torch (or, for a negative backprop_steps or a NaN weight, giving no gradient or a NaN loss)."""
    from looplm.training.objectives import compute_loss

    ids = torch.tensor([[1, 2, 3]])
    for bad, message in ((torch.tensor([1, 2, 3]), "1-D torch.int64"), (ids.float(), "2-D torch.float32"),
                         ([[1, 2]], "got list"), (torch.tensor([[1, 64]]), "token id 64"),
                         (torch.tensor([[-3, 1]]), "token id -3")):
        with pytest.raises(LoopLMError, match=message):
            model(bad)
    for steps in (0, 2.5, True):
        with pytest.raises(LoopLMError, match="steps must be an int >= 1"):
            model(ids, steps=steps)
    with pytest.raises(LoopLMError, match="backprop_steps must be an int >= 0"):
        model(ids, backprop_steps=-1)
    output = model(ids)
    with pytest.raises(LoopLMError, match=r"targets must be a \[1, 3\] tensor"):
        compute_loss(output, torch.tensor([2, 3, 4]))
    with pytest.raises(LoopLMError, match="targets hold 99"):
        compute_loss(output, torch.tensor([[2, 99, -100]]))
    with pytest.raises(LoopLMError, match="entropy_beta must be a finite number"):
        compute_loss(output, torch.tensor([[2, 3, -100]]), entropy_beta=float("nan"))
    assert torch.isfinite(compute_loss(output, torch.tensor([[2, 3, -100]])).loss)
    for threshold in (float("nan"), 0, 1.5):
        with pytest.raises(LoopLMError, match=r"ACT threshold must be a number in \(0, 1\]"):
            output.act(threshold)
    model.train()
    try:  # in training the ids' values are not read (a host sync per step); their shape still is
        with pytest.raises(LoopLMError, match="1-D"):
            model(torch.tensor([1, 2]))
    finally:
        model.eval()


def test_one_device_resolver_names_the_option_and_the_fix(monkeypatch):
    from looplm.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda:1", cuda_falls_back=True) == torch.device("cpu")
    with pytest.raises(LoopLMError, match=r"^train.device 'cuda': CUDA is not available here; use --train.device cpu$"):
        resolve_device("cuda", "train.device", "use --train.device cpu")
    with pytest.raises(LoopLMError, match="unknown device 'tpu0': use cpu, cuda, cuda:N or auto"):
        resolve_device("tpu0")
