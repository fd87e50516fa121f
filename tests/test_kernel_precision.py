"""The C kernel's reduced-precision projections against their references, on every build this CPU
can run: the native one (-march=native: vdpbf16ps, vpdpbusd where the CPU has them), AVX2 only,
AVX2 + AVX-VNNI, and the portable scalar build — so the fallbacks a CPU without the instructions
runs are tested on this machine too (``LOOPLM_NATIVE_TARGET``).

Bounds (docs/INTEROP.md), u = 2⁻⁸ (bf16's unit roundoff), n = the row length:
- bf16:  |y − W·x| ≤ (2u + u² + 1.01·n·2⁻²⁴)·Σ|W||x|;  against the same bf16-rounded operands
  summed exactly, only float32 summation: 1.01·n·2⁻²⁴·Σ|W̃||x̃|.
- Q8_0 × Q8_0: against its own float64 reference (same quantised input), float32 summation only;
  against the dequantise-then-matmul reference, + Σ_b (d_b/2)·Σ_{i∈b}|W_i| with d_b = max|x_b|/127.
"""

import copy

import pytest
import torch

import looplm.cpu
from looplm.bf16 import bf16_weights
from looplm.cpu import cpu_flags
from looplm.generate import Decoder, FixedSteps
from looplm.kernels import build, ops
from looplm.model import LoopLM
from looplm.quant import Int8Linear, q8_matmul_reference, quantize_model, quantize_q8_0

from conftest import tiny_config

TARGETS = ["native", "avx2,fma", "avx2,fma,avxvnni", "portable"]
U = 2.0 ** -8
SHAPES = [(1, 1), (3, 7), (4, 32), (5, 33), (9, 100), (13, 257), (8, 768)]


@pytest.fixture(params=TARGETS)
def kernel(request, monkeypatch) -> dict[str, str]:
    """The kernel built for one target; returns its SIMD paths (``build.simd_paths``)."""
    target = request.param
    lacking = [build.TARGET_FEATURES[name] for name in target.split(",") if name in build.TARGET_FEATURES
               and build.TARGET_FEATURES[name] not in cpu_flags()]
    if lacking:
        pytest.skip(f"this CPU lacks {', '.join(lacking)}: the {target} build cannot run here")
    monkeypatch.setenv("LOOPLM_NATIVE_TARGET", target)
    monkeypatch.setattr(build, "_state", {})
    if build.load_kernel() is None:
        pytest.skip(build.unavailable_reason())
    paths = build.simd_paths()
    if target == "portable":
        assert set(paths.values()) == {"scalar"}, paths
    return paths


def operands(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 2, cols).roll(seed)  # mixed scales
    return weight, torch.randn(cols, generator=generator) * 3


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_bf16_projection_within_its_bound(kernel, rows, cols):
    weight, x = operands(rows, cols, rows + cols)
    weight_bf16 = weight.to(torch.bfloat16)
    for threads in (1, 3):
        y = ops.bf16_matvec(weight_bf16, x, threads).double()
        # the same bf16 operands, summed exactly: only float32 summation differs
        rounded = ops.bf16_matvec_reference(weight_bf16, x)
        scale = weight_bf16.double().abs() @ x.to(torch.bfloat16).double().abs()
        assert ((y - rounded).abs() <= 1.01 * cols * 2.0 ** -24 * scale + 1e-30).all(), kernel
        # against the float32 weights and input: the documented bound of the bf16 form
        exact = weight.double() @ x.double()
        bound = (2 * U + U * U + 1.01 * cols * 2.0 ** -24) * (weight.double().abs() @ x.double().abs())
        assert ((y - exact).abs() <= bound).all(), kernel


def test_bf16_input_rounding_is_torchs(kernel):
    """One-hot rows read x back through the kernel's rounding: ties go to even, as in torch."""
    x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.14159, 1e-3, -2.5e7, 0.0, 1 + 2 ** -9] * 5)
    eye = torch.eye(len(x)).to(torch.bfloat16)
    assert torch.equal(ops.bf16_matvec(eye, x), x.to(torch.bfloat16).float())


@pytest.mark.parametrize("rows, outputs, blocks", [(1, 13, 1), (2, 40, 3), (4, 7, 2), (3, 64, 24)])
def test_q8_int8_products_within_their_bound(kernel, rows, outputs, blocks):
    torch.manual_seed(rows * outputs)
    inputs = 32 * blocks
    layer = Int8Linear.from_linear(torch.nn.Linear(inputs, outputs), activations="int8")
    x = torch.randn(rows, inputs) * torch.logspace(-2, 1, inputs)
    if blocks > 1:
        x[0, :32] = 0.0  # an all-zero input block: d = 0
    with torch.no_grad():
        y = layer(x).double()
    # its own reference: the same quantised input, float64 sums
    own = q8_matmul_reference(layer.values, layer.scales, layer.bias, x)
    q, d = quantize_q8_0(x)
    terms = torch.einsum("rbi,nbi->rnb", q.double().abs().view(rows, blocks, 32),
                         layer.values.double().abs().view(outputs, blocks, 32))
    terms = terms * layer.scales.double() * d.double().unsqueeze(1)  # |s_nb·d_rb·Σ w q| bounds, per block
    summation = (blocks + 2) * 2.0 ** -24 * terms.sum(-1)
    assert ((y - own).abs() <= summation + 1e-30).all(), kernel
    # the dequantise-then-matmul reference: + the input's rounding, d_b/2 per element
    weight = layer.weight.double()
    exact = x.double() @ weight.t() + layer.bias.double()
    rounding = (d.double() / 2) @ weight.abs().view(outputs, blocks, 32).sum(-1).t()
    float_error = (inputs + 2) * 2.0 ** -24 * (x.double().abs() @ weight.abs().t())
    assert ((y - exact).abs() <= rounding + summation + float_error).all(), kernel
    assert (y - exact).abs().max() > 0  # the input really was quantised


@pytest.mark.parametrize("rows", [1, 4])
def test_q8_float_input_and_f32_paths_equal_their_references(kernel, rows):
    torch.manual_seed(rows)
    layer = Int8Linear.from_linear(torch.nn.Linear(96, 21), activations="float")
    x = torch.randn(rows, 96)
    with torch.no_grad():
        expected = layer.reference_forward(x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_native_instructions_are_compiled_where_the_cpu_has_them(monkeypatch):
    """The native build uses vdpbf16ps / vpdpbusd when the CPU has them; elsewhere it says which
    fallback the tests above exercised."""
    monkeypatch.setenv("LOOPLM_NATIVE_TARGET", "native")
    monkeypatch.setattr(build, "_state", {})
    if build.load_kernel() is None:
        pytest.skip(build.unavailable_reason())
    paths, flags = build.simd_paths(), cpu_flags()
    fallbacks = []
    if {"avx512_bf16", "avx512bw"} <= flags:
        assert paths["bf16"] == "avx512_bf16"
    else:
        fallbacks.append(f"no avx512_bf16: bf16 ran the {paths['bf16']} path")
    if {"avx512_vnni", "avx512bw", "avx512vl"} <= flags:
        assert paths["q8_int8"] == "avx512_vnni"
    elif "avx_vnni" in flags:
        assert paths["q8_int8"] == "avx_vnni"
    else:
        fallbacks.append(f"no VNNI: Q8_0 x Q8_0 ran the {paths['q8_int8']} path")
    if fallbacks:
        pytest.skip("this CPU lacks the instructions (" + "; ".join(fallbacks) + ")")


def test_target_names_a_feature_this_cpu_lacks_or_does_not_know(monkeypatch):
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("LOOPLM_NATIVE_TARGET", "avx2,sse9")
    with pytest.warns(UserWarning, match="unknown feature 'sse9'.*falls back to the torch paths"):  # said once
        assert build.load_kernel() is None and "unknown feature 'sse9'" in build.unavailable_reason()
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(looplm.cpu, "cpu_flags", lambda: frozenset())
    monkeypatch.setenv("LOOPLM_NATIVE_TARGET", "avx2")
    with pytest.warns(UserWarning, match="asks for avx2, which this CPU lacks"):
        assert build.load_kernel() is None and "asks for avx2, which this CPU lacks" in build.unavailable_reason()


@pytest.mark.parametrize("form", ["fp32", "bf16", "int8"])
def test_native_decode_on_this_build_follows_the_reference_decoder(kernel, form):
    """The fused layer kernel of this build (every projection form, the head in bf16 for bf16
    weights) against the model's own modules: float32 as close as test_native_decode.py holds
    it, bf16 within the documented logit bound (torch rounds each bf16 product's output to bf16,
    the kernel keeps float32 sums), Q8_0 × Q8_0 within 1 % of the logit range: the two quantise
    the same inputs the same way, but an input a float32 rounding away from the midpoint of two
    int8 values can round to either (one such element moved these logits by 0.25 %)."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(d_model=64, ffn_hidden=96)).eval()
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    model = {"fp32": lambda: model, "bf16": lambda: bf16_weights(model),
             "int8": lambda: quantize_model(copy.deepcopy(model), "int8")}[form]()
    runs = {}
    for backend in ("native", "reference"):
        decoder = Decoder(model, FixedSteps(), 16, backend=backend)
        assert decoder.backend == backend
        with torch.inference_mode():
            runs[backend] = [decoder.prefill(torch.tensor([[3]]))[0]] + [decoder.step(t)[0] for t in (7, 9, 11, 2)]
    for native, reference in zip(runs["native"], runs["reference"]):
        spread = float(reference.max() - reference.min())
        tolerance = {"fp32": 1e-4, "bf16": 0.02 * spread, "int8": 0.01 * spread}[form]
        assert float((native - reference).abs().max()) <= tolerance, kernel


def scalar_argmax(values: list[float]) -> int:
    """The rule every path keeps: the first index whose value exceeds all before it (NaNs never do;
    a NaN first value stays)."""
    top = 0
    for index, value in enumerate(values):
        if value > values[top]:
            top = index
    return top


def argmax_cases() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for n in (1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 64, 259, 4096):
        x = torch.randn(n, generator=generator)
        cases.append(x)
        tied = x.clone()  # the largest value at several places, one of them in the tail
        places = torch.randperm(n, generator=generator)[:3]
        tied[places] = x.max() + 1
        tied[-1] = x.max() + 1
        cases.append(tied)
        cases.append(torch.full((n,), -float("inf")))
        cases.append(torch.zeros(n))
        signed = torch.zeros(n)  # -0.0 and +0.0 compare equal: the first stays
        signed[::2] = -0.0
        cases.append(signed)
        for nan_places in ([0], [n // 2], list(range(0, n, 3))):
            with_nan = x.clone()
            with_nan[nan_places] = float("nan")
            cases.append(with_nan)
        infinite = x.clone()
        infinite[n // 3] = float("inf")
        cases.append(infinite)
        last = x.clone()
        last[-1] = 1e30  # the largest in the last, part-filled vector
        cases.append(last)
    return cases


def test_argmax_takes_the_first_largest_value_as_the_scalar_loop(kernel):
    """The one argmax the C paths share (the batched head's, batch 1's, the runtime's) picks what the
    scalar loop picks — ties, NaNs, infinities, signed zeros, part-filled vectors — on every build."""
    library = build.load_kernel()
    for values in argmax_cases():
        values = values.contiguous()
        assert library.lr_argmax(values.data_ptr(), len(values)) == scalar_argmax(values.tolist()), (kernel, values)
