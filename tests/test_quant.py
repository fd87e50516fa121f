"""Weight-only int8 (Q8_0): the block format against hand-computed values and its error bound,
the C kernel against the dequantise-then-matmul reference, and whole models after quantisation."""

import shutil

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from looplm import quant  # noqa: F401
from looplm.cli import main
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.generate import Decoder, FixedSteps, QExit, generate
from looplm.kernels import ops
from looplm.model import LoopLM
from looplm.quant import Int8Linear, dequantize_q8_0, is_quantized, quantize_model, quantize_q8_0

from conftest import tiny_config


def test_one_block_by_hand():
    weight = torch.stack([(torch.arange(32.0) - 16) * 0.1, torch.zeros(32)])  # a ramp and an all-zero row
    values, scales = quantize_q8_0(weight)
    assert scales[0, 0] == pytest.approx(1.6 / 127) and scales[1, 0] == 0
    # q_i = round((i − 16)·0.1 / (1.6/127)) = round((i − 16)·7.9375)
    assert values[0, 0] == -127 and values[0, 16] == 0 and values[0, 17] == 8 and values[0, 31] == 119
    assert values.dtype == torch.int8 and values[1].abs().max() == 0
    assert torch.equal(dequantize_q8_0(values, scales)[1], torch.zeros(32))


def test_error_within_half_a_step_per_block():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 160, generator=generator) * torch.logspace(-4, 1, 5).repeat_interleave(32)
    values, scales = quantize_q8_0(weight)
    assert scales.shape == (24, 5)
    error = (dequantize_q8_0(values, scales) - weight).abs()
    step = scales.repeat_interleave(32, dim=1)
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert values.abs().max() <= 127
    assert (values.view(24, 5, 32).abs().amax(-1) == 127).all()  # the largest weight of every block hits ±127
    with pytest.raises(LoopLMError, match="multiple of 32"):
        quantize_q8_0(torch.randn(4, 40))


def compiler_present() -> bool:
    return any(shutil.which(name) for name in ("cc", "gcc", "clang"))


@pytest.mark.parametrize("rows, outputs, inputs, bias", [(1, 13, 64, True), (3, 40, 96, False), (4, 7, 32, True),
                                                         (9, 13, 64, True)])
def test_int8_linear_equals_dequantise_then_matmul(rows, outputs, inputs, bias):
    torch.manual_seed(rows)
    layer = Int8Linear.from_linear(nn.Linear(inputs, outputs, bias=bias), activations="float")
    x = torch.randn(2, rows, inputs) if rows == 9 else torch.randn(rows, inputs)
    # Independent reference: W = scale per 32 inputs × int8 value.
    weight = layer.values.float() * layer.scales.repeat_interleave(32, dim=1)
    expected = F.linear(x, weight, layer.bias)
    with torch.no_grad():
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(layer.reference_forward(x), expected, rtol=0, atol=0)
    if compiler_present():
        assert ops.serves(x)  # so the rows <= 4 cases above ran the C kernel


def test_without_the_kernel_the_reference_runs(monkeypatch):
    layer = Int8Linear.from_linear(nn.Linear(64, 5))
    x = torch.randn(1, 64)
    monkeypatch.setattr(ops, "load_kernel", lambda: None)
    assert torch.equal(layer(x), layer.reference_forward(x))


def test_quantize_model_swaps_the_projections_only():
    model = quantize_model(LoopLM(tiny_config(d_model=64, tie_embeddings=False, attention="mla", mla_kv_rank=16,
                                              mla_rope_dim=4)))
    assert is_quantized(model)
    layer = model.core[0]
    assert isinstance(layer.attn.q_proj, Int8Linear) and isinstance(layer.ffn.gate_up, Int8Linear)
    assert isinstance(layer.ffn.down, Int8Linear) and isinstance(layer.attn.out, Int8Linear)
    assert type(layer.attn.kv_up) is nn.Linear  # 16 inputs: not a multiple of 32
    assert type(model.exit_gate) is nn.Linear and type(model.head) is nn.Linear
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)))  # MLA reads kv_up.weight directly: still works


def train_tiny(steps: int = 60, text: str = "the loop reads the loop and the loop repeats. " * 40,
               lr: float = 3e-3) -> LoopLM:
    """A small looped model trained on ``text`` (byte tokens), on one thread: a model this small
    trains fastest there, and a busy machine slows one thread least."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=259, d_model=64, n_core_layers=1, loop_steps=2, max_seq_len=64))
    tokens = torch.tensor(byte_tokenizer().encode(text))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _step in range(steps):
            starts = torch.randint(0, len(tokens) - 33, (8,))
            batch = torch.stack([tokens[start:start + 33] for start in starts])
            loss = F.cross_entropy(model(batch[:, :-1]).logits().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.last_loss = loss.item()  # the last training batch's loss
    return model.eval()


def test_trained_model_loss_barely_moves():
    model = train_tiny()
    batch = torch.tensor(byte_tokenizer().encode("the loop repeats and the loop reads the loop. "))[None]
    with torch.no_grad():
        before = model(batch[:, :-1]).logits()[0]
        quantize_model(model)
        after = model(batch[:, :-1]).logits()[0]
    loss_before, loss_after = (F.cross_entropy(logits, batch[0, 1:]).item() for logits in (before, after))
    assert loss_before < 3.5  # it learned something (ln 259 ≈ 5.6)
    assert 0 < (after - before).abs().max() < 0.01 * before.abs().max()  # the weights did change, a little
    assert abs(loss_after - loss_before) < 0.001 * loss_before


@pytest.mark.parametrize("overrides", [
    {"n_kv_heads": 2, "n_prelude_layers": 1, "n_coda_layers": 1, "norm": "pre", "step_norm": False},
    {"d_model": 96, "n_heads": 3, "ffn_hidden": 80},  # down projection (80 inputs) stays float32
])
def test_int8_native_decode_equals_the_reference_decoder(overrides):
    torch.manual_seed(0)
    # float input: the kernel's products are the reference's (int8 input: tests/test_kernel_precision.py)
    model = quantize_model(LoopLM(tiny_config(**{"d_model": 64, **overrides})).eval(), activations="float")
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    if not compiler_present():
        pytest.skip("no C compiler")
    runs = {}
    for backend in ("native", "reference"):
        decoder = Decoder(model, QExit(0.6), 24, backend=backend)
        assert decoder.backend == backend
        with torch.inference_mode():
            runs[backend] = [decoder.prefill(torch.tensor([[1, 2, 3, 4, 5]]))]
            runs[backend] += [decoder.step(token) for token in (7, 9, 11, 13, 2)]
    for (native_logits, native_steps), (reference_logits, reference_steps) in zip(runs["native"], runs["reference"]):
        assert native_steps == reference_steps
        torch.testing.assert_close(native_logits, reference_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoopLMError, match="torch backend cannot run here: .*int8"):
        Decoder(model, FixedSteps(), 8, backend="torch")


def test_int8_generation_matches_full_forwards():
    model = quantize_model(LoopLM(tiny_config(d_model=64)).eval(), activations="float")
    prompt = [1, 5, 9]
    result = generate(model, prompt, 5, stop_ids=[])
    with torch.no_grad():  # greedy tokens again from full-sequence forwards (the layers' many-row path)
        ids = list(prompt)
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits()[0, -1].argmax()))
    assert result.ids == ids[3:]


def test_cli_generate_and_eval_with_int8(tmp_path, capsys):
    checkpoint = train_tiny(steps=2).save(tmp_path / "ckpt", tokenizer=byte_tokenizer())
    assert main(["generate", str(checkpoint), "--prompt", "the", "--max-new-tokens", "3", "--int8"]) == 0
    assert main(["generate", str(checkpoint), "--prompt", "the", "--int8", "--backend", "torch"]) == 2
    assert "--int8 decodes with the native or reference backend" in capsys.readouterr().err
    corpus = tmp_path / "text.txt"
    corpus.write_text("the loop reads the loop. " * 200)
    assert main(["eval", str(checkpoint), "--data", str(corpus), "--int8", "--steps", "2"]) == 0
    assert "mean exit step" in capsys.readouterr().out
