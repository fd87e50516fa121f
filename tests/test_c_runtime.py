"""The C runtime (looplm/kernels/csrc): the standalone ``looplm-run`` program and the in-process
``native`` backend decode every model family as the Python reference does — the same greedy
tokens over 64 new tokens, per-step logits within 1e-4 through the program's debug dump, the same
exit steps under Q-exit and every KV layout — read quantised files within their documented
bounds, refuse bad input with one line, and build and run without SIMD (the portable fallback)."""

import re
import subprocess

import numpy as np
import pytest
import torch

from looplm.cache import KV_LAYOUTS, KVCache
from looplm.exit_policy import make_exit_policy
from looplm.generate import Decoder, FixedSteps, generate
from looplm.interop.gguf import export_gguf, load_gguf
from looplm.kernels import build as native_build
from looplm.kernels import program
from looplm.model import LoopLM
from looplm.model.norms import LayerNorm

from conftest import tiny_config, write_gguf
from test_architectures import VARIANTS
from test_gguf import CONFIGS as GGUF_CONFIGS
from test_gguf import make_model as make_gguf_model

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(native_build._compiler() is None, reason="no C compiler")

CONTEXT = 80  # an 8-token prompt and 64 new tokens
# Ternary models (model.ternary) quantise every projection's input to int8 levels per token: where a
# value lies within float32 rounding of the boundary between two levels, two correct computations
# (the batched forward and the per-token decoder — the reference's own two, as well as C and torch)
# may round it to neighbouring levels, which moves later logits by ~1e-3 over a 64-token decode.
# Their logits are held to a few such levels; the projection itself is exact (test below).
TERNARY_ATOL = 5e-3
TERNARY_FILE_ATOL = 3e-2  # ternary=all: a flip in the coda, right before the head
NEW_TOKENS = 64
PROMPT = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(1)).tolist()


def build_model(name: str, seed: int = 0) -> LoopLM:
    """``test_architectures.build`` with a context long enough for 64 new tokens."""
    torch.manual_seed(seed)
    model = LoopLM(tiny_config(**{**VARIANTS[name], "max_seq_len": CONTEXT}))
    if model.exit_gate is not None:
        torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    for module in model.modules():  # LayerNorm biases start at zero, which would hide a misplaced bias
        if isinstance(module, LayerNorm):
            torch.nn.init.normal_(module.bias, std=0.1)
    if model.depth_lora is not None:
        torch.nn.init.normal_(model.depth_lora.up.weight, std=0.3)
    return model.eval()


def run(binary, model_path, *arguments, prompt=PROMPT):
    command = [str(binary), str(model_path), *arguments]
    if prompt is not None:
        command += ["--prompt-ids", ",".join(map(str, prompt))]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def generated_ids(result) -> list[int]:
    assert result.returncode == 0, result.stderr
    return [int(token) for token in result.stdout.split()]


def steps_used(result) -> list[int]:
    return [int(step) for step in re.search(r"steps per token: \[(.*?)\]", result.stderr).group(1).split(", ") if step]


def assert_dump_matches_forward(model, dump_path, sequence, steps, atol):
    """Every dumped (position, step) logits row against the full forward of ``sequence`` at ``steps``
    steps; every position and every step must be there."""
    positions, step_numbers, logits = program.read_dump(dump_path)
    with torch.no_grad():
        output = model(torch.tensor([sequence]), steps=steps)
        expected = torch.stack([output.logits(step)[0] for step in range(1, steps + 1)]).numpy()  # [T, S, V]
    assert sorted(set(positions.tolist())) == list(range(len(sequence)))
    assert np.bincount(step_numbers).tolist()[1:] == [len(sequence)] * steps
    np.testing.assert_allclose(logits, expected[step_numbers - 1, positions], atol=atol, rtol=0)
    return expected


@pytest.mark.parametrize("name", VARIANTS)
def test_every_family_decodes_like_the_reference(name, looplm_run, tmp_path):
    """64 greedy tokens from the program: each is the reference's argmax after the tokens before
    it, every step's logits match the full forward within 1e-4, and the in-process native backend
    generates the same tokens."""
    model = build_model(name)
    path = export_gguf(model, tmp_path / "model.gguf")
    result = run(looplm_run, path, "-n", str(NEW_TOKENS), "--print-ids", "--dump-logits", str(tmp_path / "dump"))
    ids = generated_ids(result)
    assert len(ids) == NEW_TOKENS
    sequence = PROMPT + ids[:-1]
    steps = model.config.loop_steps
    atol = 1e-4 if model.config.ternary == "none" else TERNARY_ATOL
    expected = assert_dump_matches_forward(model, tmp_path / "dump", sequence, steps, atol=atol)
    assert ids == expected[steps - 1, len(PROMPT) - 1:].argmax(-1).tolist()
    assert Decoder(model, FixedSteps(), CONTEXT).backend == "native"
    assert generate(model, PROMPT, NEW_TOKENS, backend="native").ids == ids


C_LAYOUTS = KV_LAYOUTS
EXIT_CASES = ([("gdn-hybrid", layout, 0.5, None, 1) for layout in C_LAYOUTS]
              + [("mla", layout, 0.5, None, 1) for layout in C_LAYOUTS]
              + [("gdn-loop-memory", "last_exited", 0.3, 5, 2), ("loop-index-lora", "last_exited", None, 6, 1),
                 ("preset-loopcached", "full", 0.5, None, 2), ("global-gates", "first", 0.5, None, 1)])


@pytest.mark.parametrize("name, layout, q, steps, min_steps", EXIT_CASES,
                         ids=[f"{case[0]}-{case[1]}-q{case[2]}-steps{case[3]}-min{case[4]}" for case in EXIT_CASES])
def test_exit_policies_and_layouts_match_the_reference(name, layout, q, steps, min_steps, looplm_run, tmp_path):
    """Q-exit (with --min-steps), steps beyond the trained T and every KV layout: the program and the
    in-process backend give the reference decoder's tokens and the loop steps each token used."""
    model = build_model(name)
    path = export_gguf(model, tmp_path / "model.gguf")
    options = ["-n", "16", "--print-ids", "--show-steps", "--layout", layout, "--min-steps", str(min_steps)]
    options += ["-q", str(q)] if q is not None else []
    options += ["--steps", str(steps)] if steps else []
    result = run(looplm_run, path, *options)
    policy = make_exit_policy(q=q, steps=steps, min_steps=min_steps)
    reference = generate(model, PROMPT, 16, exit_policy=policy, backend="reference", layout=layout)
    native = generate(model, PROMPT, 16, exit_policy=policy, backend="native", layout=layout)
    assert (generated_ids(result), steps_used(result)) == (reference.ids, reference.steps)
    assert (native.ids, native.steps) == (reference.ids, reference.steps)
    # one count of the layer applications, whichever path ran the token
    assert (native.layer_applications, native.full_depth_applications) == (reference.layer_applications,
                                                                            reference.full_depth_applications)
    if q is not None and layout != "full":
        assert min(reference.steps) < (steps or model.config.loop_steps)  # tokens really exit early


@pytest.mark.parametrize("name", list(GGUF_CONFIGS))
def test_quantized_files_stay_within_their_bounds(name, looplm_run, tmp_path):
    """q8_0: the program computes with the file's int8 blocks, so its logits equal the dequantised
    model's within 1e-4 and move from the float32 model's by at most the 5% of their largest
    magnitude docs/INTEROP.md states for the dense models (tests/test_gguf.py's models; an MoE's
    router may send a token whose input moved to another expert); f16: the float16-rounded model's within 1e-4."""
    model = make_gguf_model(**GGUF_CONFIGS[name])
    steps = model.config.loop_steps
    for dtype in ("q8_0", "f16"):
        path = export_gguf(model, tmp_path / f"{dtype}.gguf", dtype)
        result = run(looplm_run, path, "-n", "24", "--print-ids", "--dump-logits", str(tmp_path / "dump"))
        sequence = PROMPT + generated_ids(result)[:-1]
        assert_dump_matches_forward(load_gguf(path)[0], tmp_path / "dump", sequence, steps, atol=1e-4)
        if dtype == "q8_0" and "ffn" not in GGUF_CONFIGS[name]:  # another expert is no rounding error
            positions, step_numbers, logits = program.read_dump(tmp_path / "dump")
            with torch.no_grad():
                output = model(torch.tensor([sequence]), steps=steps)
                exact = torch.stack([output.logits(step)[0] for step in range(1, steps + 1)]).numpy()
            exact = exact[step_numbers - 1, positions]
            assert np.abs(logits - exact).max() <= 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("ternary", ["core", "all"])
def test_ternary_files_decode_like_the_reference(ternary, looplm_run, tmp_path):
    """A ternary model's GGUF files: f32 (the program ternarises the float32 shadow weights at load,
    as BitLinear does) and --dtype ternary (TQ2_0 blocks for the 256-long rows of ffn_down, looplm's
    2-bit I8 layout for the rest, each with its float32 .ternary_scale).  The program computes what
    the in-process backend computes from the loaded model's codes (the same C, so within float32
    noise, and the same tokens), and stays within a few activation levels (TERNARY_FILE_ATOL) of the
    reference's full forward: with the coda ternary too (model.ternary=all), one level's flip moves
    the logits by ~1e-2, as much as it moves the reference's own two exact forms (BitLinear and
    TernaryLinear) apart."""
    model = make_gguf_model(ternary=ternary, ffn_hidden=256, n_prelude_layers=1, n_coda_layers=1)
    steps = model.config.loop_steps
    for dtype in ("f32", "ternary"):
        path = export_gguf(model, tmp_path / f"{dtype}.gguf", dtype)
        kinds = {int(tensor.tensor_type) for tensor in gguf.GGUFReader(str(path)).tensors}
        packed = {int(gguf.GGMLQuantizationType.TQ2_0), int(gguf.GGMLQuantizationType.I8)}
        assert packed <= kinds if dtype == "ternary" else not packed & kinds
        result = run(looplm_run, path, "-n", "24", "--print-ids", "--dump-logits", str(tmp_path / "dump"))
        ids = generated_ids(result)
        sequence = PROMPT + ids[:-1]
        loaded = load_gguf(path)[0].eval()
        assert_dump_matches_forward(loaded, tmp_path / "dump", sequence, steps, atol=TERNARY_FILE_ATOL)
        assert generate(loaded, PROMPT, 24, backend="native").ids == ids
        positions, step_numbers, logits = program.read_dump(tmp_path / "dump")
        last = logits[step_numbers == steps][np.argsort(positions[step_numbers == steps])]
        native = Decoder(loaded, FixedSteps(steps), len(PROMPT) + 24, backend="native")
        with torch.no_grad():
            rows = [native.prefill(torch.tensor([PROMPT]))[0]] + [native.step(token)[0] for token in ids[:-1]]
        np.testing.assert_allclose(last[len(PROMPT) - 1:], torch.stack(rows).numpy(), atol=1e-5, rtol=0)


TERNARY_KINDS = {  # every projection a ternary layer can hold, in the runtime
    "mla-prelude-coda": {"ternary": "all", "attention": "mla", "mla_kv_rank": 12, "mla_rope_dim": 4,
                         "n_prelude_layers": 1, "n_coda_layers": 1},
    "mla-q-rank": {"ternary": "core", "attention": "mla", "mla_kv_rank": 12, "mla_q_rank": 16, "mla_rope_dim": 6,
                   "norm": "pre"},
    "rwkv-gdn-memory-gated": {"ternary": "all", "layer_pattern": "RGA", "n_core_layers": 3, "attention": "gated",
                              "mc_segment_size": 3, "mc_top_k": 2, "loop_mc": True, "loop_mc_top_k": 1,
                              "injection": "additive", "n_prelude_layers": 1},
    "moe-shared": {"ternary": "all", "ffn": "moe", "n_experts": 4, "moe_top_k": 2, "expert_hidden": 16,
                   "n_shared_experts": 1, "n_prelude_layers": 1},
    "channelmix": {"ternary": "core", "ffn": "channelmix", "n_prelude_layers": 1, "n_coda_layers": 1},
}


@pytest.mark.parametrize("name", TERNARY_KINDS)
def test_in_process_ternary_models_of_every_kind(name):
    """BitLinear layers of every mixer and FFN kind decode natively (MLA with a ternary kv_up in the
    recompute form, as the reference); packed (TernaryLinear) they give the same logits."""
    from looplm.ternary import pack_model

    torch.manual_seed(0)
    model = LoopLM(tiny_config(**TERNARY_KINDS[name])).eval()
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    native = native_decoder_against_reference(model, make_exit_policy(q=0.5), atol=TERNARY_ATOL)
    assert type(native.stepper).__name__ == "RuntimeStepper"
    native_decoder_against_reference(pack_model(model), make_exit_policy(q=0.5), atol=TERNARY_ATOL)


def test_ternary_projection_is_ternary_linears_arithmetic():
    """The runtime's ternary projection (matvec.h, through kernels.ops) computes TernaryLinear's
    integer form bit for bit — every width, SIMD blocks and tails, tiny and large inputs — and
    BitLinear's float form up to float32 rounding."""
    from looplm.kernels.ops import ternary_matvec
    from looplm.model.bitlinear import BitLinear
    from looplm.ternary import TernaryLinear

    torch.manual_seed(0)
    for width in (1, 3, 4, 31, 32, 33, 100, 256, 257):
        layer = BitLinear(width, 9, bias=False)
        packed = TernaryLinear.from_bitlinear(layer)
        for magnitude in (1.0, 1e-7, 100.0):
            x = torch.randn(width) * magnitude
            y = ternary_matvec(packed.packed, packed.scale, x, width, threads=2)
            assert torch.equal(y, packed(x[None])[0]), width
            torch.testing.assert_close(y, layer(x[None])[0].detach(), atol=1e-6, rtol=1e-5)


def native_decoder_against_reference(model, policy, layout: str = "last_exited", tokens: int = 12,
                                     atol: float = 1e-4) -> Decoder:
    """Prefill PROMPT and step ``tokens`` tokens through the native and the reference decoders:
    the same loop steps and logits within ``atol`` at every token.  Returns the native decoder."""
    reference = Decoder(model, policy, 24, backend="reference", layout=layout)
    native = Decoder(model, policy, 24, backend="native", layout=layout)
    with torch.no_grad():
        for decoder in (reference, native):
            decoder.prefill(torch.tensor([PROMPT]))
        for token in range(tokens):
            (expected, expected_steps), (logits, steps) = reference.step(token), native.step(token)
            assert steps == expected_steps
            torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    return native


def one_error_line(result) -> str:
    """The program failed with exit status 2 and one line `looplm-run: error: …` (no crash)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("looplm-run: error: "), result.stderr
    return lines[0]


def _patch_tensor_type(path, name, new_type):
    """Rewrite tensor ``name``'s ggml type in the file's tensor table."""
    field = next(tensor for tensor in gguf.GGUFReader(str(path)).tensors if tensor.name == name).field
    at = field.offset + 8 + len(name.encode()) + 4 + 8 * len(field.parts[3])
    raw = bytearray(path.read_bytes())
    raw[at:at + 4] = np.uint32(new_type).tobytes()
    path.write_bytes(bytes(raw))


def test_bad_input_is_one_line_and_a_nonzero_exit(looplm_run, tmp_path, monkeypatch):
    model = build_model("concat-noise")
    good = export_gguf(model, tmp_path / "good.gguf")
    raw = good.read_bytes()
    for size in (0, 3, 20, 200, len(raw) // 2, len(raw) - 1):  # truncated anywhere
        (tmp_path / "cut.gguf").write_bytes(raw[:size])
        line = one_error_line(run(looplm_run, tmp_path / "cut.gguf"))
        assert "truncated" in line or "not a GGUF file" in line
    (tmp_path / "noise.gguf").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    assert "not a GGUF file" in one_error_line(run(looplm_run, tmp_path / "noise.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    write_gguf(writer, tmp_path / "llama.gguf")
    assert "'llama' model, not a looplm one" in one_error_line(run(looplm_run, tmp_path / "llama.gguf"))
    (tmp_path / "q4.gguf").write_bytes(raw)
    _patch_tensor_type(tmp_path / "q4.gguf", "blk.0.attn_qkv.weight", int(gguf.GGMLQuantizationType.Q4_0))
    assert "blk.0.attn_qkv.weight has ggml type 2" in one_error_line(run(looplm_run, tmp_path / "q4.gguf"))
    # a config key from a newer looplm, and a file without the noise table this config needs
    import looplm.interop.gguf as gguf_io
    from looplm.config import ModelConfig

    flat = ModelConfig.to_dict
    monkeypatch.setattr(ModelConfig, "to_dict", lambda config: {**flat(config), "future_feature": 1})
    newer = export_gguf(model, tmp_path / "newer.gguf")
    assert "unknown key future_feature" in one_error_line(run(looplm_run, newer))
    monkeypatch.undo()
    monkeypatch.setattr(gguf_io, "derived_tensors", lambda model: {})
    assert "noise.table is missing" in one_error_line(run(looplm_run, export_gguf(model, tmp_path / "old.gguf")))
    too_long = list(range(CONTEXT + 1))
    line = one_error_line(run(looplm_run, good, prompt=[token % 64 for token in too_long]))
    assert f"the prompt has {CONTEXT + 1} tokens, longer than the context of {CONTEXT}" in line
    for arguments, message in ((["-q", "2"], "q must be in [0, 1]"), (["--steps", "0"], "steps must be >= 1"),
                               (["--steps", "13"], "steps must be at most 12 (4 x the trained 3)"),
                               (["--layout", "diagonal"], "KV layout must be one of"),
                               (["--bogus"], "unknown option --bogus"), (["--prompt", "hi"], "give --prompt TEXT or")):
        assert message in one_error_line(run(looplm_run, good, *arguments))
    assert "outside the vocabulary" in one_error_line(run(looplm_run, good, prompt=[1, 99]))
    assert "no tokenizer" in one_error_line(run(looplm_run, good, "--prompt", "hi", prompt=None))
    assert "cannot open" in one_error_line(run(looplm_run, tmp_path / "missing.gguf"))
    broken = build_model("ouro")
    with torch.no_grad():
        broken.norm.weight[0] = float("nan")  # an overflowed model: NaN reaches every logit
    assert "not finite" in one_error_line(run(looplm_run, export_gguf(broken, tmp_path / "nan.gguf"), "-n", "4"))
    from looplm.data.tokenizer import byte_tokenizer  # 259 tokens for a model of 64

    monkeypatch.undo()
    mismatched = export_gguf(model, tmp_path / "mismatched.gguf", tokenizer=byte_tokenizer())
    assert "outside the model's vocabulary" in one_error_line(run(looplm_run, mismatched, "--prompt", "hi",
                                                                  prompt=None))


def _patch_tensor_info(path, name, dims=None, shift=0):
    """Rewrite tensor ``name``'s dimensions (ggml order, as many as it has) in the file's tensor
    table, or move its data offset by ``shift`` bytes."""
    field = next(tensor for tensor in gguf.GGUFReader(str(path)).tensors if tensor.name == name).field
    at = field.offset + 8 + len(name.encode()) + 4  # the first dimension
    raw = bytearray(path.read_bytes())
    if dims is not None:
        assert len(dims) == len(field.parts[3])
        raw[at:at + 8 * len(dims)] = np.array(dims, np.uint64).tobytes()
    at += 8 * len(field.parts[3]) + 4
    raw[at:at + 8] = np.uint64(int(field.parts[5][0]) + shift).tobytes()
    path.write_bytes(bytes(raw))


def run_limited(binary, model_path, *arguments):
    """``run`` within 1 GiB of address space and 20 s: a file that makes the program ask for
    gigabytes, or spin, fails the test instead of swapping or hanging the machine."""
    import resource

    def limit():
        try:
            resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        except (ValueError, OSError):  # a system without address-space limits (macOS): the timeout only
            pass

    command = [str(binary), str(model_path), *arguments, "--prompt-ids", ",".join(map(str, PROMPT[:3])), "-n", "4",
               "--print-ids"]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, preexec_fn=limit)


def test_crafted_files_are_refused_in_one_line(looplm_run, tmp_path, monkeypatch):
    """Structure-aware crafted files (found by fuzzing the loader under ASan/UBSan): a size that
    wraps 2^64, data off the file's alignment, a config that asks for more context, layers or
    cache slots than the file or the program can hold, an out-of-range ternary row length — each
    one line and exit status 2; sizes of features the model does not use allocate nothing."""
    from looplm.checkpoint import gguf as checkpoint_gguf
    from looplm.config import ModelConfig

    model = build_model("ouro")
    flat = ModelConfig.to_dict

    def with_config(name, model=model, **values):
        monkeypatch.setattr(ModelConfig, "to_dict", lambda config: {**flat(config), **values})
        path = export_gguf(model, tmp_path / f"{name}.gguf")
        monkeypatch.undo()
        return path

    cases = [(with_config("context", max_seq_len=2**21), "max_seq_len must be at most 2^20"),
             # MLA's rope dims are a setting of their own: 2^20 x 2^16 floats would be 256 GiB a table
             (with_config("rope", max_seq_len=2**20, attention="mla", mla_rope_dim=2**16),
              "max_seq_len x RoPE dims must be at most 2^28"),
             (with_config("layers", n_coda_layers=10**8), "layers need at least 200000004 tensors"),
             (with_config("steps", loop_steps=10**6), "cache slots, more than this program keeps"),
             (with_config("steps-overflow", loop_steps=10**9), "cache slots, more than this program keeps")]
    wrapped = export_gguf(model, tmp_path / "wrapped.gguf")  # 2^40 x 2^24 elements: 0 after a 64-bit product
    _patch_tensor_info(wrapped, "token_embd.weight", dims=[2**40, 2**24])
    cases.append((wrapped, "tensor token_embd.weight has a malformed shape"))
    unaligned = export_gguf(model, tmp_path / "unaligned.gguf")  # float32 data 2 bytes off
    _patch_tensor_info(unaligned, "blk.0.attn_qkv.weight", shift=2)
    cases.append((unaligned, "not a multiple of the file's alignment 32"))
    aligned_2 = export_gguf(model, tmp_path / "alignment.gguf")  # general.file_type (u32 0) → general.alignment 2
    field = gguf.GGUFReader(str(aligned_2)).fields["general.file_type"]
    raw = bytearray(aligned_2.read_bytes())
    raw[field.offset + 8:field.offset + 8 + 17] = b"general.alignment"
    raw[field.offset + 8 + 17 + 4:field.offset + 8 + 17 + 8] = np.uint32(2).tobytes()
    aligned_2.write_bytes(bytes(raw))
    cases.append((aligned_2, "general.alignment 2 is malformed"))
    add_array = gguf.GGUFWriter.add_array  # a ternary row length of 2^63 - 1, as u64

    def huge_rows(writer, key, values):
        if key != checkpoint_gguf.TERNARY_ROWS_KEY:
            return add_array(writer, key, values)
        writer.add_key_value(key, [2**63 - 1] * len(values), gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.UINT64)

    monkeypatch.setattr(gguf.GGUFWriter, "add_array", huge_rows)
    ternary = make_gguf_model(ternary="core", ffn_hidden=256)
    cases.append((export_gguf(ternary, tmp_path / "rows.gguf", "ternary"), "does not list it with its row length"))
    monkeypatch.undo()
    for path, message in cases:
        assert message in one_error_line(run_limited(looplm_run, path)), path.name
    # sizes no tensor checks, of features these models lack, size no memory (they asked for gigabytes)
    unused = with_config("unused", rwkv_slots=10**9, mla_kv_rank=10**9, n_experts=10**9, expert_hidden=10**9,
                         shared_expert_hidden=10**9, n_shared_experts=1)
    moe = with_config("moe", build_model("moe"), ffn_hidden=10**9)
    for path in (unused, moe):
        assert len(generated_ids(run_limited(looplm_run, path))) == 4
    # a vocabulary entry longer than the program's 4096-byte piece buffer is printed whole (it was
    # printed from past the buffer's end)
    import json

    from tokenizers import Tokenizer as HFTokenizer

    from looplm.data.tokenizer import Tokenizer, byte_tokenizer

    text = json.loads(byte_tokenizer().backend.to_str())  # 259 tokens: give the model's ids past them 5003 bytes
    text["model"]["vocab"].update({"a" * 5000 + str(index): index for index in range(259, 300)})
    torch.manual_seed(0)
    wide = LoopLM(tiny_config(vocab_size=300, max_seq_len=CONTEXT)).eval()
    path = export_gguf(wide, tmp_path / "long-token.gguf", tokenizer=Tokenizer(HFTokenizer.from_str(json.dumps(text))))
    command = [str(looplm_run), str(path), "--prompt", "hi", "-n", "40", "--temperature", "100", "--seed", "1"]
    result = subprocess.run(command, capture_output=True, timeout=120)  # the bytes of random tokens: not UTF-8
    assert result.returncode == 0, result.stderr
    pieces = re.findall(rb"a{4096,}[^a]{0,3}", result.stdout)
    assert pieces and all(re.fullmatch(rb"a{5000}(259|2[6-9]\d)", piece) for piece in pieces), pieces[0][4090:]


def test_portable_program_builds_and_runs_without_simd(tmp_path):
    """``make PORTABLE=1``: no -march flags, the SIMD paths compiled out, the same logits."""
    binary = program.build(tmp_path / "looplm-run-portable", portable=True)
    model = build_model("preset-loopcached")
    path = export_gguf(model, tmp_path / "model.gguf")
    assert "simd scalar" in run(binary, path, "--info", prompt=None).stdout
    result = run(binary, path, "-n", "12", "--print-ids", "--dump-logits", str(tmp_path / "dump"))
    assert_dump_matches_forward(model, tmp_path / "dump", PROMPT + generated_ids(result)[:-1],
                                model.config.loop_steps, atol=1e-4)


def test_portable_library_runs_the_families(tmp_path, monkeypatch):
    """LOOPLM_NATIVE_TARGET=portable builds the in-process library without SIMD (its own cache entry)
    and every fast path still gives the reference's logits."""
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path))
    monkeypatch.setenv("LOOPLM_NATIVE_TARGET", "portable")
    monkeypatch.setattr(native_build, "_state", {})
    kernel = native_build.load_kernel()
    assert kernel is not None and kernel.lr_simd() == b"scalar"
    for name in ("preset-qwen35-loop", "ouro", "ternary-all-hybrid"):  # the runtime, the plain-loop kernel, ternary
        native_decoder_against_reference(build_model(name), make_exit_policy(q=0.5))
    compiler = native_build._compiler()
    portable_key = native_build.library_digest(compiler, native_build._arch_flags(compiler))
    monkeypatch.delenv("LOOPLM_NATIVE_TARGET")
    assert native_build.library_digest(compiler, native_build._arch_flags(compiler)) != portable_key


def test_export_tells_how_to_run_without_python_and_the_program_agrees(looplm_run, tmp_path, capsys):
    """``looplm export gguf`` prints the build and run commands; the program then generates the
    text ``looplm generate`` generates from the same file (greedy, prompt encoded with its tokenizer)."""
    from looplm.cli import main
    from looplm.data.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=259, max_seq_len=CONTEXT, injection="lti", layer_pattern="GA"))
    checkpoint = model.eval().save(tmp_path / "ckpt", tokenizer=byte_tokenizer())
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(checkpoint), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"make -C {program.CSRC}" in printed and f"./looplm-run {out} --prompt" in printed
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "12", "--no-stream"]) == 0
    expected = capsys.readouterr().out
    result = subprocess.run([str(looplm_run), str(out), "--prompt", "hello", "-n", "12"], capture_output=True)
    assert result.returncode == 0 and result.stdout.decode("utf-8", errors="replace") == expected


POLICIES = {"hidden": make_exit_policy(hidden=0.3), "kl": make_exit_policy(kl=0.05, min_steps=2),
            "act": make_exit_policy(act=True)}


@pytest.mark.parametrize("name", ["gdn-hybrid", "global-gates", "rwkv-hybrid-qexit"])
@pytest.mark.parametrize("policy", POLICIES)
def test_in_process_step_by_step_policies_match_the_reference(name, policy):
    """Policies the decoder applies step by step (hidden-state change, KL, ACT) drive the runtime
    through embed / core_step / readout / gate_logit / logits, after a torch prefill, with the
    Python layout rules (first: with a coda every step's readout runs)."""
    model = build_model(name)
    for layout in ("last_exited", "first"):
        native = native_decoder_against_reference(model, POLICIES[policy], layout)
        assert native.backend == "native" and not native.fused


@pytest.mark.parametrize("name", ["gdn-hybrid", "preset-openmythos-looplm", "rwkv-slots", "mla-q-rank"])
def test_in_process_int8_models_use_their_int8_weights(name):
    """An int8 model (looplm.quant) decodes in the runtime from its Q8_0 values and scales, as the
    reference decoder computes it with the same int8 layers.  Layers that quantise their inputs
    too (int8 x int8, the VNNI form) are refused by the runtime, with the reason."""
    from looplm.kernels.runtime_stepper import runtime_unsupported
    from looplm.quant import quantize_model

    native = native_decoder_against_reference(quantize_model(build_model(name), activations="float"),
                                              make_exit_policy(q=0.5))
    assert type(native.stepper).__name__ == "RuntimeStepper"
    quantised_inputs = quantize_model(build_model(name), activations="int8")
    assert "quantise their inputs" in runtime_unsupported(quantised_inputs, KVCache(quantised_inputs.config, 1, 24))


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy(looplm_run, tmp_path):
    """Temperature sampling repeats with its seed and changes with another; top-k 1 and a top-p that
    keeps only the likeliest token are greedy decoding; the tokens/s line closes every run."""
    path = export_gguf(build_model("preset-lrnn-looped"), tmp_path / "model.gguf")

    def sampled(*options):
        result = run(looplm_run, path, "-n", "24", "--print-ids", *options)
        assert re.search(r"24 tokens in [\d.]+ s \([\d.]+ tokens/s\)", result.stderr)
        return generated_ids(result)

    greedy = sampled()
    hot = ["--temperature", "2.0"]
    assert sampled(*hot, "--seed", "7") == sampled(*hot, "--seed", "7") != sampled(*hot, "--seed", "8")
    assert sampled(*hot, "--seed", "7") != greedy
    assert sampled(*hot, "--top-k", "1", "--seed", "9") == greedy
    assert sampled(*hot, "--top-p", "1e-9", "--seed", "9") == greedy


def test_the_program_uses_the_policy_the_file_records(looplm_run, tmp_path):
    """A file exported with ``--exit q:0.5 --min-steps 2`` decodes with that policy when the
    command names none (the same loop steps per token as naming it on a plain file, not the fixed
    T steps); a recorded policy the program does not run is one line, exit 2."""
    from dataclasses import replace

    model = build_model("gdn-hybrid")
    plain = export_gguf(model, tmp_path / "plain.gguf")
    model.config = replace(model.config, default_exit="q:0.5", min_loop_steps=2)
    recorded = export_gguf(model, tmp_path / "recorded.gguf")

    def steps_of(path, *options):
        run(looplm_run, path, "-n", "16", "--dump-logits", str(tmp_path / "dump"), *options)
        return program.read_dump(tmp_path / "dump")[1].tolist()

    named = steps_of(plain, "--q", "0.5", "--min-steps", "2")
    assert steps_of(recorded) == named != steps_of(plain)
    model.config = replace(model.config, default_exit="kl:0.1")
    kl = export_gguf(model, tmp_path / "kl.gguf")
    result = subprocess.run([str(looplm_run), str(kl), "--prompt-ids", "1,2,3", "-n", "4"], capture_output=True)
    assert result.returncode == 2 and b"records the exit policy kl:0.1" in result.stderr
    assert result.stderr.count(b"\n") == 1
    for options in (["--min-steps", "2"], ["--steps", "3", "--min-steps", "2"]):  # fixed depth: not dropped silently
        result = subprocess.run([str(looplm_run), str(plain), "--prompt-ids", "1,2,3", "-n", "4", *options],
                                capture_output=True)
        assert result.returncode == 2 and b"--min-steps applies to Q-exit" in result.stderr
        assert result.stderr.count(b"\n") == 1


def test_a_kernel_that_fails_to_build_says_so_once(monkeypatch):
    """A failed build is not a choice: decoding falls back to torch (several times slower), and the
    user is told once; LOOPLM_NATIVE=0 chooses the fallback without a word."""
    import warnings

    def broken(compiler):
        raise OSError("cc: fatal error: no input files")

    monkeypatch.setattr(native_build, "_state", {})
    monkeypatch.setattr(native_build, "_build", broken)
    with pytest.warns(UserWarning, match="building the C decode kernel failed: cc: fatal error.*falls back to the"
                                         " torch paths"):
        assert native_build.load_kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_build.load_kernel() is None  # told once
        monkeypatch.setattr(native_build, "_state", {})
        monkeypatch.setenv("LOOPLM_NATIVE", "0")
        assert native_build.load_kernel() is None and "LOOPLM_NATIVE=0" in native_build.unavailable_reason()
