"""Word and char tokenizers (lrnnSMDDS's rules, looplm.data.word_char): the vocabulary of a small
corpus worked out by hand, encoding held to a plain byte-by-byte encoder written here from the
rules, the auto choice at its 20,000-byte edge, save/load, prompts without <bos>, and the CLI."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.cli import main
from looplm.config import DataConfig
from looplm.data.prepare import build_tokenizer
from looplm.data.tokenizer import Tokenizer
from looplm.data.word_char import BOUNDARY, WORD_CAPACITY, auto_kind, char_tokenizer, fit_tokenizer, word_tokenizer
from looplm.errors import LoopLMError

CORPUS = "The cat, the dog.\nThe end\tnow\r\n"
FIRST = [" ", "\n", ".", ",", "!", "?", ":", ";", '"', "'", "(", ")", "-", "\t"]
LATER = ["[", "]", "{", "}", "/", "\\", "@", "#", "$", "%", "&", "*", "+", "=", "<", ">", "|", "~", "`", "^"]


def reference_word_ids(entries: list, text: str) -> list[int]:
    """The word rules over bytes, one at a time: runs of non-boundary bytes are words (first 63
    bytes), \\t is a space, \\r is dropped, an absent boundary character is dropped."""
    index = {entry: position for position, entry in enumerate(entries) if entry is not None}
    boundary = set(BOUNDARY.encode())
    ids, word = [], b""
    for value in text.encode("utf-8") + b" ":
        if value not in boundary:
            word += bytes([value])
            continue
        if word:
            ids.append(index.get(word[:63], 0))
            word = b""
        character = b" " if value == ord("\t") else bytes([value])
        if value != ord("\r") and character in index:
            ids.append(index[character])
    return ids[:-1]  # the space added to close the last word


def word_entries_of(tokenizer: Tokenizer) -> list:
    """Entry bytes in id order (None for <unk>/<pad>) read back from the tokenizer itself."""
    from looplm.data.tokenizer import byte_to_char

    to_byte = {character: value for value, character in byte_to_char().items()}
    vocab = tokenizer.backend.get_vocab(with_added_tokens=False)
    entries = [None] * len(vocab)
    for token, token_id in vocab.items():
        entries[token_id] = None if token in ("<unk>", "<pad>") else bytes(to_byte[c] for c in token)
    return entries


@pytest.fixture(scope="module")
def words() -> Tokenizer:
    return fit_tokenizer("word", [CORPUS])[0]


def test_word_vocabulary_in_the_documented_order(words):
    entries = word_entries_of(words)
    expected = [None, None, *(c.encode() for c in FIRST), b"The", b"cat", b"the", b"dog", b"end", b"now",
                *(c.encode() for c in LATER)]
    assert entries == expected
    assert words.kind == "word" and words.adds_bos
    assert (words.pad_id, words.bos_id, words.eos_id) == (1, len(expected), len(expected) + 1)
    assert words.vocab_size == len(expected) + 2


def test_word_encoding_by_hand(words):
    ids = words.encode("The dog\tate\r\n[x]")
    the, dog = 16, 19
    space, newline, unknown = 2, 3, 0
    bracket_open, bracket_close = 22, 23
    assert ids == [the, space, dog, space, unknown, newline, bracket_open, unknown, bracket_close]
    assert words.decode(ids) == "The dog <unk>\n[<unk>]"
    assert words.decode(words.encode("the cat, the end.")) == "the cat, the end."


def test_long_words_keep_their_first_63_bytes():
    long = "x" * 63
    tokenizer = fit_tokenizer("word", [long + "yyyy " + "é" * 40])[0]
    entries = word_entries_of(tokenizer)
    assert long.encode() in entries and ("é" * 40).encode()[:63] in entries  # a cut inside a character
    assert tokenizer.encode(long + "zz") == tokenizer.encode(long) == [entries.index(long.encode())]
    assert tokenizer.encode("é" * 40) == [entries.index(("é" * 40).encode()[:63])]


def test_capacity_keeps_later_words_out():
    corpus = " ".join(f"w{number}" for number in range(WORD_CAPACITY + 10))
    tokenizer = fit_tokenizer("word", [corpus])[0]
    entries = word_entries_of(tokenizer)
    assert len(entries) == WORD_CAPACITY  # no room left for the later boundary characters either
    assert b"[" not in entries
    last_word = entries[-1].decode()
    after = f"w{int(last_word[1:]) + 1}"
    assert tokenizer.encode(after) == [0]
    assert tokenizer.encode("a[b") == [0, 0]  # an absent boundary character is dropped, not split on


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab cé.,\t\r\n[]x-/\\^")), max_size=60))
def test_word_encoding_equals_the_plain_rules(text):
    tokenizer = fit_tokenizer("word", ["ab a b cé x.x ab-c [x]\n"])[0]
    assert tokenizer.encode(text) == reference_word_ids(word_entries_of(tokenizer), text)


def test_char_is_the_corpus_bytes_in_order_with_unknown_as_id_0():
    tokenizer = fit_tokenizer("char", ["hello wörld\n"])[0]
    present = sorted(set("hello wörld\n".encode()))
    assert tokenizer.kind == "char"
    assert tokenizer.encode("helo") == [present.index(value) for value in b"helo"]
    assert tokenizer.encode("q") == [0] and present[0] == ord("\n")
    assert tokenizer.encode("é") == [present.index(0xC3), 0]  # é is C3 A9: C3 is known (from ö), A9 is not
    assert tokenizer.decode(tokenizer.encode("wörld")) == "wörld"
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (len(present), len(present) + 1, len(present) + 2)


def test_auto_chooses_char_below_20000_bytes():
    assert (auto_kind(19_999), auto_kind(20_000)) == ("char", "word")
    assert fit_tokenizer("auto", ["é" * 9_999 + "a"])[0].kind == "char"  # 19,999 bytes
    assert fit_tokenizer("auto", ["é" * 10_000])[0].kind == "word"
    assert fit_tokenizer("auto", ["ab"])[1] == 2


@pytest.mark.parametrize("kind", ["word", "char"])
def test_save_and_load_keep_kind_and_ids(kind, tmp_path):
    tokenizer = fit_tokenizer(kind, [CORPUS])[0]
    tokenizer.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.kind == kind and loaded.vocab_size == tokenizer.vocab_size
    for text in (CORPUS, "The cat\tsat [on] the mat\r\n", "unknown words"):
        assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.encode_prompt("The") == [tokenizer.bos_id, *tokenizer.encode("The")]


def test_imported_vocabularies_without_bos_feed_prompts_as_they_are():
    words = word_tokenizer([None, b" ", b"\n", b"The", b"cat"], unknown=0, padding=0)
    assert not words.adds_bos and words.encode_prompt("The cat") == [3, 1, 4] and words.stop_ids == []
    chars = char_tokenizer([10, 32, 97, 98])
    assert not chars.adds_bos and chars.encode_prompt("ab") == [2, 3] and chars.stop_ids == []
    assert fit_tokenizer("char", ["ab"])[0].stop_ids == [4]  # a, b, <pad>, <bos>, <eos>
    with pytest.raises(LoopLMError, match="entry 2 repeats entry 1"):
        word_tokenizer([None, b"a", b"a"], padding=None)
    with pytest.raises(LoopLMError, match="entry 1 is empty"):
        word_tokenizer([None, b"", b"a"], padding=None)


def test_tasks_refuse_fitted_tokenizers():
    with pytest.raises(LoopLMError, match="fitted to text data"):
        DataConfig(task="binding", tokenizer="word")


def test_build_tokenizer_reads_the_corpus_only_when_needed():
    def documents():
        raise AssertionError("read")

    assert build_tokenizer("byte", documents).kind == "byte"
    assert build_tokenizer("char", lambda: iter(["ab"])).kind == "char"


def test_prepare_cli_with_word_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the loop runs again and again\n" * 50)
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "shards"), "--tokenizer", "auto"]) == 0
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["corpus_bytes"] == len(corpus.read_bytes())
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "words"), "--tokenizer", "word"]) == 0
    assert re.search(r"word tokenizer, vocab \d+", capsys.readouterr().out)
    tokenizer = Tokenizer.from_file(tmp_path / "words")
    assert tokenizer.decode(tokenizer.encode("again and the loop")) == "again and the loop"
