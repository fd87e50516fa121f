"""lrnnSMDDS model files (``lrnnC02``) → looplm checkpoints: ``looplm convert lrnn FILE.bin DST``.

A lrnnSMDDS model is looplm's faithful ``lrnn`` preset: L unlooped layers of the RWKV-style
slot-memory mixer ("R") and ChannelMix, pre-LayerNorm with bias, a LayerNorm after the
embedding, an untied head (docs/ARCHITECTURES.md).  The file, native-endian (read as
little-endian, as x86 writes it), holds in order:

1. the magic ``b"lrnnC02\\0"`` (8 bytes);
2. the config: int32 vocab_size, n_layer, n_embd, n_head, ctx_len, decay_lora_rank; float32
   ffn_multiplier; int32 n_mem_slots (32 bytes);
3. int32 tokenizer type: 0 = char, 1 = word;
4. the tokenizer — char: int32 size, ``size`` bytes (the vocabulary, in id order), int32[256]
   (byte → id); word: int32 size, unk, pad, space, newline, then ``size`` entries of int32
   length + that many bytes, in id order;
5. tensors, each int32 rows, int32 cols, float32[rows·cols] row-major (a vector is (n, 1)):
   emb (V, d), ln0_w, ln0_b, int32 n_layers, then per layer ln1_w, ln1_b, ln2_w, ln2_b,
   time_shift_w1, w2, w4, time_mix_r, k, v, decay_lora_a (d, R), decay_lora_b (R, d),
   decay_base, time_first, Wr, Wk, Wv, Wo (d, d), channel_mix, ffn_gate, ffn_up (d, F),
   ffn_down (F, d), mem_gate_write, mem_gate_read (d, S); then ln_out_w, ln_out_b, head (d, V).

Every matrix is stored (in, out) and used as y = x @ W, so it becomes an ``nn.Linear`` weight
transposed; F = ⌊d · ffn_multiplier⌋ in float32.  Every mismatch (magic, header, tokenizer,
a tensor's shape, the layer count, a short or overlong file) is one ``LoopLMError`` naming the
byte offset.  The model has no position limit (its state is recurrent); the checkpoint's
``max_seq_len`` is 4096 (or ctx_len when larger), the context looplm will accept.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from looplm.config import MAX_VOCAB, ModelConfig
from looplm.errors import LoopLMError

MAGIC = b"lrnnC02\0"
LEGACY_MAGIC = b"lrnnC01\0"
CONTEXT = 4096
MAX_LAYERS = 4096
# The per-layer tensors in file order, with their looplm names (within core.N.) and how they map.
LAYER_TENSORS = ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "time_shift_w1", "time_shift_w2", "time_shift_w4",
                 "time_mix_r", "time_mix_k", "time_mix_v", "decay_lora_a", "decay_lora_b", "decay_base", "time_first",
                 "Wr", "Wk", "Wv", "Wo", "channel_mix", "ffn_gate", "ffn_up", "ffn_down", "mem_gate_write",
                 "mem_gate_read")
_LINEAR = {"decay_lora_a": "attn.decay_down.weight", "decay_lora_b": "attn.decay_up.weight",
           "Wr": "attn.receptance.weight", "Wk": "attn.key.weight", "Wv": "attn.value.weight", "Wo": "attn.out.weight",
           "ffn_down": "ffn.down.weight", "mem_gate_write": "attn.write_gate.weight",
           "mem_gate_read": "attn.read_gate.weight"}
_VECTOR = {"ln1_w": "attn_norm.weight", "ln1_b": "attn_norm.bias", "ln2_w": "ffn_norm.weight",
           "ln2_b": "ffn_norm.bias", "decay_base": "attn.decay_base", "time_first": "attn.time_first",
           "channel_mix": "ffn.channel_mix"}
_ROWS = {"attn.time_shift": ("time_shift_w1", "time_shift_w2", "time_shift_w4"),
         "attn.time_mix": ("time_mix_r", "time_mix_k", "time_mix_v")}


class _Reader:
    """Sequential little-endian reads from a file's bytes; a short read is one line with the offset."""

    def __init__(self, data: bytes, where: str):
        self.data, self.where, self.offset = data, where, 0

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.offset + count > len(self.data):
            raise LoopLMError(f"{self.where} ends at byte {len(self.data)} inside {what} (needs {count} bytes at"
                              f" offset {self.offset}): the file is truncated or not a lrnnC02 model")
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def int(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def counted(self, what: str, low: int, high: int) -> int:
        value = self.int(what)
        if not low <= value <= high:
            raise LoopLMError(f"{self.where}: {what} is {value} at offset {self.offset - 4}, outside [{low}, {high}]:"
                              " not a lrnnC02 model file")
        return value

    def tensor(self, what: str, shape: tuple[int, int]) -> torch.Tensor:
        at = self.offset
        rows, cols = self.int(f"the shape of {what}"), self.int(f"the shape of {what}")
        if (rows, cols) != shape:
            raise LoopLMError(f"{self.where}: tensor {what} at offset {at} is {rows} x {cols}, the header's config"
                              f" needs {shape[0]} x {shape[1]}")
        values = np.frombuffer(self.take(4 * rows * cols, f"tensor {what}"), dtype="<f4")
        return torch.from_numpy(values.astype(np.float32)).view(rows, cols)


def read_lrnn(path: str | Path):
    """(ModelConfig, state dict, Tokenizer) of a lrnnC02 file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise LoopLMError(f"{str(path)!r} is not a file: give the lrnnSMDDS model file (.bin) to convert")
    reader = _Reader(path.read_bytes(), repr(str(path)))
    magic = reader.take(8, "the magic")
    if magic == LEGACY_MAGIC:
        raise LoopLMError(f"{reader.where} is a lrnnC01 file (lrnnSMDDS's legacy char-only format): only lrnnC02 is"
                          " read; save the model again with a current lrnnSMDDS")
    if magic != MAGIC:
        raise LoopLMError(f"{reader.where} starts with {magic!r}, not {MAGIC!r}: not a lrnnSMDDS model file")
    vocab = reader.counted("vocab_size", 1, MAX_VOCAB)
    layers = reader.counted("n_layer", 1, MAX_LAYERS)
    width = reader.counted("n_embd", 1, 2**16)
    heads = reader.counted("n_head", 1, width)
    context = reader.counted("ctx_len", 1, 2**20)
    rank = reader.counted("decay_lora_rank", 1, width)
    multiple = struct.unpack("<f", reader.take(4, "ffn_multiplier"))[0]
    slots = reader.counted("n_mem_slots", 1, 2**16)
    hidden = int(np.float32(width) * np.float32(multiple)) if np.isfinite(multiple) else 0
    if hidden < 1:
        raise LoopLMError(f"{reader.where}: ffn_multiplier {multiple} gives an FFN width of {hidden}: not a lrnnC02"
                          " model file")
    if width % heads:
        raise LoopLMError(f"{reader.where}: n_head={heads} does not divide n_embd={width}")
    tokenizer = _read_tokenizer(reader, vocab)
    try:
        config = ModelConfig(vocab_size=vocab, d_model=width, n_heads=heads, n_core_layers=layers, loop_steps=1,
                             max_seq_len=max(CONTEXT, context), layer_pattern="R", rwkv_slots=slots,
                             rwkv_decay_rank=rank, norm="pre", step_norm=False, ffn="channelmix", ffn_hidden=hidden,
                             norm_type="layer", embed_norm=True, tie_embeddings=False, exit_gate=False)
    except LoopLMError as error:
        raise LoopLMError(f"{reader.where}: {error}") from None
    state = _read_tensors(reader, config)
    if reader.offset != len(reader.data):
        raise LoopLMError(f"{reader.where} has {len(reader.data) - reader.offset} bytes after the head tensor (offset"
                          f" {reader.offset}): not a lrnnC02 model of the header's config")
    return config, state, tokenizer


def _read_tokenizer(reader: _Reader, vocab: int):
    from looplm.data.word_char import char_tokenizer, word_tokenizer

    kind = reader.int("the tokenizer type")
    if kind == 0:
        size = reader.counted("the char vocabulary size", 1, 256)
        values = list(reader.take(size, "the char vocabulary"))
        table = struct.unpack("<256i", reader.take(4 * 256, "the char index table"))
        if len(set(values)) != size or any(table[value] != index for index, value in enumerate(values)):
            raise LoopLMError(f"{reader.where}: the char vocabulary and its index table disagree: the file is damaged")
        tokenizer = char_tokenizer(values)
    elif kind == 1:
        size = reader.counted("the word vocabulary size", 1, MAX_VOCAB)
        unknown, padding, space, newline = (reader.counted(name, 0, size - 1)
                                            for name in ("the unk id", "the pad id", "the space id", "the newline id"))
        entries = []
        for index in range(size):
            length = reader.counted(f"the length of word {index}", 0, 2**16)
            entries.append(reader.take(length, f"word {index}"))
        if entries[space] != b" " or entries[newline] != b"\n":
            raise LoopLMError(f"{reader.where}: the space and newline ids ({space}, {newline}) hold"
                              f" {entries[space]!r} and {entries[newline]!r}: the file is damaged")
        entries[unknown] = entries[padding] = None
        try:
            tokenizer = word_tokenizer(entries, unknown, padding)
        except LoopLMError as error:
            raise LoopLMError(f"{reader.where}: {error}") from None
    else:
        raise LoopLMError(f"{reader.where}: tokenizer type {kind} at offset {reader.offset - 4} is neither 0 (char)"
                          " nor 1 (word)")
    if tokenizer.vocab_size != vocab:
        raise LoopLMError(f"{reader.where}: the tokenizer has {tokenizer.vocab_size} entries, the header's vocab_size"
                          f" is {vocab}")
    return tokenizer


def _read_tensors(reader: _Reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    width, hidden, rank, slots = config.d_model, config.ffn_hidden, config.rwkv_decay_rank, config.rwkv_slots
    shapes = {"decay_lora_a": (width, rank), "decay_lora_b": (rank, width), "Wr": (width, width),
              "Wk": (width, width), "Wv": (width, width), "Wo": (width, width), "ffn_gate": (width, hidden),
              "ffn_up": (width, hidden), "ffn_down": (hidden, width), "mem_gate_write": (width, slots),
              "mem_gate_read": (width, slots)}
    vector = (width, 1)
    state = {"embed.weight": reader.tensor("emb", (config.vocab_size, width)),
             "embed_norm.weight": reader.tensor("ln0_w", vector).view(-1),
             "embed_norm.bias": reader.tensor("ln0_b", vector).view(-1)}
    layers = reader.int("the layer count")
    if layers != config.n_core_layers:
        raise LoopLMError(f"{reader.where}: the tensors hold {layers} layers (offset {reader.offset - 4}), the header"
                          f" says n_layer={config.n_core_layers}")
    for index in range(layers):
        raw = {name: reader.tensor(f"layers.{index}.{name}", shapes.get(name, vector)) for name in LAYER_TENSORS}
        prefix = f"core.{index}."
        state.update({prefix + ours: raw[theirs].view(-1) for theirs, ours in _VECTOR.items()})
        state.update({prefix + ours: raw[theirs].T.contiguous() for theirs, ours in _LINEAR.items()})
        state.update({prefix + ours: torch.stack([raw[name].view(-1) for name in rows])
                      for ours, rows in _ROWS.items()})
        state[prefix + "ffn.gate_up.weight"] = torch.cat([raw["ffn_gate"].T, raw["ffn_up"].T]).contiguous()
    state["norm.weight"] = reader.tensor("ln_out_w", vector).view(-1)
    state["norm.bias"] = reader.tensor("ln_out_b", vector).view(-1)
    state["head.weight"] = reader.tensor("head", (width, config.vocab_size)).T.contiguous()
    return state


def load_lrnn(path: str | Path):
    """(LoopLM in eval mode, Tokenizer) from a lrnnC02 file."""
    from looplm.model.lm import LoopLM

    config, state, tokenizer = read_lrnn(path)
    with torch.device("meta"):
        model = LoopLM(config)
    model.load_state_dict(state, assign=True)
    model.rebuild_derived_buffers("cpu")
    return model.eval(), tokenizer


def convert_lrnn_to_looplm(source: str | Path, destination: str | Path, force: bool = False) -> Path:
    """``looplm convert lrnn FILE.bin DST``: a looplm checkpoint directory (config.json,
    model.safetensors, the file's tokenizer as tokenizer.json), written atomically."""
    from looplm.interop.directory import check_destination

    source = Path(source)
    model, tokenizer = load_lrnn(source)
    destination = check_destination(source, destination, force)
    return model.save(destination, tokenizer)
