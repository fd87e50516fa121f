"""The contract every model configuration keeps (issue #3): it trains, cached decode equals
the full forward (one and several tokens per call), save → load is identical, steps beyond T
stay finite, and it is causal.  Add a configuration to VARIANTS and it is held to all of it."""


import pytest
import torch

from looplm.cache import KVCache
from looplm.config import FAMILY_PRESETS, TrainConfig, preset
from looplm.generate import Decoder, FixedSteps, QExit
from looplm.model import LoopLM
from looplm.model.loading import load_model
from looplm.model.norms import LayerNorm
from looplm.training.objectives import compute_loss
from looplm.training.trainer import make_optimizer

from conftest import tiny_config

VARIANTS = {
    "ouro": {},
    "additive": {"injection": "additive"},
    "lti": {"injection": "lti", "norm": "pre", "step_norm": False},
    "diagonal": {"injection": "diagonal", "initial_state": "noise"},
    "concat-noise": {"injection": "concat", "initial_state": "noise", "initial_noise_std": 0.5},
    "moe": {"ffn": "moe", "n_experts": 4, "moe_top_k": 2, "expert_hidden": 16, "moe_aux_loss_weight": 0.01},
    "gated-attention": {"attention": "gated", "n_kv_heads": 2, "rope_fraction": 0.25, "rope_theta": 1e7,
                        "zero_centered_norm": True, "norm": "pre"},
    "mla": {"attention": "mla", "mla_kv_rank": 12, "mla_rope_dim": 4},
    "mla-q-rank": {"attention": "mla", "mla_kv_rank": 12, "mla_q_rank": 16, "mla_rope_dim": 6, "norm": "pre"},
    "gdn-hybrid": {"layer_pattern": "GA", "n_prelude_layers": 1, "n_coda_layers": 1},
    "gdn-gated-qexit": {"layer_pattern": "G", "attention": "gated", "zero_centered_norm": True},
    "gdn-memory-caching": {"layer_pattern": "GA", "mc_segment_size": 3, "mc_top_k": 2},
    "gdn-loop-memory": {"layer_pattern": "GA", "n_prelude_layers": 1, "loop_mc": True, "loop_mc_top_k": 1,
                        "loop_mc_detach": False},
    "global-gates": {"global_gates": True, "n_coda_layers": 1},
    "channelmix": {"ffn": "channelmix", "n_prelude_layers": 1, "n_coda_layers": 1},
    "rwkv-slots": {"layer_pattern": "R", "rwkv_slots": 3, "n_prelude_layers": 1},
    "rwkv-hybrid-qexit": {"layer_pattern": "RGA", "n_core_layers": 3, "injection": "additive"},
    "loop-index-lora": {"injection": "additive", "loop_index_embedding": True, "depth_lora_rank": 4,
                        "n_prelude_layers": 1, "n_coda_layers": 1},
    "ternary-core": {"ternary": "core", "n_prelude_layers": 1, "n_coda_layers": 1},
    "ternary-all-hybrid": {"ternary": "all", "layer_pattern": "GA", "ffn": "moe", "n_experts": 4, "expert_hidden": 16},
    "mhc": {"hyper_connections": 3, "n_prelude_layers": 1, "n_coda_layers": 1},
    "mhc-noise-lti": {"hyper_connections": 2, "injection": "lti", "initial_state": "noise", "depth_lora_rank": 4,
                      "loop_index_embedding": True, "norm": "pre", "step_norm": False, "global_gates": True},
    "attnres": {"attnres_block_size": 3, "n_prelude_layers": 1, "n_coda_layers": 1},
    "attnres-gdn": {"attnres_block_size": 2, "layer_pattern": "GA", "norm": "pre", "injection": "additive"},
    "append-first": {"kv_append_first": True, "n_prelude_layers": 1, "n_coda_layers": 1, "n_kv_heads": 2},
    "append-first-mla-channelmix": {"kv_append_first": True, "attention": "mla", "mla_kv_rank": 12,
                                    "mla_rope_dim": 4, "ffn": "channelmix", "layer_pattern": "AG"},
    "layer-norm-embed-norm": {"norm_type": "layer", "embed_norm": True, "tie_embeddings": False, "n_coda_layers": 1},
    "lti-residual-lora-output": {"injection": "lti_residual", "norm": "pre", "step_norm": False,
                                 "loop_index_embedding": True, "depth_lora_rank": 4, "depth_lora_position": "output",
                                 "n_prelude_layers": 1, "initial_state": "noise"},
    "act-mixing-coda": {"act_mixing": True, "norm": "pre", "step_norm": False, "n_coda_layers": 1,
                        "injection": "additive"},
    "moe-core-only-dropout": {"ffn": "moe", "moe_scope": "core", "n_experts": 4, "moe_top_k": 2, "expert_hidden": 16,
                              "shared_expert_hidden": 24, "n_shared_experts": 2, "n_prelude_layers": 1,
                              "n_coda_layers": 1, "dropout": 0.1},
    "mla-own-head-dims-dropout": {"attention": "mla", "mla_kv_rank": 12, "mla_q_rank": 16, "mla_rope_dim": 4,
                                  "mla_nope_dim": 6, "mla_value_dim": 10, "dropout": 0.1, "norm": "pre"},
}


def shrunk(preset_name: str) -> dict:
    """A family preset's mechanics at test size (the fields that set sizes are replaced)."""
    values = preset(preset_name).to_dict()
    sizes = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=min(values["n_kv_heads"], 2) if
                 values["n_kv_heads"] < values["n_heads"] else 4, ffn_hidden=48, max_seq_len=48,
                 n_core_layers=min(values["n_core_layers"], 4 if values["layer_pattern"] else 2),
                 loop_steps=min(values["loop_steps"], 3),
                 n_experts=min(values["n_experts"], 4), expert_hidden=16,
                 depth_lora_rank=min(values["depth_lora_rank"], 4), rwkv_decay_rank=4,
                 mc_segment_size=min(values["mc_segment_size"], 3),
                 shared_expert_hidden=16 if values["shared_expert_hidden"] == values["expert_hidden"] else 24,
                 mla_nope_dim=8, mla_value_dim=8, mla_kv_rank=min(values["mla_kv_rank"], 12),
                 mla_q_rank=min(values["mla_q_rank"], 16), mla_rope_dim=min(values["mla_rope_dim"], 4))
    values.update(sizes)
    return values


VARIANTS.update({f"preset-{name}": shrunk(name) for name in FAMILY_PRESETS})


def build(name: str, seed: int = 0) -> LoopLM:
    torch.manual_seed(seed)
    model = LoopLM(tiny_config(**VARIANTS[name]))
    if model.exit_gate is not None:
        torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    for module in model.modules():  # LayerNorm biases start at zero, which would hide a misplaced bias
        if isinstance(module, LayerNorm):
            torch.nn.init.normal_(module.bias, std=0.1)
    if model.depth_lora is not None:  # the zero-initialised up projection would hide LoRA bugs
        torch.nn.init.normal_(model.depth_lora.up.weight, std=0.3)
    return model.eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_trains_with_falling_loss(name):
    model = build(name).train()
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (4, 17), generator=generator)
    losses = []
    for _ in range(30):
        loss = compute_loss(model(ids[:, :-1]), ids[:, 1:], "stage1").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decode_equals_full_forward(name):
    model = build(name)
    ids = torch.randint(0, 64, (2, 14))
    steps = model.config.loop_steps + 1
    full = model(ids, steps=steps)
    cache = KVCache(model.config, 2, 16, max_steps=steps)
    begin = 0
    for size in (5, 1, 1, 4, 3):  # a prompt, single tokens, several tokens against a filled cache
        part = model(ids[:, begin:begin + size], steps=steps, cache=cache)
        for step in range(1, steps + 1):
            torch.testing.assert_close(part.logits(step), full.logits(step)[:, begin:begin + size],
                                       atol=1e-4, rtol=0)
        begin += size
    decoder = Decoder(model, FixedSteps(steps), 14)
    with torch.no_grad():
        decoder.prefill(ids[:1, :6])
        for position in range(6, 14):
            logits, _ = decoder.step(int(ids[0, position]))
            torch.testing.assert_close(logits, full.logits(steps)[0, position], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_backend_gives_the_reference_tokens(name):
    model = build(name)
    prompt = torch.randint(0, 64, (1, 5))
    tokens = torch.randint(0, 64, (8,)).tolist()
    policy = QExit(0.5) if model.exit_gate is not None else FixedSteps(model.config.loop_steps + 1)
    reference = Decoder(model, policy, 16, backend="reference")
    auto = Decoder(model, policy, 16)
    # every family and feature decodes in C (kernels.native_stepper / runtime_stepper)
    assert auto.backend == "native", auto.backend
    with torch.no_grad():
        reference.prefill(prompt)
        auto.prefill(prompt)
        for token in tokens:
            (expected, expected_steps), (logits, steps) = reference.step(token), auto.step(token)
            assert steps == expected_steps
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_identical_and_deep_extrapolation_finite(name, tmp_path):
    model = build(name)
    ids = torch.randint(0, 64, (1, 9))
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(ids).logits(), model(ids).logits(), atol=0, rtol=0)
    deep = model(ids, steps=4 * model.config.loop_steps)
    assert all(torch.isfinite(state).all() for state in deep.hidden_states)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name, mode):
    """Changing token 7 changes nothing before it, in evaluation and in training mode (where a
    noise start draws fresh noise, from the same seed for both calls, and MoE counts loads)."""
    model = build(name).train(mode == "train")
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 5) % 64
    outputs = []
    for batch in (ids, changed):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(model(batch, steps=5))
    a, b = outputs
    for step in range(1, 6):
        # Equal up to float rounding: MoE runs an expert on a different set of rows when a later
        # token's routing changes, and a matmul's blocking may round differently (a leak would
        # be many orders of magnitude larger).
        torch.testing.assert_close(a.logits(step)[:, :7], b.logits(step)[:, :7], atol=1e-6, rtol=0)
        assert (a.logits(step)[:, 7:] - b.logits(step)[:, 7:]).abs().max() > 1e-3


def test_the_c_runtime_refuses_a_config_key_it_does_not_know(monkeypatch):
    """A key from a newer looplm (a feature the runtime has never heard of) is refused by name, in
    one line, rather than ignored."""
    import json

    from looplm.kernels import load_kernel, runtime_stepper

    if load_kernel() is None:
        pytest.skip("no C compiler")
    model = LoopLM(tiny_config()).eval()
    assert runtime_stepper.runtime_unsupported(model, KVCache(model.config, 1, 16)) is None
    monkeypatch.setattr(runtime_stepper, "_config_json",
                        lambda model: json.dumps({**model.config.to_dict(), "future_feature": 1}).encode())
    reason = runtime_stepper.runtime_unsupported(model, KVCache(model.config, 1, 16))
    assert reason and "future_feature" in reason and "\n" not in reason, reason
