"""The GGUF file format of looplm models (the ``gguf`` package; ``pip install looplm[gguf]``).

A looplm GGUF file is self-describing: architecture ``looplm``, the full ``ModelConfig`` as a
JSON string (``looplm.config``, what ``read_gguf`` rebuilds from), the loop and layer metadata
as typed keys for other readers, the tokenizer's ``tokenizer.json`` text, and one tensor per
entry of the model's state dict.  This module reads and writes configs and tensors; the model
layer (``looplm.model.loading``, ``looplm.interop.gguf``) builds and checks the model.
docs/INTEROP.md lists every key and the tensor-name mapping.

Tensor names: the common tensors get llama.cpp-style names (``token_embd.weight``,
``blk.N.attn_qkv.weight``, …) with the looped core as ``blk.N``, the prelude as
``prelude_blk.N`` and the coda as ``coda_blk.N``; any other state-dict entry keeps its looplm
name under the same layer prefix (``blk.0.attn.a_log``), so every architecture round-trips.

Storage types (``--dtype``): ``f32`` stores everything exactly; ``f16`` and ``bf16`` store
tensors of two or more dimensions as float16 or bfloat16 (norms, biases, the exit gate and MoE
routers stay float32; bf16 is read back exactly, as float32 values, and ``looplm generate
--dtype bf16`` then decodes from the same bf16 weights);
``q8_0`` stores the embedding, head and Linear weights whose rows are a multiple of 32 long as
Q8_0 blocks (32 int8 values + a float16 scale d = max|x|/127; the error per element is at
most d/2 + 127·|d − fp16(d)|) and everything else as float32.  GGUF lists shapes in ggml's
order (fastest dimension first), the reverse of torch's; the reader turns them back.

Ternary models (``model.ternary``): the writer is told their ternary layers' weights with
their codes and scales.  Under f32, f16, bf16 and q8_0 those float32 shadow weights stay float32
(rounding them would move the codes; the file resumes training exactly).  ``ternary`` stores
each as codes: gguf's TQ2_0 blocks (256 2-bit codes + a float16 scale) where rows are a
multiple of 256 long, else looplm's 2-bit layout (``looplm.checkpoint.ternary``) as an I8
tensor [N, ceil(K/4)]; beside each, its exact float32 scale as ``<name>.ternary_scale`` (TQ2_0's
block scales are its float16 rounding), and ``looplm.ternary.weights`` lists the packed
tensors.  Everything else is float32.  The reader returns their exact codes and scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from looplm.checkpoint.atomic import atomic_write
from looplm.checkpoint.stored import StoredModel
from looplm.checkpoint.ternary import pack_ternary, packed_width, unpack_ternary
from looplm.config import ModelConfig, from_dict, parse_exit_spec
from looplm.errors import JSON_ERRORS, LoopLMError, is_int

ARCHITECTURE = "looplm"
FORMAT_VERSION = 1
DTYPES = ("f32", "f16", "bf16", "q8_0", "ternary")
TQ2_0_ROW = 256  # TQ2_0 blocks hold 256 weights: shorter rows use looplm's 2-bit layout
TERNARY_WEIGHTS_KEY = f"{ARCHITECTURE}.ternary.weights"
TERNARY_ROWS_KEY = f"{ARCHITECTURE}.ternary.row_lengths"  # K of each, in the same order (2-bit rows are padded)
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
# Never rounded: decisions, not projections (the exit gate, MoE routers), and the eval noise table
# (looplm.model.loading.derived_tensors), which a runtime must replay exactly.
KEPT_FLOAT = ("exit_gate", "router", "noise")
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


def looplm_name(stored: str) -> str:
    """The looplm state-dict name of a GGUF tensor name (``gguf_name`` inverted)."""
    for name, mapped in TOP_LEVEL_NAMES.items():
        if stored == mapped:
            return name
    prefix, _, rest = stored.partition(".")
    stages = {value: key for key, value in STAGE_PREFIXES.items()}
    if prefix in stages:
        index, _, inner = rest.partition(".")
        inverse = {value: key for key, value in LAYER_NAMES.items()}
        return f"{stages[prefix]}.{index}.{inverse.get(inner, inner)}"
    return stored


def tensor_names(names) -> dict[str, str]:
    """state-dict name → GGUF name for ``names`` (checked one-to-one and within ggml's length)."""
    mapping = {name: gguf_name(name) for name in names}
    if len(set(mapping.values())) != len(mapping):
        raise RuntimeError("two looplm tensors map to one GGUF name: fix looplm.checkpoint.gguf's name tables")
    too_long = [name for name in mapping.values() if len(name.encode()) > MAX_NAME_BYTES]
    if too_long:
        raise LoopLMError(f"GGUF tensor name {too_long[0]!r} is longer than {MAX_NAME_BYTES} bytes")
    return mapping


def _storage_type(gguf, name: str, tensor: torch.Tensor, dtype: str, matrices: set[str]):
    types = gguf.GGMLQuantizationType
    if dtype == "q8_0" and name in matrices and tensor.dim() == 2 and tensor.shape[-1] % 32 == 0:
        return types.Q8_0
    if dtype in ("f16", "bf16") and tensor.dim() >= 2 and not set(name.split(".")) & set(KEPT_FLOAT):
        return types.F16 if dtype == "f16" else types.BF16
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
    writer.add_string(f"{arch}.config", json.dumps(config.to_dict(), sort_keys=True))
    writer.add_uint32(f"{arch}.loop.steps", config.loop_steps)
    writer.add_uint32(f"{arch}.loop.prelude_layer_count", config.n_prelude_layers)
    writer.add_uint32(f"{arch}.loop.core_layer_count", config.n_core_layers)
    writer.add_uint32(f"{arch}.loop.coda_layer_count", config.n_coda_layers)
    writer.add_bool(f"{arch}.loop.exit_gate", config.exit_gate)
    # The inference defaults the model records (looplm.exit_policy.default_exit_policy): the least
    # and most loop steps per token, the exit policy, its Q-exit threshold (q = 1, always the most
    # steps, unless the policy is Q-exit) and nanochat's perplexity threshold.
    kind, number = parse_exit_spec(config.default_exit)
    writer.add_float32(f"{arch}.loop.exit_threshold", number if kind == "q" else 1.0)
    writer.add_uint32(f"{arch}.loop.min_steps", config.min_loop_steps)
    writer.add_uint32(f"{arch}.loop.max_steps", config.max_loop_steps or config.loop_steps)
    writer.add_string(f"{arch}.loop.exit_policy", config.default_exit)
    if kind == "ppl":
        writer.add_float32(f"{arch}.loop.perplexity_threshold", number)
    writer.add_float32(f"{arch}.loop.act_threshold", config.act_threshold)
    writer.add_string(f"{arch}.loop.injection", config.injection)
    writer.add_string(f"{arch}.loop.initial_state", config.initial_state)
    writer.add_bool(f"{arch}.loop.step_norm", config.step_norm)
    writer.add_string(f"{arch}.layer_pattern", config.layer_pattern or "A")
    writer.add_array(f"{arch}.core_mixer_kinds", [config.layer_kind(i) for i in range(config.n_core_layers)])
    writer.add_string(f"{arch}.attention.kind", config.attention.kind)
    writer.add_string(f"{arch}.norm_kind", config.norm.placement)
    writer.add_string(f"{arch}.ffn_kind", config.ffn.kind)
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


def _scale_name(stored_name: str) -> str:
    """GGUF name of a packed ternary weight's float32 scale."""
    return stored_name.removesuffix("weight") + "ternary_scale"


def _add_ternary(writer, gguf, stored_name: str, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Ternary codes [N, K] as TQ2_0 blocks (rows of 256k) or looplm's 2-bit layout, and the scale."""
    if codes.shape[-1] % TQ2_0_ROW == 0:
        kind = gguf.GGMLQuantizationType.TQ2_0
        writer.add_tensor(stored_name, gguf.quants.quantize((codes.float() * scale).numpy(), kind), raw_dtype=kind)
    else:
        writer.add_tensor(stored_name, pack_ternary(codes.to(torch.int8)).view(torch.int8).numpy())
    writer.add_tensor(_scale_name(stored_name), scale.float().reshape(1).numpy())


def _read_ternary(gguf, tensor, scale, width: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed ternary tensor's codes [N, K = width] (int8) and its float32 scale (0-d); a row
    length, size or scale that does not fit the stored data is one line."""
    rows = int(tensor.shape[-1])  # ggml order: the row count is the last dimension
    data = np.asarray(tensor.data)
    if int(tensor.tensor_type) == int(gguf.GGMLQuantizationType.TQ2_0):
        values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.TQ2_0)
        fits = values.size == rows * width
    else:
        values = data.copy().view(np.uint8) if data.dtype.itemsize == 1 else data
        fits = values.dtype == np.uint8 and values.size == rows * packed_width(width)
    if not fits or np.asarray(scale.data).size != 1:
        raise LoopLMError(f"{str(path)!r}: packed ternary tensor {tensor.name!r} does not hold {rows} rows of"
                          f" {width} codes and one scale, as its {TERNARY_ROWS_KEY} entry says: the file is damaged")
    if int(tensor.tensor_type) == int(gguf.GGMLQuantizationType.TQ2_0):
        codes = torch.from_numpy(np.sign(values).reshape(rows, width)).to(torch.int8)
    else:
        codes = unpack_ternary(torch.from_numpy(values.reshape(rows, -1)), width)
        if bool((codes > 1).any()):  # the 2-bit field 3 is no code
            raise LoopLMError(f"{str(path)!r}: packed ternary tensor {tensor.name!r} holds codes other than -1, 0"
                              " and 1: the file is damaged")
    return codes, torch.from_numpy(np.asarray(scale.data, dtype=np.float32).copy()).reshape(())


def write_gguf(path: str | Path, config: ModelConfig, weights: dict[str, torch.Tensor], matrices: set[str],
               dtype: str = "f32", tokenizer=None, force: bool = False,
               ternary: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write a model's ``config`` and ``weights`` (and ``tokenizer``) to a GGUF file; atomic, and an
    existing file is only replaced with ``force``.  ``matrices``: the Embedding and Linear weights,
    which ``q8_0`` quantises; ``ternary``: the ternary layers' weights, name → (codes, scale);
    ``dtype``: f32, f16, bf16, q8_0 or ternary (see the module docstring)."""
    gguf = _gguf()
    path = Path(path)
    ternary = ternary or {}
    if dtype not in DTYPES:
        raise LoopLMError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "ternary" and not ternary:
        raise LoopLMError("--dtype ternary packs the ternary layers of a model trained with model.ternary = core or"
                          " all; this model has none")
    if path.exists() and not force:
        raise LoopLMError(f"{str(path)!r} already exists: choose another path or pass --force to replace it")
    names = tensor_names(weights)
    matrices = matrices - set(ternary)

    def write(staging: Path) -> None:
        writer = gguf.GGUFWriter(str(staging), ARCHITECTURE)
        writer.add_name(path.stem)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "ternary": gguf.LlamaFileType.MOSTLY_TQ2_0}[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _config_metadata(writer, config)
        if dtype == "ternary":
            packed = sorted(ternary, key=names.get)
            writer.add_array(TERNARY_WEIGHTS_KEY, [names[name] for name in packed])
            writer.add_array(TERNARY_ROWS_KEY, [int(ternary[name][0].shape[-1]) for name in packed])
        if tokenizer is not None:
            _tokenizer_metadata(writer, tokenizer)
        for name, tensor in weights.items():
            if dtype == "ternary" and name in ternary:
                _add_ternary(writer, gguf, names[name], *ternary[name])
                continue
            array = tensor.detach().float().cpu().contiguous().numpy()
            kind = gguf.GGMLQuantizationType.F32 if name in ternary else _storage_type(gguf, name, tensor, dtype,
                                                                                      matrices)
            if kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16):  # packed by gguf-py
                writer.add_tensor(names[name], gguf.quants.quantize(array, kind), raw_dtype=kind)
            else:
                writer.add_tensor(names[name], array.astype(np.float16 if kind == gguf.GGMLQuantizationType.F16
                                                              else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


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
    return _contents(reader.fields[key], path, key)


def _contents(field, path: Path, key: str):
    """A metadata field's value; a string that is not UTF-8 is a damaged file, one line."""
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise LoopLMError(f"{str(path)!r}: its {key} metadata is not valid UTF-8: the file is damaged") from None


def read_metadata(path: str | Path) -> dict:
    """Every metadata key of a GGUF file and its value (GGUF's own header fields left out)."""
    path = Path(path)
    reader = _open(path)
    return {key: _contents(field, path, key) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _tensor_array(gguf, tensor) -> np.ndarray:
    """A reader tensor as float32 in torch's dimension order (Q8_0 dequantised, bf16 widened)."""
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


def read_gguf(path: str | Path, device: str | torch.device = "cpu") -> StoredModel:
    """The config and tensors of a GGUF file written by ``write_gguf``.  Q8_0 tensors are
    dequantised to float32, and their exact int8 values and scales kept in ``int8`` (for
    ``looplm.quant.Int8Linear``).  A foreign or newer file is one line."""
    gguf = _gguf()
    path = Path(path)
    reader = _open(path)
    architecture = _field(reader, path, "general.architecture")
    if architecture != ARCHITECTURE:
        raise LoopLMError(f"{str(path)!r} holds a {architecture!r} model, not a looplm one: only files written by"
                          " 'looplm export gguf' load here")
    version = _field(reader, path, f"{ARCHITECTURE}.format_version")
    if not is_int(version):
        raise LoopLMError(f"{str(path)!r}: its {ARCHITECTURE}.format_version is {version!r}, not a whole number: the"
                          " file is damaged")
    if version > FORMAT_VERSION:
        raise LoopLMError(f"{str(path)!r} uses looplm GGUF format version {version}; this looplm reads up to"
                          f" {FORMAT_VERSION}: upgrade looplm")
    raw_config = _field(reader, path, f"{ARCHITECTURE}.config")
    try:
        if not isinstance(raw_config, str):
            raise TypeError
        raw_config = json.loads(raw_config)
    except (*JSON_ERRORS, TypeError):  # TypeError: the metadata is not a string
        raise LoopLMError(f"{str(path)!r}: the {ARCHITECTURE}.config metadata is not valid JSON") from None
    config = from_dict(ModelConfig, raw_config, "model")
    weights, int8, ternary = {}, {}, {}
    readable = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                gguf.GGMLQuantizationType.Q8_0)
    packed = {}  # packed ternary tensor name → its row length K
    if TERNARY_WEIGHTS_KEY in reader.fields:
        names, widths = _field(reader, path, TERNARY_WEIGHTS_KEY), _field(reader, path, TERNARY_ROWS_KEY)
        if (not isinstance(names, list) or not isinstance(widths, list) or len(names) != len(widths)
                or not all(isinstance(name, str) for name in names)
                or not all(is_int(width) and width >= 1 for width in widths)):
            raise LoopLMError(f"{str(path)!r}: {TERNARY_WEIGHTS_KEY} and {TERNARY_ROWS_KEY} must list tensor names"
                              " and their row lengths (>= 1), one for one: the file is damaged")
        packed = dict(zip(names, widths))
    stored = {tensor.name: tensor for tensor in reader.tensors}
    for tensor in reader.tensors:
        if tensor.name in packed:
            if _scale_name(tensor.name) not in stored:
                raise LoopLMError(f"{str(path)!r} lacks tensor {_scale_name(tensor.name)!r}: the file is incomplete")
            name = looplm_name(tensor.name)
            ternary[name] = _read_ternary(gguf, tensor, stored[_scale_name(tensor.name)], packed[tensor.name], path)
            weights[name] = (ternary[name][0].float() * ternary[name][1]).to(device)
            continue
        if tensor.name in {_scale_name(name) for name in packed}:
            continue
        kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        if kind not in readable:
            raise LoopLMError(f"{str(path)!r}: tensor {tensor.name!r} is stored as {kind.name}, which looplm does not"
                              f" read (it reads {', '.join(DTYPES)})")
        shape = tuple(int(size) for size in reversed(tensor.shape))  # ggml order → torch order
        name = looplm_name(tensor.name)
        weights[name] = torch.from_numpy(_tensor_array(gguf, tensor).reshape(shape).copy()).to(device)
        if kind == gguf.GGMLQuantizationType.Q8_0 and len(shape) == 2:
            int8[name] = _q8_blocks(tensor, shape)
    return StoredModel(config, weights, path, int8, gguf_name, ternary=ternary)


def read_gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file written by looplm, or None."""
    from tokenizers import Tokenizer as HFTokenizer

    from looplm.data.tokenizer import Tokenizer

    reader = _open(Path(path))
    if "tokenizer.huggingface.json" not in reader.fields:
        return None
    try:
        return Tokenizer(HFTokenizer.from_str(reader.fields["tokenizer.huggingface.json"].contents()))
    except Exception as error:  # tokenizers raises its own exception types for a broken tokenizer.json
        detail = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise LoopLMError(f"{str(path)!r}: its tokenizer.huggingface.json is not a valid tokenizer"
                          f" ({detail})") from None


def is_gguf_path(path: str | Path) -> bool:
    """True for an existing file named *.gguf (what ``looplm.load`` reads with ``read_gguf``)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()
