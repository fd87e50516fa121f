"""Tests for looplm.data.tokenizer: byte layout, BPE training, save/load, foreign files."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from looplm.data.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer, train_bpe
from looplm.errors import LoopLMError

TRICKY_TEXTS = [
    "",
    "A",
    "é",
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n",
    "emoji 🎉👩‍👩‍👧 and CJK 漢字",
    "literal specials <pad><bos><eos> stay text",
    "\x00\x01\x7f control",
]


@pytest.fixture(scope="module")
def byte() -> Tokenizer:
    return byte_tokenizer()


def corpus(documents: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English with repeated words, so BPE finds merges."""
    rng = random.Random(seed)
    words = ["the", "loop", "model", "token", "layer", "again", "recurrent", "depth", "über", "naïve", "🙂"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + "\n" for _ in range(documents)]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(corpus(), vocab_size=300)


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_byte_ids_are_utf8_bytes(byte):
    assert byte.encode("A") == [65]
    assert byte.encode("é") == [0xC3, 0xA9]
    # Characters whose UTF-8 forms use every byte value that valid UTF-8 can contain.
    code_points = [*range(0x800), 0x800, *range(0x1000, 0x10000, 0x1000), *range(0x10000, 0x110000, 0x40000), 0x100000]
    text = "".join(chr(point) for point in code_points)
    assert byte.backend.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))
    assert set(text.encode("utf-8")) == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    for value in range(256):
        assert byte.backend.decode([value]) == bytes([value]).decode("utf-8", errors="replace")


def test_byte_special_ids(byte):
    assert (byte.pad_id, byte.bos_id, byte.eos_id, byte.vocab_size, byte.kind) == (256, 257, 258, 259, "byte")
    assert byte.backend.token_to_id("<eos>") == 258


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_byte_round_trip_and_fast_path_match_backend(byte, text):
    ids = byte.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert ids == byte.backend.encode(text, add_special_tokens=False).ids
    assert byte.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_text(text):
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(text)
    assert ids == tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=255), max_size=40))
def test_byte_decode_of_invalid_utf8_matches_backend(ids):
    tokenizer = byte_tokenizer()
    decoded = tokenizer.decode(ids)
    assert decoded == bytes(ids).decode("utf-8", errors="replace")
    assert decoded == tokenizer.backend.decode(ids)


def test_lone_surrogates_encode_as_replacement_character(byte, bpe):
    broken = json.loads('"a\\ud83d b"')
    for tokenizer in (byte, bpe):
        assert tokenizer.decode(tokenizer.encode(broken)) == "a\ufffd b"
        assert tokenizer.encode_batch(["ok", broken]) == [tokenizer.encode("ok"), tokenizer.encode("a\ufffd b")]


def test_decode_skips_specials_and_unknown_ids(byte):
    assert byte.decode([257, 72, 105, 258, 256, 256, 999, -1]) == "Hi"
    assert byte.decode([0xC3]) == "\ufffd"


def test_encode_batch_matches_encode(byte, bpe):
    texts = TRICKY_TEXTS + corpus(20)
    for tokenizer in (byte, bpe):
        assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_byte_encode_skips_the_backend(byte, monkeypatch):
    # Byte encoding is id = byte, computed directly (the fast path for many short strings);
    # its equality with the backend is tested above, here that the backend is not called.
    texts = [f"sample number {index}: the quick brown fox jumps" for index in range(100)]
    expected = [list(text.encode("utf-8")) for text in texts]
    monkeypatch.setattr(byte, "backend", None)
    assert byte.encode_batch(texts) == expected
    assert [byte.encode(text) for text in texts] == expected


def test_byte_save_and_load_keeps_kind_and_ids(byte, tmp_path):
    path = byte.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    assert not list((tmp_path / "tok").glob(".*tmp"))
    for source in (path, path.parent, str(path.parent)):
        loaded = Tokenizer.from_file(source)
        assert (loaded.kind, loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (
            "byte", 259, 256, 257, 258,
        )
        assert [loaded.encode(text) for text in TRICKY_TEXTS] == [byte.encode(text) for text in TRICKY_TEXTS]


def test_load_tokenizer_spec(byte, tmp_path):
    assert load_tokenizer("byte").kind == "byte"
    byte.save(tmp_path)
    assert load_tokenizer(str(tmp_path)).kind == "byte"


def test_bpe_training(bpe):
    assert bpe.kind == "bpe"
    assert 259 < bpe.vocab_size <= 300
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    sample = "the recurrent loop model again"
    assert len(bpe.encode(sample)) < len(sample.encode("utf-8"))


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_bpe_round_trips_unseen_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


BPE_FOR_PROPERTIES = train_bpe(corpus(50, seed=1), vocab_size=280)


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_text(text):
    assert BPE_FOR_PROPERTIES.decode(BPE_FOR_PROPERTIES.encode(text)) == text


def test_bpe_save_and_load_gives_same_encodings(bpe, tmp_path):
    bpe.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    texts = TRICKY_TEXTS + corpus(30, seed=7)
    assert loaded.kind == "bpe"
    assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (
        bpe.vocab_size, bpe.pad_id, bpe.bos_id, bpe.eos_id,
    )
    assert loaded.encode_batch(texts) == bpe.encode_batch(texts)


@pytest.mark.parametrize("vocab_size", [0, 259, 100, 300.0, True])
def test_bpe_rejects_bad_vocab_size(vocab_size):
    with pytest.raises(LoopLMError) as excinfo:
        train_bpe(corpus(5), vocab_size=vocab_size)
    assert "vocab_size" in one_line_error(excinfo)


def test_bpe_rejects_empty_corpus():
    with pytest.raises(LoopLMError) as excinfo:
        train_bpe([], vocab_size=300)
    assert "no text" in one_line_error(excinfo)


def foreign_word_level(tmp_path, specials: list[str]) -> Tokenizer:
    vocab = {word: index for index, word in enumerate(["[UNK]", "hello", "world", *specials])}
    backend = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer.from_file(tmp_path)


def test_foreign_tokenizer_finds_endoftext(tmp_path):
    loaded = foreign_word_level(tmp_path, ["<|endoftext|>"])
    assert loaded.kind == "bpe"
    assert loaded.vocab_size == 4
    assert loaded.eos_id == loaded.bos_id == loaded.pad_id == 3
    assert loaded.encode("hello world") == [1, 2]


def test_foreign_tokenizer_finds_separate_specials(tmp_path):
    loaded = foreign_word_level(tmp_path, ["<s>", "</s>", "<pad>"])
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (3, 4, 5)
    assert loaded.decode([3, 1, 2, 4, 5]) == "hello world"


def test_foreign_tokenizer_without_known_specials_falls_back(tmp_path):
    loaded = foreign_word_level(tmp_path, ["[MYEND]"])
    assert loaded.eos_id == loaded.bos_id == loaded.pad_id == 3
    plain = HFTokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_file(tmp_path).eos_id == 2


def test_foreign_truncation_is_switched_off(tmp_path):
    backend = HFTokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.enable_truncation(max_length=2)
    backend.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_file(tmp_path).encode("a a a a") == [1, 1, 1, 1]


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(LoopLMError) as excinfo:
        Tokenizer.from_file(tmp_path / "nope.json")
    assert "does not exist" in one_line_error(excinfo)
    with pytest.raises(LoopLMError) as excinfo:
        load_tokenizer(str(tmp_path))
    assert "no tokenizer.json" in one_line_error(excinfo)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00", b'{"model": 3}', b"[1, 2]", HFTokenizer(models.BPE()).to_str().encode()],
)
def test_corrupt_tokenizer_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(LoopLMError) as excinfo:
        Tokenizer.from_file(path)
    assert "tokenizer" in one_line_error(excinfo)
