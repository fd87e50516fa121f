"""GGUF export and import of looplm models (the ``gguf`` package; ``pip install looplm[gguf]``).

A looplm GGUF file is self-describing: architecture ``looplm``, the full ``ModelConfig`` as a
JSON string (``looplm.config``, what ``load_gguf`` rebuilds from), the loop and layer metadata
as typed keys for other readers, the tokenizer's ``tokenizer.json`` text, and one tensor per
entry of the model's state dict.  docs/INTEROP.md lists every key and the tensor-name mapping.

Tensor names: the common tensors get llama.cpp-style names (``token_embd.weight``,
``blk.N.attn_qkv.weight``, …) with the looped core as ``blk.N``, the prelude as
``prelude_blk.N`` and the coda as ``coda_blk.N``; any other state-dict entry keeps its looplm
name under the same layer prefix (``blk.0.attn.a_log``), so every architecture round-trips.

Storage types (``--dtype``): ``f32`` stores everything exactly; ``f16`` stores tensors of two
or more dimensions as float16 (norms, biases, the exit gate and MoE routers stay float32);
``q8_0`` stores the embedding, head and Linear weights whose rows are a multiple of 32 long as
Q8_0 blocks (32 int8 values + a float16 scale d = max|x|/127; the error per element is at
most d/2 + 127·|d − fp16(d)|) and everything else as float32.  GGUF lists shapes in ggml's
order (fastest dimension first), the reverse of torch's; the reader turns them back.

Ternary models (``model.ternary``): under f32, f16 and q8_0 their ``BitLinear`` shadow weights
stay float32 (rounding them would move the ternary codes; the file resumes training exactly).
``ternary`` stores each of them packed: gguf's TQ2_0 blocks (256 weights: 2-bit codes + a
float16 scale) where rows are a multiple of 256 long, else looplm's 2-bit layout
(``looplm.ternary.pack_ternary``) as an I8 tensor [N, ceil(K/4)]; beside each, its exact float32
scale as ``<name>.ternary_scale`` (TQ2_0's block scales are that scale rounded to float16), and
the metadata key ``looplm.ternary.weights`` lists the packed tensors.  Everything else is
float32.  Reading such a file gives ``looplm.ternary.TernaryLinear`` layers with the exact codes
and scales: an inference model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from looplm.config import ModelConfig, from_dict
from looplm.errors import LoopLMError
from looplm.exit_policy import PerplexityExit, QExit, default_exit_policy
from looplm.model.swap import swap_modules

ARCHITECTURE = "looplm"
FORMAT_VERSION = 1
DTYPES = ("f32", "f16", "q8_0", "ternary")
TQ2_0_ROW = 256  # TQ2_0 blocks hold 256 weights: shorter rows use looplm's 2-bit layout
TERNARY_WEIGHTS_KEY = f"{ARCHITECTURE}.ternary.weights"
STAGE_PREFIXES = {"prelude": "prelude_blk", "core": "blk", "coda": "coda_blk"}
TOP_LEVEL_NAMES = {
    "embed.weight": "token_embd.weight",
    "head.weight": "output.weight",
    "norm.weight": "output_norm.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.qkv.weight": "attn_qkv.weight",
    "attn.out.weight": "attn_output.weight",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "attn_post_norm.weight": "post_attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.gate_up.weight": "ffn_gate_up.weight",
    "ffn.down.weight": "ffn_down.weight",
    "ffn_post_norm.weight": "post_ffw_norm.weight",
}
KEPT_FLOAT = ("exit_gate", "router")  # decisions, not projections: never rounded
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME is 64 including the terminating zero


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LoopLMError("GGUF support needs the gguf package: pip install 'looplm[gguf]'") from None
    return gguf


def gguf_name(name: str) -> str:
    """The GGUF tensor name of a looplm state-dict entry (the table above, else kept)."""
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    stage, _, rest = name.partition(".")
    if stage in STAGE_PREFIXES:
        index, _, inner = rest.partition(".")
        return f"{STAGE_PREFIXES[stage]}.{index}.{LAYER_NAMES.get(inner, inner)}"
    return name


def _tensor_names(model: nn.Module) -> dict[str, str]:
    """state-dict name → GGUF name for every tensor of ``model`` (checked one-to-one)."""
    names = {name: gguf_name(name) for name in model.state_dict()}
    if len(set(names.values())) != len(names):
        raise RuntimeError("two looplm tensors map to one GGUF name: fix looplm.interop.gguf's name tables")
    too_long = [name for name in names.values() if len(name.encode()) > MAX_NAME_BYTES]
    if too_long:
        raise LoopLMError(f"GGUF tensor name {too_long[0]!r} is longer than {MAX_NAME_BYTES} bytes")
    return names


def _matrix_names(model: nn.Module) -> set[str]:
    """Embedding and Linear weights, the tensors ``q8_0`` quantises (exit gate and routers excepted)."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding)) and not set(name.split(".")) & set(KEPT_FLOAT)}


def _ternary_names(model: nn.Module) -> set[str]:
    """The shadow weights of the model's ternary layers (``BitLinear``)."""
    from looplm.model.bitlinear import BitLinear

    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, BitLinear)}


def _scale_name(stored_name: str) -> str:
    """GGUF name of a packed ternary weight's float32 scale."""
    return stored_name.removesuffix("weight") + "ternary_scale"


def _add_ternary(writer, gguf, stored_name: str, weight: torch.Tensor) -> None:
    """A ternary layer's weight as codes (TQ2_0 or looplm's 2-bit layout) plus its exact scale."""
    from looplm.model.bitlinear import ternary_codes
    from looplm.ternary import pack_ternary

    codes, scale = ternary_codes(weight.detach().float().cpu())
    if weight.shape[-1] % TQ2_0_ROW == 0:
        kind = gguf.GGMLQuantizationType.TQ2_0
        writer.add_tensor(stored_name, gguf.quants.quantize((codes * scale).numpy(), kind), raw_dtype=kind)
    else:
        writer.add_tensor(stored_name, pack_ternary(codes.to(torch.int8)).view(torch.int8).numpy())
    writer.add_tensor(_scale_name(stored_name), scale.reshape(1).numpy())


def _read_ternary(gguf, tensor, shape: tuple[int, ...], scale) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed ternary tensor's codes [N, K] (int8) and its float32 scale (0-d)."""
    from looplm.ternary import unpack_ternary

    if int(tensor.tensor_type) == int(gguf.GGMLQuantizationType.TQ2_0):
        values = gguf.quants.dequantize(np.asarray(tensor.data), gguf.GGMLQuantizationType.TQ2_0)
        codes = torch.from_numpy(np.sign(values).reshape(shape)).to(torch.int8)
    else:
        packed = torch.from_numpy(np.asarray(tensor.data).copy().view(np.uint8).reshape(shape[0], -1))
        codes = unpack_ternary(packed, shape[1])
    return codes, torch.from_numpy(np.asarray(scale.data, dtype=np.float32).copy()).reshape(())


def _storage_type(gguf, name: str, tensor: torch.Tensor, dtype: str, matrices: set[str]):
    types = gguf.GGMLQuantizationType
    if dtype == "q8_0" and name in matrices and tensor.dim() == 2 and tensor.shape[-1] % 32 == 0:
        return types.Q8_0
    if dtype == "f16" and tensor.dim() >= 2 and not set(name.split(".")) & set(KEPT_FLOAT):
        return types.F16
    return types.F32


def _config_metadata(writer, config: ModelConfig) -> None:
    """Standard llama.cpp-style keys where they map, then looplm's loop keys."""
    arch = ARCHITECTURE
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_core_layers)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.rope_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_uint32(f"{arch}.format_version", FORMAT_VERSION)
    writer.add_string(f"{arch}.config", json.dumps(asdict(config), sort_keys=True))
    writer.add_uint32(f"{arch}.loop.steps", config.loop_steps)
    writer.add_uint32(f"{arch}.loop.prelude_layer_count", config.n_prelude_layers)
    writer.add_uint32(f"{arch}.loop.core_layer_count", config.n_core_layers)
    writer.add_uint32(f"{arch}.loop.coda_layer_count", config.n_coda_layers)
    writer.add_bool(f"{arch}.loop.exit_gate", config.exit_gate)
    # The inference defaults the model records (looplm.exit_policy.default_exit_policy): the least
    # and most loop steps per token, the exit policy, its Q-exit threshold (q = 1, always the most
    # steps, unless the policy is Q-exit) and nanochat's perplexity threshold.
    policy = default_exit_policy(config)
    writer.add_float32(f"{arch}.loop.exit_threshold", policy.threshold if isinstance(policy, QExit) else 1.0)
    writer.add_float32(f"{arch}.loop.act_threshold", config.act_threshold)
    writer.add_uint32(f"{arch}.loop.min_steps", config.min_loop_steps)
    writer.add_uint32(f"{arch}.loop.max_steps", policy.max_steps(config.loop_steps))
    writer.add_string(f"{arch}.loop.exit_policy", config.default_exit)
    if isinstance(policy, PerplexityExit):
        writer.add_float32(f"{arch}.loop.perplexity_threshold", policy.threshold)
    writer.add_string(f"{arch}.loop.injection", config.injection)
    writer.add_string(f"{arch}.loop.initial_state", config.initial_state)
    writer.add_bool(f"{arch}.loop.step_norm", config.step_norm)
    writer.add_string(f"{arch}.layer_pattern", config.layer_pattern or "A")
    writer.add_array(f"{arch}.core_mixer_kinds", [config.layer_kind(i) for i in range(config.n_core_layers)])
    writer.add_string(f"{arch}.attention.kind", config.attention)
    writer.add_string(f"{arch}.norm_kind", config.norm)
    writer.add_string(f"{arch}.ffn_kind", config.ffn)
    writer.add_bool(f"{arch}.tie_embeddings", config.tie_embeddings)


def _tokenizer_metadata(writer, tokenizer) -> None:
    """The exact tokenizer.json text, plus ggml's token list and special ids for other readers."""
    writer.add_string("tokenizer.huggingface.json", tokenizer.backend.to_str())
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * tokenizer.vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    writer.add_token_list(tokens)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)


def export_gguf(model, path: str | Path, dtype: str = "f32", tokenizer=None, force: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) to a GGUF file; atomic, and an existing file is only
    replaced with ``force``.  ``dtype``: f32, f16 or q8_0 (see the module docstring)."""
    from looplm.quant import is_quantized
    from looplm.ternary import is_packed

    gguf = _gguf()
    path = Path(path)
    if dtype not in DTYPES:
        raise LoopLMError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if path.exists() and not force:
        raise LoopLMError(f"{str(path)!r} already exists: choose another path or pass --force to replace it")
    if is_quantized(model) or is_packed(model):
        raise LoopLMError("export the trained float32 model: an int8 (looplm.quant) or packed ternary model is for"
                          " inference only; use --dtype q8_0 or --dtype ternary for packed weights in the file")
    ternary = _ternary_names(model)
    if dtype == "ternary" and not ternary:
        raise LoopLMError("--dtype ternary packs the ternary layers of a model trained with model.ternary = core or"
                          " all; this model has none")
    names = _tensor_names(model)
    matrices = _matrix_names(model) - ternary
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(str(staging), ARCHITECTURE)
        writer.add_name(path.stem)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "ternary": gguf.LlamaFileType.MOSTLY_TQ2_0}[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _config_metadata(writer, model.config)
        if dtype == "ternary":
            writer.add_array(TERNARY_WEIGHTS_KEY, sorted(names[name] for name in ternary))
        if tokenizer is not None:
            _tokenizer_metadata(writer, tokenizer)
        for name, tensor in model.state_dict().items():
            if dtype == "ternary" and name in ternary:
                _add_ternary(writer, gguf, names[name], tensor)
                continue
            if name in ternary:  # shadow weights: float32 under every other dtype
                writer.add_tensor(names[name], tensor.detach().float().cpu().contiguous().numpy())
                continue
            array = tensor.detach().float().cpu().contiguous().numpy()
            kind = _storage_type(gguf, name, tensor, dtype, matrices)
            if kind == gguf.GGMLQuantizationType.Q8_0:
                writer.add_tensor(names[name], gguf.quants.quantize(array, kind), raw_dtype=kind)
            else:
                writer.add_tensor(names[name], array.astype(np.float16 if kind == gguf.GGMLQuantizationType.F16
                                                              else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    finally:
        if staging.exists():
            staging.unlink()
    return path


def _open(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise LoopLMError(f"GGUF file {str(path)!r} not found: check the path")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError, IndexError, struct and numpy errors alike
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise LoopLMError(f"{str(path)!r} is not a readable GGUF file ({detail}): it is corrupt, truncated or"
                          " not GGUF") from None


def _field(reader, path: Path, key: str):
    if key not in reader.fields:
        raise LoopLMError(f"{str(path)!r} has no {key} metadata: not a GGUF file written by looplm")
    return reader.fields[key].contents()


def read_metadata(path: str | Path) -> dict:
    """Every metadata key of a GGUF file and its value (GGUF's own header fields left out)."""
    reader = _open(Path(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _tensor_array(gguf, tensor) -> np.ndarray:
    """A reader tensor as float32 in torch's dimension order (Q8_0 dequantised)."""
    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(tensor.data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(tensor.data), kind).astype(np.float32)


def _q8_blocks(tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 reader tensor's exact int8 values [N, K] and float16 scales (as float32) [N, K/32]."""
    raw = np.asarray(tensor.data).reshape(shape[0], shape[1] // 32, 34)
    scales = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    values = raw[..., 2:].copy().view(np.int8).reshape(shape)
    return torch.from_numpy(values), torch.from_numpy(scales)


def load_gguf(path: str | Path, int8: bool = False):
    """Rebuild a LoopLM (and its tokenizer, or None) from a GGUF file written by ``export_gguf``.

    Q8_0 tensors are dequantised to float32; with ``int8`` the model's Linear layers become
    ``looplm.quant.Int8Linear`` instead, keeping a Q8_0 file's int8 values and scales exactly.
    Packed ternary tensors become ``looplm.ternary.TernaryLinear`` layers (exact codes and scales).
    Every mismatch (wrong architecture, missing or extra tensor, wrong shape) is one line."""
    from looplm.model.lm import LoopLM

    gguf = _gguf()
    path = Path(path)
    reader = _open(path)
    architecture = _field(reader, path, "general.architecture")
    if architecture != ARCHITECTURE:
        raise LoopLMError(f"{str(path)!r} holds a {architecture!r} model, not a looplm one: only files written by"
                          " 'looplm export gguf' load here")
    version = _field(reader, path, f"{ARCHITECTURE}.format_version")
    if version > FORMAT_VERSION:
        raise LoopLMError(f"{str(path)!r} uses looplm GGUF format version {version}; this looplm reads up to"
                          f" {FORMAT_VERSION}: upgrade looplm")
    try:
        raw_config = json.loads(_field(reader, path, f"{ARCHITECTURE}.config"))
    except json.JSONDecodeError:
        raise LoopLMError(f"{str(path)!r}: the {ARCHITECTURE}.config metadata is not valid JSON") from None
    config = from_dict(ModelConfig, raw_config, "model")
    with torch.device("meta"):
        model = LoopLM(config)
    names = _tensor_names(model)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    packed_names = set(reader.fields[TERNARY_WEIGHTS_KEY].contents()) if TERNARY_WEIGHTS_KEY in reader.fields else set()
    unexpected = set(stored) - set(names.values()) - {_scale_name(name) for name in packed_names}
    if unexpected:
        raise LoopLMError(f"{str(path)!r} has tensor {sorted(unexpected)[0]!r}, which its config does not use")
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    weights, q8, ternary = {}, {}, {}
    for name, stored_name in names.items():
        if stored_name not in stored:
            raise LoopLMError(f"{str(path)!r} lacks tensor {stored_name!r} ({name}): the file is incomplete")
        tensor = stored[stored_name]
        shape = tuple(int(size) for size in reversed(tensor.shape))  # ggml order → torch order
        if stored_name in packed_names:
            if _scale_name(stored_name) not in stored:
                raise LoopLMError(f"{str(path)!r} lacks tensor {_scale_name(stored_name)!r}: the file is incomplete")
            codes, scale = _read_ternary(gguf, tensor, expected_shapes[name], stored[_scale_name(stored_name)])
            ternary[name] = codes, scale
            weights[name] = codes.float() * scale
            continue
        if shape != expected_shapes[name]:
            raise LoopLMError(f"{str(path)!r}: tensor {stored_name!r} has shape {shape}, the config needs"
                              f" {expected_shapes[name]}")
        weights[name] = torch.from_numpy(_tensor_array(gguf, tensor).reshape(shape).copy())
        if int(tensor.tensor_type) == int(gguf.GGMLQuantizationType.Q8_0):
            q8[name] = tensor
    model.load_state_dict(weights, assign=True)
    model.rebuild_derived_buffers("cpu")
    model.eval()
    if ternary:
        _keep_ternary(model, ternary)
    if int8:
        _keep_int8(model, q8)
    return model, _tokenizer(reader)


def _keep_ternary(model, ternary: dict) -> None:
    """Swap the ternary layers read from packed tensors for ``TernaryLinear`` with their exact codes."""
    from looplm.ternary import TernaryLinear

    swap_modules(model, lambda name, module: f"{name}.weight" in ternary,
                 lambda name, module: TernaryLinear.from_codes(*ternary[f"{name}.weight"], module.bias))


def _keep_int8(model, q8: dict) -> None:
    """Swap quantizable Linears for Int8Linear, from the file's Q8_0 blocks where it has them."""
    from looplm.quant import Int8Linear, quantizable

    def build(name, module):
        if f"{name}.weight" not in q8:
            return Int8Linear.from_linear(module)
        return Int8Linear(*_q8_blocks(q8[f"{name}.weight"], tuple(module.weight.shape)), module.bias)

    swap_modules(model, quantizable, build)


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file written by looplm, or None."""
    return _tokenizer(_open(Path(path)))


def _tokenizer(reader):
    if "tokenizer.huggingface.json" not in reader.fields:
        return None
    from tokenizers import Tokenizer as HFTokenizer

    from looplm.data.tokenizer import Tokenizer

    return Tokenizer(HFTokenizer.from_str(reader.fields["tokenizer.huggingface.json"].contents()))


def is_gguf_path(path: str | Path) -> bool:
    """True for an existing file named *.gguf (what ``looplm.load`` hands to ``load_gguf``)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()
