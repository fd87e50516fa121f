"""The faithful ``openmythos`` configuration against the ``open-mythos`` package itself: its model
built at a small size with every weight perturbed, copied into looplm (looplm.interop.openmythos),
logits compared at several loop counts (eval mode, dropout off) within 1e-4, for MLA and GQA.
Skipped when the package is absent (CI installs it: .ci/run)."""

import pytest
import torch

open_mythos = pytest.importorskip("open_mythos")

from looplm.interop.openmythos import config_from_mythos, from_openmythos  # noqa: E402


def mythos_config(attention: str, **overrides):
    values = dict(vocab_size=50, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32, max_loop_iters=4,
                  prelude_layers=1, coda_layers=2, attn_type=attention, kv_lora_rank=16, q_lora_rank=24,
                  qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, n_experts=4, n_shared_experts=2,
                  n_experts_per_tok=2, expert_dim=16, act_threshold=0.9, rope_theta=10000.0, lora_rank=4,
                  dropout=0.1)
    values.update(overrides)
    return open_mythos.MythosConfig(**values)


SCALE = 0.15  # larger weights amplify float32 rounding towards the tolerance (1e-4 at 0.3)


def perturbed(config, seed: int = 0):
    """The package's model with every parameter and the router bias moved well away from its
    initialisation (norm scales near 1, LTI parameters around their start), so that every part
    — halting, LoRA, injection, shared and routed experts — changes the logits."""
    torch.manual_seed(seed)
    model = open_mythos.OpenMythos(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            elif "injection" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
            else:
                parameter.copy_(SCALE * torch.randn_like(parameter))
        for module in model.modules():
            if isinstance(module, open_mythos.MoEFFN):
                module.router_bias.copy_(0.5 * torch.randn_like(module.router_bias))
    return model.eval()


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_logits_equal_the_package_at_several_loop_counts(attention):
    source = perturbed(mythos_config(attention))
    model = from_openmythos(source)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, steps=6)
        halted = []
        for loops in (1, 2, 3, 4, 6):
            theirs = source(ids, n_loops=loops)
            torch.testing.assert_close(ours.logits(loops), theirs, atol=1e-4, rtol=0)
            halted.append(ours.exit_probs[:loops].sum(0).ge(0.9).float().mean().item())
    assert 0 < halted[1] < halted[-1] <= 1, halted  # some positions halt early, others later: ACT is exercised
    assert model.config.dropout == 0.1


def test_the_parity_is_not_vacuous():
    """Each OpenMythos-specific choice, switched back to looplm's, moves the logits far beyond
    the parity tolerance (so the parity above depends on all of them)."""
    source = perturbed(mythos_config("mla"))
    faithful = from_openmythos(source)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(2))
    state = faithful.state_dict()
    with torch.no_grad():
        expected = source(ids, n_loops=3)
        for change in (dict(depth_lora_position="input"), dict(act_mixing=False), dict(moe_scope="all"),
                       dict(injection="lti")):
            from looplm.model import LoopLM

            config = config_from_mythos(source.cfg)
            config = type(config)(**{**config.__dict__, **change})
            variant = LoopLM(config).eval()
            variant.load_state_dict({name: tensor for name, tensor in state.items()
                                     if name in variant.state_dict()
                                     and variant.state_dict()[name].shape == tensor.shape}, strict=False)
            difference = (variant(ids, steps=3).logits(3) - expected).abs().max().item()
            assert difference > 1e-2, (change, difference)
