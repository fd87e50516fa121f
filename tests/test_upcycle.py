"""Upcycling: the upcycled model is compared with the source model's own forward.  Where the
plan says the mapping is exact the logits (and gate logits) agree; where it says not, they differ
— so the symbolic exactness check is tested in both directions."""

import json

import pytest
import torch

from looplm.cli import main
from looplm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.loading import load_model
from looplm.training.trainer import Trainer
from looplm.training.upcycle import plan_upcycle, upcycle, upcycle_state_dict


def config(**overrides) -> ModelConfig:
    values = dict(vocab_size=64, d_model=32, n_heads=4, max_seq_len=32)
    values.update(overrides)
    return ModelConfig(**values)


def source_model(seed=0, **overrides) -> LoopLM:
    """A source with non-trivial norms and gate (a fresh model has all-ones norms and a zero gate)."""
    torch.manual_seed(seed)
    model = LoopLM(config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.3)
            elif name.startswith("exit_gate"):
                parameter.normal_(0.0, 0.5)
    return model.eval()


IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def outputs(model, steps):
    output = model(IDS, steps=steps)
    return output.logits(), output.gate_logits[-1] if output.gate_logits is not None else None


def test_non_looped_source_becomes_the_core_and_reproduces_its_logits_at_one_step():
    source = source_model(n_core_layers=4, loop_steps=1)  # a plain 4-layer LM (Ouro-style sandwich + final norm)
    target_config = config(n_core_layers=4, loop_steps=4, tie_embeddings=False)
    target = upcycle(source, target_config).eval()
    assert plan_upcycle(source.config, target_config).source_steps(1) == 1
    logits, gate = outputs(target, 1)
    source_logits, source_gate = outputs(source, 1)
    assert torch.equal(logits, source_logits) and torch.equal(gate, source_gate)
    assert torch.equal(target.head.weight, source.embed.weight)  # a tied source head becomes the untied head
    # More steps run the same stack again: what the source computes when run (untrained) for 2 steps.
    assert plan_upcycle(source.config, target_config).source_steps(2) == 2
    assert torch.equal(outputs(target, 2)[0], outputs(source, 2)[0])


@pytest.mark.parametrize("injection", ["identity", "concat", "lti", "diagonal", "additive"])
def test_new_injection_starts_from_the_input_at_step_one(injection):
    source = source_model(n_core_layers=2, loop_steps=1)
    target = upcycle(source, config(n_core_layers=2, loop_steps=3, injection=injection)).eval()
    exact = plan_upcycle(source.config, target.config).source_steps(1) == 1
    assert exact == (injection != "additive")  # u = h + e doubles the input: no weights can undo it
    close = torch.allclose(outputs(target, 1)[0], outputs(source, 1)[0], atol=1e-5)
    assert close == exact
    if injection == "concat":  # W = [I 0]: the plain loop at every step
        assert torch.allclose(outputs(target, 3)[0], outputs(source, 3)[0], atol=1e-5)


PAIRS = [  # (source overrides, target overrides, order, source steps reproduced at target steps 1, 2, 3)
    (dict(n_core_layers=2, loop_steps=2, norm="pre", step_norm=False),
     dict(n_core_layers=4, loop_steps=1, norm="pre", step_norm=False), "cycle", [2, 4, 6]),  # the loop unrolled
    (dict(n_core_layers=2, loop_steps=2, step_norm=False), dict(n_core_layers=6, step_norm=False), "cycle", [3, 6, 9]),
    # a target step norm closes the unrolled stack like the source's readout norm, but only once
    (dict(n_core_layers=2, loop_steps=2, step_norm=False), dict(n_core_layers=4), "cycle", [2, None, None]),
    # Ouro's per-step norm sits between the source's steps: no unrolled stack reproduces it
    (dict(n_core_layers=2, loop_steps=2), dict(n_core_layers=4, loop_steps=1), "cycle", [None, None, None]),
    (dict(n_core_layers=2, step_norm=False), dict(n_core_layers=4, step_norm=False), "interleave", [None, None, None]),
    (dict(n_core_layers=1, loop_steps=3, step_norm=False), dict(n_core_layers=2, step_norm=False), "interleave",
     [2, 4, 6]),  # one layer: interleave = cycle
    (dict(n_core_layers=4, loop_steps=1), dict(n_prelude_layers=1, n_core_layers=2, n_coda_layers=1), "cycle",
     [None, None, None]),  # the target's step norm falls inside the source's stack
    (dict(n_core_layers=4, loop_steps=1, step_norm=False),
     dict(n_prelude_layers=1, n_core_layers=2, n_coda_layers=1, step_norm=False), "cycle", [1, None, None]),
    # the source injects before each of its steps, the repeated target once per three
    (dict(n_prelude_layers=1, n_core_layers=1, n_coda_layers=1, step_norm=False, injection="lti"),
     dict(n_prelude_layers=1, n_core_layers=3, n_coda_layers=1, step_norm=False, injection="lti"), "cycle",
     [None, None, None]),
    # depth LoRA copied, its scale rows extended past the source's T = 2 by the last row
    (dict(n_core_layers=2, loop_steps=2, step_norm=False, depth_lora_rank=4),
     dict(n_core_layers=2, loop_steps=3, step_norm=False, depth_lora_rank=4), "cycle", [1, 2, 3]),
    (dict(n_core_layers=2, loop_steps=2, step_norm=False, loop_index_embedding=True),
     dict(n_core_layers=4, loop_steps=1, step_norm=False, loop_index_embedding=True), "cycle", [None, None, None]),
]


@pytest.mark.parametrize("source_overrides, target_overrides, order, expected", PAIRS)
def test_the_plan_says_exactly_when_the_logits_match(source_overrides, target_overrides, order, expected):
    source = source_model(**source_overrides)
    if source.depth_lora is not None:
        torch.nn.init.normal_(source.depth_lora.up.weight, std=0.3)  # a trained LoRA adds something
        torch.nn.init.normal_(source.depth_lora.scale, 1.0, 0.5)
    target = upcycle(source, config(**target_overrides), order).eval()
    plan = plan_upcycle(source.config, target.config, order)
    assert [plan.source_steps(steps) for steps in (1, 2, 3)] == expected
    for steps, source_steps in zip((1, 2, 3), expected):
        reference = outputs(source, source_steps or plan.repeat * steps)
        logits, gate = outputs(target, steps)
        if source_steps is None:
            assert not torch.allclose(logits, reference[0], atol=1e-4), steps
        else:
            torch.testing.assert_close(logits, reference[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(gate, reference[1], rtol=0, atol=1e-5)


def test_cycle_and_interleave_layer_order():
    plan = plan_upcycle(config(n_core_layers=2), config(n_core_layers=6), "cycle")
    assert [plan.layers[f"core.{j}"] for j in range(6)] == ["core.0", "core.1"] * 3 and plan.repeat == 3
    plan = plan_upcycle(config(n_core_layers=2), config(n_core_layers=6), "interleave")
    assert [plan.layers[f"core.{j}"] for j in range(6)] == ["core.0"] * 3 + ["core.1"] * 3
    plan = plan_upcycle(config(n_prelude_layers=1, n_core_layers=2), config(n_core_layers=2, n_coda_layers=1))
    assert plan.layers == {"core.0": "prelude.0", "core.1": "core.0", "coda.0": "core.1"} and plan.repeat == 1
    state = upcycle_state_dict(source_model(n_core_layers=2), config(n_core_layers=4))
    source = source_model(n_core_layers=2).state_dict()
    assert torch.equal(state["core.3.attn.qkv.weight"], source["core.1.attn.qkv.weight"])


def test_shapes_that_do_not_map_are_one_line_errors():
    with pytest.raises(LoopLMError, match="model.d_model=32, the target 64"):
        plan_upcycle(config(), config(d_model=64))
    with pytest.raises(LoopLMError, match="cannot map 0\\+2\\+0 prelude\\+core\\+coda source layers onto 0\\+3\\+0"):
        plan_upcycle(config(n_core_layers=2), config(n_core_layers=3))
    with pytest.raises(LoopLMError, match="set --model.tie_embeddings false"):
        plan_upcycle(config(tie_embeddings=False), config())
    with pytest.raises(LoopLMError, match="kind G but its source core.0 is A"):
        plan_upcycle(config(n_core_layers=1), config(n_core_layers=2, layer_pattern="AG"))
    with pytest.raises(LoopLMError, match="not both"):
        TrainConfig(init="a", upcycle_from="b")


def test_trainer_and_cli_start_from_an_upcycled_checkpoint(tmp_path):
    source = source_model(vocab_size=259, n_core_layers=2, loop_steps=1)
    source.save(tmp_path / "source")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello looped world. " * 100)
    target_config = config(vocab_size=259, n_core_layers=2, loop_steps=3)
    run = RunConfig(target_config, TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=0, threads=1,
                                               upcycle_from=str(tmp_path / "source")), DataConfig(path=str(corpus)))
    trainer = Trainer(run, tmp_path / "run", progress=False)
    trainer.model.eval()
    ids = IDS % 259
    with torch.no_grad():
        assert torch.equal(trainer.model(ids, steps=1).logits(), source(ids, steps=1).logits())
    main(["train", "--upcycle", str(tmp_path / "source"), "--data", str(corpus), "--out", str(tmp_path / "cli"),
          "--model.loop_steps", "3", "--model.n_core_layers", "4", "--train.steps", "1", "--train.batch_size", "2",
          "--train.seq_len", "16", "--train.eval_every", "0", "--no-progress"])
    saved = json.loads((tmp_path / "cli" / "run_config.json").read_text())
    assert saved["train"]["upcycle_from"] == str(tmp_path / "source")
    assert saved["model"]["n_core_layers"] == 4 and saved["model"]["d_model"] == 32  # the source's width
    assert load_model(tmp_path / "cli").config.loop_steps == 3
