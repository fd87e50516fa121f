"""nanochat's adaptive loop: the perplexity-threshold exit policy, and the least/most loop steps
and exit policy a model records (config, GGUF metadata) and decoders honour when none is named."""

import pytest
import torch

import looplm
from looplm.cli import main
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.exit_policy import (
    FixedSteps,
    PerplexityExit,
    default_exit_policy,
    exit_steps,
    make_exit_policy,
    parse_exit_policy,
    readout_perplexity,
)
from looplm.generate import Decoder, generate
from looplm.model import LoopLM

from conftest import tiny_config


def test_perplexity_is_the_exponentiated_entropy():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-9, 1e-9]]))
    entropy = -(0.5 * torch.log(torch.tensor(0.5)) + 2 * 0.25 * torch.log(torch.tensor(0.25)))
    torch.testing.assert_close(readout_perplexity(logits), torch.stack([entropy.exp(), torch.tensor(1.0)]),
                               atol=1e-5, rtol=1e-5)
    assert readout_perplexity(torch.zeros(7)).item() == pytest.approx(7.0)  # uniform over V: V


def test_rule_exits_below_the_threshold_after_min_steps():
    sure, unsure = torch.tensor([10.0, 0.0, 0.0, 0.0]), torch.zeros(4)  # perplexities ≈ 1.0, 4.0
    policy = PerplexityExit(2.0, min_steps=2)
    perplexity = readout_perplexity(torch.stack([sure, unsure]))
    exits, _ = PerplexityExit.decide([policy] * 2, torch.tensor([0, 0]), perplexity,
                                     torch.zeros(2, dtype=torch.float64))
    assert exits.tolist() == [True, False]
    # the exit loop's decision: not before min_steps, then the first step below the threshold
    assert exit_steps(policy, 4, 2, lambda step: perplexity).tolist() == [2, 4]
    assert make_exit_policy(ppl=3.0, steps=5, min_steps=2) == PerplexityExit(3.0, 5, 2)
    assert parse_exit_policy("ppl:3", steps=6, min_steps=2) == PerplexityExit(3.0, 6, 2)
    with pytest.raises(LoopLMError):
        PerplexityExit(0.0)
    with pytest.raises(LoopLMError, match="one exit policy"):
        make_exit_policy(q=0.5, ppl=2.0)


def test_decoder_exits_where_the_full_forward_says():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(loop_steps=4)).eval()
    with torch.no_grad():  # sharpen the readouts so perplexity varies a lot across steps and tokens
        model.embed.weight.mul_(40)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        output = model(ids)
        perplexity = torch.stack([readout_perplexity(output.logits(step)[0]) for step in range(1, 5)])  # [T, S]
    threshold = float(perplexity[:3].median())
    below = perplexity < threshold
    below[-1] = True
    expected = below.long().argmax(0) + 1
    assert len(set(expected[4:].tolist())) > 1  # the test exercises several exit steps
    decoder = Decoder(model, PerplexityExit(threshold), 12, layout="full")  # full: every step as the forward
    with torch.no_grad():
        steps = [decoder.prefill(ids[:, :5])[1]] + [decoder.step(int(token))[1] for token in ids[0, 5:]]
    assert steps == expected[4:].tolist()


def _adaptive(tmp_path):
    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=259, loop_steps=3))
    return model.save(tmp_path / "ckpt", byte_tokenizer()), model


def test_config_defaults_drive_decoding():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(default_exit="ppl:1000", min_loop_steps=2, max_loop_steps=5)).eval()
    assert default_exit_policy(model.config) == PerplexityExit(1000.0, 5, 2)
    # Every token is below a perplexity of 1000 (the vocabulary has 64): it exits at min_steps.
    assert generate(model, [1, 2, 3], 4).steps == [2, 2, 2, 2]
    assert generate(model, [1, 2, 3], 4, exit_policy=FixedSteps()).steps == [3, 3, 3, 3]
    assert default_exit_policy(tiny_config()) == FixedSteps()
    with pytest.raises(LoopLMError, match="min_loop_steps"):
        tiny_config(min_loop_steps=4, max_loop_steps=3)
    with pytest.raises(LoopLMError, match="unknown exit policy"):
        tiny_config(default_exit="sometimes")


def test_gguf_records_min_max_steps_and_loading_honours_them(tmp_path, capsys):
    pytest.importorskip("gguf")
    from looplm.interop.gguf import export_gguf, read_metadata

    checkpoint, model = _adaptive(tmp_path)
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(checkpoint), str(out), "--exit", "ppl:1000", "--min-steps", "2",
                 "--max-steps", "5"]) == 0
    metadata = read_metadata(out)
    assert (metadata["looplm.loop.min_steps"], metadata["looplm.loop.max_steps"]) == (2, 5)
    assert metadata["looplm.loop.exit_policy"] == "ppl:1000"
    assert metadata["looplm.loop.perplexity_threshold"] == pytest.approx(1000.0)
    loaded = looplm.load(out)
    assert default_exit_policy(loaded.config) == PerplexityExit(1000.0, 5, 2)
    assert generate(loaded, [1, 2, 3], 4).steps == [2, 2, 2, 2]
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "3", "--show-steps"]) == 0
    assert "steps per token: [2, 2, 2]" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "3", "--show-steps",
                 "--exit-ppl", "1000"]) == 0  # a named policy replaces the recorded one
    assert "steps per token: [1, 1, 1]" in capsys.readouterr().err
    plain = read_metadata(export_gguf(model, tmp_path / "plain.gguf"))
    assert (plain["looplm.loop.min_steps"], plain["looplm.loop.max_steps"]) == (1, 3)
    assert main(["export", "gguf", str(checkpoint), str(tmp_path / "bad.gguf"), "--min-steps", "0"]) == 2
    # --min-steps alone sets the recorded policy's least steps (it was once dropped without a word)
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "3", "--show-steps",
                 "--min-steps", "3"]) == 0
    assert "steps per token: [3, 3, 3]" in capsys.readouterr().err


def test_min_steps_is_never_dropped_silently(tmp_path, capsys):
    """--min-steps applies to an early exit: with the model's recorded one it sets that policy's
    least steps; with fixed steps (named, or the policy the model records) it is one line, exit 2."""
    config = tiny_config(default_exit="ppl:1000", min_loop_steps=2, max_loop_steps=5)
    assert make_exit_policy(min_steps=4, config=config) == PerplexityExit(1000.0, 5, 4)
    assert make_exit_policy(config=config) == PerplexityExit(1000.0, 5, 2)
    assert make_exit_policy(q=0.5, config=config).min_steps == 1  # a named policy replaces the recorded one
    assert make_exit_policy(steps=4, config=config) == FixedSteps(4)
    for bad in ({"steps": 4, "min_steps": 2}, {"min_steps": 2, "config": tiny_config()}):
        with pytest.raises(LoopLMError, match="early exit"):
            make_exit_policy(**bad)
    with pytest.raises(LoopLMError, match="not static"):
        parse_exit_policy("static", min_steps=2)
    with pytest.raises(LoopLMError, match="not act"):
        parse_exit_policy("act", min_steps=3)
    checkpoint, _ = _adaptive(tmp_path)  # records fixed steps
    for options in (["--min-steps", "2"], ["--steps", "3", "--min-steps", "2"]):
        capsys.readouterr()
        assert main(["generate", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "2", *options]) == 2
        error = capsys.readouterr().err.strip()
        assert "--min-steps" in error and error.count("\n") == 0, error
