"""The C tokenizer (csrc/lr_tokenizer.c, what looplm-run encodes prompts and decodes tokens with):
the same ids as Hugging Face tokenizers for looplm's byte and BPE tokenizers, the same text as
looplm's decode, Unicode classes equal to the tokenizers pattern engine's, and tokenizer.json
features it does not implement refused by name."""

import json
import subprocess

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from looplm.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from looplm.interop.gguf import export_gguf
from looplm.kernels import unicode_classes
from looplm.model import LoopLM

from conftest import tiny_config

pytest.importorskip("gguf")

CORPUS = ["The quick brown fox jumps over the lazy dog. It's 12:30, isn't it? We'll see; they're here.",
          "Ünïcödé tëxt: café, naïve, Ελληνικά, русский текст, 日本語のテキスト, 한국어 😀🚀 — done!",
          "def f(x):\n    return x ** 2  # numbers 123 4567 89.0\n\n\ttabs\tand  double  spaces"] * 20
TEXTS = ["", "hello world", "Hello, World!", "it's I'M we'll they're you've I'd don't 's", "  leading",
         "trailing   ", "a  b   c", "x \n y", "line\n\nbreaks\r\n", "\ttab\t\tx", "12 345 6.78 9,000",
         "café naïve résumé", "Ελληνικά και русский", "日本語 テスト", "emoji 😀🚀 mix", "ab\u0301c combining",
         "nb\u00a0sp and\u3000ideographic", "<eos> <bos> spelled", "!!! ??? ... ---", "a'b 'quoted' \"double\"",
         "Ⅻ ½ ² numbers", "mixed123abc456", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 400)


def model_file(tmp_path, tokenizer: Tokenizer, name: str = "model.gguf"):
    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=96)).eval()
    return export_gguf(model, tmp_path / name, tokenizer=tokenizer)


def tokenize(binary, path, text) -> list[int]:
    result = subprocess.run([str(binary), str(path), "--tokenize", "--prompt", text], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [int(token) for token in result.stdout.split()]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_encoding_matches_tokenizers(kind, bpe, looplm_run, tmp_path):
    tokenizer = byte_tokenizer() if kind == "byte" else bpe
    path = model_file(tmp_path, tokenizer)
    for text in TEXTS + CORPUS[:3]:
        assert tokenize(looplm_run, path, text) == [tokenizer.bos_id] + tokenizer.encode(text), repr(text)
    # invalid UTF-8 reads as U+FFFD, as looplm's encode replaces what has no UTF-8 form
    result = subprocess.run([str(looplm_run), str(path), "--tokenize", "--prompt", b"caf\xe9 \xff!"],
                            capture_output=True, timeout=60)
    assert [int(token) for token in result.stdout.split()] == [tokenizer.bos_id] + tokenizer.encode("caf\ufffd \ufffd!")


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_decoding_matches_looplm(kind, bpe, looplm_run, tmp_path):
    """Generated text (streamed token by token as raw bytes) reads as looplm's decode of the ids."""
    tokenizer = byte_tokenizer() if kind == "byte" else bpe
    path = model_file(tmp_path, tokenizer)
    outputs = [subprocess.run([str(looplm_run), str(path), "--prompt", "The", "-n", "40", *extra],
                              capture_output=True, timeout=60) for extra in ([], ["--print-ids"])]
    ids = [int(token) for token in outputs[1].stdout.split()]
    assert ids and outputs[0].stdout.decode("utf-8", errors="replace") == tokenizer.decode(ids) + "\n"


def test_unicode_classes_are_the_tokenizers_engines():
    """lr_unicode.h against the tokenizers pattern engine on a sample of every plane (the
    generator checks every code point; this keeps the committed header honest cheaply)."""
    tables = unicode_classes.read_header()
    sample = [*range(0, 0x3000), *range(0x3000, 0x110000, 101)]
    letters, numbers = unicode_classes.tokenizers_classes(sample)

    def member(name, code):
        return any(first <= code <= last for first, last in tables[name])

    for code in sample:
        if 0xD800 <= code < 0xE000:
            continue
        assert member("LR_LETTERS", code) == (code in letters), hex(code)
        assert member("LR_NUMBERS", code) == (code in numbers), hex(code)
    assert [code for first, last in tables["LR_SPACES"] for code in range(first, last + 1)] == \
        sorted(unicode_classes.WHITE_SPACE)


@pytest.mark.parametrize("change, message", [
    ({"normalizer": {"type": "NFC"}}, "tokenizer normalizer NFC is not supported"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "tokenizer pre_tokenizer Whitespace is not supported"),
    ({"decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True}},
     "tokenizer decoder WordPiece is not supported"),
])
def test_unsupported_tokenizer_features_are_refused_by_name(change, message, bpe, looplm_run, tmp_path):
    raw = json.loads(bpe.backend.to_str())
    raw.update(change)
    path = model_file(tmp_path, Tokenizer(HFTokenizer.from_str(json.dumps(raw))))
    result = subprocess.run([str(looplm_run), str(path), "--prompt", "hi"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith(f"looplm-run: error: {message}")
