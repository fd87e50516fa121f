"""lrnnSMDDS model files → looplm (``looplm convert lrnn``): files built by hand from the documented
lrnnC02 layout (small sizes, random weights), the imported model held to a reference forward
written here from lrnnSMDDS's equations within 1e-5, its tokenizer, decoding, and one-line errors."""

import struct

import numpy as np
import pytest
import torch

import looplm
from looplm.cli import main
from looplm.generate import Decoder, FixedSteps
from looplm.interop.lrnn import LAYER_TENSORS, load_lrnn

WIDTH, HEADS, LAYERS, CONTEXT, RANK, MULTIPLE, SLOTS = 16, 2, 2, 8, 3, 1.5, 3
HIDDEN = int(WIDTH * MULTIPLE)
WORDS = [b"", b" ", b"\n", b".", b",", b"the", b"cat", b"sat", b"[", b"]"]  # unk = pad = 0 ("" in the source)
CHARS = sorted(set(b"the cat sat.\n"))


def layer_shapes() -> dict:
    vector = (WIDTH, 1)
    shapes = {name: vector for name in LAYER_TENSORS}
    shapes.update(decay_lora_a=(WIDTH, RANK), decay_lora_b=(RANK, WIDTH), Wr=(WIDTH, WIDTH), Wk=(WIDTH, WIDTH),
                  Wv=(WIDTH, WIDTH), Wo=(WIDTH, WIDTH), ffn_gate=(WIDTH, HIDDEN), ffn_up=(WIDTH, HIDDEN),
                  ffn_down=(HIDDEN, WIDTH), mem_gate_write=(WIDTH, SLOTS), mem_gate_read=(WIDTH, SLOTS))
    return shapes


def random_tensors(vocab: int, seed: int = 0) -> dict:
    """Weights in the file's (in, out) layout; norms and biases away from 1 and 0 so a swap shows."""
    rng = np.random.default_rng(seed)
    tensors = {"emb": rng.normal(0, 0.5, (vocab, WIDTH)), "ln0_w": 1 + rng.normal(0, 0.2, (WIDTH, 1)),
               "ln0_b": rng.normal(0, 0.2, (WIDTH, 1)), "ln_out_w": 1 + rng.normal(0, 0.2, (WIDTH, 1)),
               "ln_out_b": rng.normal(0, 0.2, (WIDTH, 1)), "head": rng.normal(0, 0.3, (WIDTH, vocab))}
    for layer in range(LAYERS):
        for name, shape in layer_shapes().items():
            scale = 0.3 if shape[1] > 1 or shape[0] != WIDTH else 0.5
            value = rng.normal(0, scale, shape)
            if name in ("ln1_w", "ln2_w"):
                value += 1
            if name in ("mem_gate_write", "mem_gate_read"):
                value *= 3  # gates far from uniform, so the slots matter
            tensors[f"layers.{layer}.{name}"] = value
    return {name: value.astype(np.float32) for name, value in tensors.items()}


def lrnn_file(path, tensors, kind="word", *, magic=b"lrnnC02\0", layers=LAYERS, cut=0, extra=b"",
              shape_override=None) -> None:
    """Write a lrnnC02 file by the documented layout."""
    vocab = len(WORDS) if kind == "word" else len(CHARS)
    out = bytearray(magic)
    out += struct.pack("<6ifi", vocab, LAYERS, WIDTH, HEADS, CONTEXT, RANK, MULTIPLE, SLOTS)
    if kind == "word":
        out += struct.pack("<i", 1) + struct.pack("<5i", len(WORDS), 0, 0, 1, 2)
        for word in WORDS:
            out += struct.pack("<i", len(word)) + word
    elif kind == "char":
        table = [0] * 256
        for index, value in enumerate(CHARS):
            table[value] = index
        out += struct.pack("<i", 0) + struct.pack("<i", len(CHARS)) + bytes(CHARS) + struct.pack("<256i", *table)
    else:
        out += struct.pack("<i", 7)

    def tensor(name):
        value = tensors[name]
        rows, cols = shape_override[1] if shape_override and shape_override[0] == name else value.shape
        return struct.pack("<2i", rows, cols) + value.astype("<f4").tobytes()

    out += tensor("emb") + tensor("ln0_w") + tensor("ln0_b") + struct.pack("<i", layers)
    for layer in range(LAYERS):
        for name in LAYER_TENSORS:
            out += tensor(f"layers.{layer}.{name}")
    out += tensor("ln_out_w") + tensor("ln_out_b") + tensor("head") + extra
    path.write_bytes(bytes(out[:len(out) - cut]))


def reference_logits(tensors, ids) -> torch.Tensor:
    """lrnnSMDDS's forward, token by token in float64, from its equations: [len(ids), V]."""
    w = {name: torch.from_numpy(value).double() for name, value in tensors.items()}
    vec = {name: value.view(-1) for name, value in w.items() if value.shape[1] == 1}

    def layer_norm(x, weight, bias):
        mean = x.mean()
        return vec[weight] * (x - mean) / torch.sqrt(((x - mean) ** 2).mean() + 1e-6) + vec[bias]

    def softmax(x):  # the source's: max subtracted, denominator + 1e-6
        exp = torch.exp(x - x.max())
        return exp / (exp.sum() + 1e-6)

    slopes = 2.0 ** (-8.0 * torch.arange(1, HEADS + 1, dtype=torch.float64) / HEADS)
    head_decay = torch.exp(-slopes.repeat_interleave(WIDTH // HEADS))
    history = [[torch.zeros(WIDTH, dtype=torch.float64)] * 4 for _ in range(LAYERS)]  # z_{t-1} .. z_{t-4}
    numerator = [torch.zeros(SLOTS, WIDTH, dtype=torch.float64) for _ in range(LAYERS)]
    denominator = [torch.zeros(SLOTS, WIDTH, dtype=torch.float64) for _ in range(LAYERS)]
    previous = [torch.zeros(WIDTH, dtype=torch.float64) for _ in range(LAYERS)]
    logits = []
    for token in ids:
        x = layer_norm(w["emb"][token], "ln0_w", "ln0_b")
        for layer in range(LAYERS):
            p = f"layers.{layer}."
            z = layer_norm(x, p + "ln1_w", p + "ln1_b")
            s1, s2, s4 = (torch.sigmoid(vec[p + f"time_shift_w{n}"]) for n in (1, 2, 4))
            before = history[layer]
            shifted = (s1 * before[0] + s2 * before[1] + s4 * before[3]) / (s1 + s2 + s4 + 1e-6)
            mixes = [torch.sigmoid(vec[p + f"time_mix_{c}"]) for c in "rkv"]
            xr, xk, xv = (m * z + (1 - m) * shifted for m in mixes)
            r = torch.sigmoid(xr @ w[p + "Wr"])
            k = torch.exp(torch.clamp(xk @ w[p + "Wk"], -10, 10))
            v = xv @ w[p + "Wv"]
            decay = torch.sigmoid(vec[p + "decay_base"] + (z @ w[p + "decay_lora_a"]) @ w[p + "decay_lora_b"])
            a = decay * head_decay
            u = torch.exp(torch.clamp(vec[p + "time_first"], -10, 10))
            write, read = softmax(z @ w[p + "mem_gate_write"]), softmax(z @ w[p + "mem_gate_read"])
            n_bar, d_bar = read @ numerator[layer], read @ denominator[layer]
            wkv = (n_bar + u * k * v) / (d_bar + u * k + 1e-6)
            numerator[layer] = a * numerator[layer] + write[:, None] * (k * v)
            denominator[layer] = a * denominator[layer] + write[:, None] * k
            history[layer] = [z] + before[:3]
            x = x + (r * wkv) @ w[p + "Wo"]
            y = layer_norm(x, p + "ln2_w", p + "ln2_b")
            mu = torch.sigmoid(vec[p + "channel_mix"])
            mixed = mu * y + (1 - mu) * previous[layer]
            previous[layer] = y
            x = x + ((torch.nn.functional.silu(mixed @ w[p + "ffn_gate"]) * (mixed @ w[p + "ffn_up"]))
                     @ w[p + "ffn_down"])
        logits.append(layer_norm(x, "ln_out_w", "ln_out_b") @ w["head"])
    return torch.stack(logits)


@pytest.mark.parametrize("kind", ["word", "char"])
def test_imported_model_equals_the_reference_forward(kind, tmp_path):
    vocab = len(WORDS) if kind == "word" else len(CHARS)
    tensors = random_tensors(vocab)
    lrnn_file(tmp_path / "model.bin", tensors, kind)
    assert main(["convert", "lrnn", str(tmp_path / "model.bin"), str(tmp_path / "ckpt")]) == 0
    model, tokenizer = looplm.load(tmp_path / "ckpt"), looplm.load_tokenizer(tmp_path / "ckpt")
    config = model.config
    assert (config.norm_type, config.embed_norm, config.tie_embeddings, config.exit_gate, config.loop_steps,
            config.n_core_layers, config.ffn_hidden, config.layer_pattern) == ("layer", True, False, False, 1, 2,
                                                                               24, "R")
    text = "the cat sat. the [cat],\nsat the dog" if kind == "word" else "the cat sat.\nthe sat"
    ids = tokenizer.encode(text)
    assert len(ids) > 12 and tokenizer.kind == kind and not tokenizer.adds_bos
    if kind == "word":
        assert ids[:4] == [5, 1, 6, 1] and 0 in ids  # "dog" is unknown: id 0
    expected = reference_logits(tensors, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits(1)[0]
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=0)
    decoder = Decoder(model, FixedSteps(1), len(ids))  # the C runtime runs it (LayerNorm, ln0, untied head)
    assert decoder.backend == "native"
    with torch.no_grad():
        decoder.prefill(torch.tensor([ids[:3]]))
        for position in range(3, len(ids)):
            step_logits, _ = decoder.step(ids[position])
            torch.testing.assert_close(step_logits.double(), expected[position], atol=1e-5, rtol=0)


def test_generate_feeds_the_prompt_without_a_start_token(tmp_path, capsys):
    tensors = random_tensors(len(WORDS))
    lrnn_file(tmp_path / "model.bin", tensors)
    model, tokenizer = load_lrnn(tmp_path / "model.bin")
    prompt = tokenizer.encode_prompt("the cat")
    assert prompt == [5, 1, 6]
    first = int(reference_logits(tensors, prompt)[-1].argmax())
    main(["convert", "lrnn", str(tmp_path / "model.bin"), str(tmp_path / "ckpt")])
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "the cat", "--max-new-tokens", "1",
                 "--no-stream"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode([first])


@pytest.mark.parametrize("damage, message", [
    (dict(magic=b"lrnnX02\0"), "not a lrnnSMDDS model file"),
    (dict(magic=b"lrnnC01\0"), "legacy char-only format"),
    (dict(cut=5), "ends at byte"),
    (dict(extra=b"\0\0\0\0"), "4 bytes after the head tensor"),
    (dict(layers=3), "the tensors hold 3 layers"),
    (dict(shape_override=("layers.1.Wk", (WIDTH, WIDTH - 1))), "tensor layers.1.Wk at offset"),
    (dict(kind="other"), "tokenizer type 7"),
])
def test_damaged_files_are_one_line_errors(damage, message, tmp_path, capsys):
    tensors = random_tensors(len(WORDS))
    lrnn_file(tmp_path / "model.bin", tensors, **damage)
    assert main(["convert", "lrnn", str(tmp_path / "model.bin"), str(tmp_path / "ckpt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("looplm: error:") and error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "ckpt").exists()


def test_existing_destination_is_refused(tmp_path, capsys):
    lrnn_file(tmp_path / "model.bin", random_tensors(len(WORDS)))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    assert main(["convert", "lrnn", str(tmp_path / "model.bin"), str(tmp_path / "ckpt")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "mine"
