"""Tests for looplm.data.shards: reading documents, writing shards, batching, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import looplm.data.shards as shards_module
from looplm.data.provenance import tokenizer_digest
from looplm.data.shards import TokenShards, read_documents, read_meta, token_dtype, write_shards
from looplm.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from looplm.errors import LoopLMError

BYTE = byte_tokenizer()
EOS = BYTE.eos_id


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def expected_stream(documents: list[str], tokenizer: Tokenizer = BYTE) -> list[int]:
    return [token for text in documents for token in [*tokenizer.encode(text), tokenizer.eos_id]]


def split_at_eos(tokens: np.ndarray) -> list[list[int]]:
    """Documents of a byte-tokenized stream (eos never occurs inside one)."""
    documents, current = [], []
    for token in tokens.tolist():
        current.append(token)
        if token == EOS:
            documents.append(current)
            current = []
    assert not current
    return documents


def jsonl_lines(texts: list[str]) -> str:
    return "".join(json.dumps({"text": text, "id": index}) + "\n" for index, text in enumerate(texts))


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """A directory with two text files and a three-line JSON-lines file."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("second file\n\nwith a blank line\n", encoding="utf-8")
    (corpus / "a.txt").write_text("first file, naïve café 🎉\n", encoding="utf-8")
    (corpus / "c.jsonl").write_text(jsonl_lines(["line one", "line two\twith tab", "line three"]) + "\n")
    (corpus / "ignored.csv").write_text("not,read\n")
    return corpus


@pytest.fixture
def many_documents(tmp_path) -> list[str]:
    return [f"document {index}: " + "loop " * (index % 7) for index in range(50)]


def test_read_documents_from_directory(small_corpus):
    assert list(read_documents([small_corpus])) == [
        "first file, naïve café 🎉\n",
        "second file\n\nwith a blank line\n",
        "line one",
        "line two\twith tab",
        "line three",
    ]


def test_read_documents_single_path_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "x"}\n\n{"body": "y", "text": 3}\n')
    assert list(read_documents(path, text_field="body")) == ["x", "y"]
    other = tmp_path / "notes.md"
    other.write_bytes(b"\xef\xbb\xbf# whole file\n")
    assert list(read_documents([str(other)])) == ["# whole file\n"]


def test_small_corpus_keeps_exact_stream(small_corpus, tmp_path):
    documents = list(read_documents([small_corpus]))
    meta = write_shards(documents, BYTE, tmp_path / "shards", val_fraction=0.1)
    train, val = TokenShards(tmp_path / "shards"), TokenShards(tmp_path / "shards", "val")
    stream = expected_stream(documents)
    assert np.concatenate([train.tokens, val.tokens]).tolist() == stream
    assert len(val) == round(0.1 * len(stream))
    assert meta == {
        "format": "looplm-shards",
        "version": 1,
        "dtype": "uint16",
        "vocab_size": 259,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "tokenizer": "byte",
        "tokenizer_sha256": tokenizer_digest(BYTE),
        "corpus_bytes": sum(len(document.encode()) for document in documents),
    }
    assert read_meta(tmp_path / "shards") == meta
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "val.bin",
    ]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert Tokenizer.from_file(tmp_path / "shards").kind == "byte"
    assert train.vocab_size == 259 and train.tokens.dtype == np.dtype("<u2")
    assert (tmp_path / "shards" / "train.bin").stat().st_size == 2 * len(train)


def test_tiny_corpus_still_gets_both_splits(tmp_path):
    meta = write_shards(["ab"], BYTE, tmp_path / "shards", val_fraction=0.9)
    assert (meta["train_tokens"], meta["val_tokens"]) == (2, 1)


def test_many_documents_split_by_document(many_documents, tmp_path):
    meta = write_shards(many_documents, BYTE, tmp_path / "shards", val_fraction=0.1, seed=3)
    train, val = TokenShards(tmp_path / "shards"), TokenShards(tmp_path / "shards", "val")
    train_documents, val_documents = split_at_eos(train.tokens), split_at_eos(val.tokens)
    assert len(val_documents) == 5
    expected = [[*BYTE.encode(text), EOS] for text in many_documents]
    assert sorted(train_documents + val_documents) == sorted(expected)
    # Corpus order is kept inside each split.
    assert train_documents == [document for document in expected if document not in val_documents]
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected_stream(many_documents))


def test_document_split_depends_only_on_seed(many_documents, tmp_path):
    def val_tokens(name: str, seed: int) -> list[int]:
        write_shards(iter(many_documents), BYTE, tmp_path / name, val_fraction=0.1, seed=seed)
        return TokenShards(tmp_path / name, "val").tokens.tolist()

    first = val_tokens("first", 0)
    assert first == val_tokens("again", 0)
    assert first != val_tokens("other", 1)


def test_bpe_shards_reload_their_tokenizer(many_documents, tmp_path):
    tokenizer = train_bpe(many_documents, vocab_size=280)
    meta = write_shards(many_documents, tokenizer, tmp_path / "shards")
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == tokenizer.vocab_size
    reloaded = Tokenizer.from_file(tmp_path / "shards")
    assert reloaded.encode_batch(many_documents) == tokenizer.encode_batch(many_documents)
    both = TokenShards(tmp_path / "shards").tokens.tolist() + TokenShards(tmp_path / "shards", "val").tokens.tolist()
    assert sorted(both) == sorted(expected_stream(many_documents, tokenizer))


class WideTokenizer:
    """A stand-in with ids beyond 16 bits."""

    vocab_size = 70_000
    eos_id = 69_999
    kind = "bpe"
    backend = BYTE.backend  # what meta.json's tokenizer digest is taken of

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[65_536 + len(text), 1] for text in texts]

    def save(self, directory: Path) -> None:
        BYTE.save(directory)


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(259) == token_dtype(65_536) == np.dtype("<u2")
    assert token_dtype(65_537) == np.dtype("<u4")
    meta = write_shards(["a", "bb", "ccc"], WideTokenizer(), tmp_path / "wide", val_fraction=0.2)
    assert meta["dtype"] == "uint32"
    shards = TokenShards(tmp_path / "wide")
    assert shards.tokens.dtype == np.dtype("<u4")
    assert np.concatenate([shards.tokens, TokenShards(tmp_path / "wide", "val").tokens]).tolist() == [
        65_537, 1, 69_999, 65_538, 1, 69_999, 65_539, 1, 69_999,
    ]


@pytest.fixture
def shards(many_documents, tmp_path) -> TokenShards:
    write_shards(many_documents, BYTE, tmp_path / "shards")
    return TokenShards(tmp_path / "shards")


def test_random_batch_shapes_and_targets(shards):
    x, y = shards.random_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = torch.from_numpy(shards.tokens.astype(np.int64))
    for row_x, row_y in zip(x, y):
        starts = [start for start in range(len(stream) - 16) if torch.equal(stream[start : start + 16], row_x)]
        assert any(torch.equal(stream[start + 1 : start + 17], row_y) for start in starts)


def test_random_batch_is_reproducible_and_resumable(shards):
    first = shards.random_batch(8, 12, torch.Generator().manual_seed(42))
    again = shards.random_batch(8, 12, torch.Generator().manual_seed(42))
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    generator = torch.Generator().manual_seed(7)
    shards.random_batch(8, 12, generator)
    state = generator.get_state()
    expected = shards.random_batch(8, 12, generator)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, shards.random_batch(8, 12, resumed)))


def test_random_batch_can_use_the_whole_split(tmp_path):
    write_shards(["abcdefgh"], BYTE, tmp_path / "shards", val_fraction=0.1)
    shards = TokenShards(tmp_path / "shards")
    x, y = shards.random_batch(3, len(shards) - 1, torch.Generator().manual_seed(0))
    assert x[0].tolist() == shards.tokens[:-1].tolist() and y[0].tolist() == shards.tokens[1:].tolist()


def test_sequential_batches_cover_windows_in_order(shards):
    seq_len, batch_size = 10, 4
    batches = list(shards.sequential_batches(batch_size, seq_len))
    windows = (len(shards) - 1) // seq_len
    assert [x.shape[0] for x, _ in batches] == [batch_size] * (windows // batch_size) + (
        [windows % batch_size] if windows % batch_size else []
    )
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    assert x.dtype == torch.int64
    assert x.tolist() == shards.tokens[: windows * seq_len].tolist()
    assert y.tolist() == shards.tokens[1 : windows * seq_len + 1].tolist()


def test_progress_bar_path_keeps_stream(monkeypatch, many_documents, tmp_path):
    monkeypatch.setattr(shards_module, "PROGRESS_MIN_CHARACTERS", 10)
    monkeypatch.setattr(shards_module, "ENCODE_BATCH_DOCUMENTS", 3)
    write_shards(many_documents, BYTE, tmp_path / "shards")
    both = TokenShards(tmp_path / "shards").tokens.tolist() + TokenShards(tmp_path / "shards", "val").tokens.tolist()
    assert sorted(both) == sorted(expected_stream(many_documents))


def test_overwrite_replaces_earlier_shards_and_nothing_else(tmp_path):
    out = tmp_path / "shards"
    write_shards(["an earlier corpus"], BYTE, out)
    write_shards(["hello there"], BYTE, out, overwrite=True)
    assert read_meta(out)["train_tokens"] + read_meta(out)["val_tokens"] == 12
    assert [path.name for path in tmp_path.iterdir()] == ["shards"]
    (out / "stale.txt").write_text("the user's")  # not a shard file: refused before any tokenizing, kept
    with pytest.raises(LoopLMError, match="holds stale.txt, which this output would not replace"):
        write_shards(["hello"], BYTE, out, overwrite=True)
    assert (out / "stale.txt").read_text() == "the user's" and read_meta(out)["train_tokens"] > 0


def test_empty_existing_directory_is_fine(tmp_path):
    (tmp_path / "shards").mkdir()
    write_shards(["hello there"], BYTE, tmp_path / "shards")
    assert len(TokenShards(tmp_path / "shards")) > 0


def test_failure_while_tokenizing_leaves_nothing_behind(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    out = tmp_path / "out" / "shards"
    with pytest.raises(LoopLMError):
        write_shards(read_documents([tmp_path / "good.txt", tmp_path / "bad.txt"]), BYTE, out)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b"  \n\t\n", "is empty"),
        ("blank.jsonl", b"\n\n", "is empty"),
        ("latin1.txt", "abcé".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
        ("latin1.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n', "byte 0xe9 at offset 24"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 of"),
        ("nofield.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "line 2 of"),
        ("notobject.jsonl", b'["text"]\n', "no 'text' field"),
        ("number.jsonl", b'{"text": 5}\n', "is int, not a string"),
    ],
)
def test_bad_data_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LoopLMError) as excinfo:
        list(read_documents([path]))
    message = one_line_error(excinfo)
    assert fragment in message and name in message


def test_bad_data_paths(tmp_path):
    with pytest.raises(LoopLMError) as excinfo:
        read_documents([tmp_path / "missing.txt"])
    assert "does not exist" in one_line_error(excinfo)
    with pytest.raises(LoopLMError) as excinfo:
        read_documents([tmp_path])
    assert "no .txt, .jsonl or .parquet files" in one_line_error(excinfo)
    with pytest.raises(LoopLMError) as excinfo:
        read_documents([])
    assert "no data paths" in one_line_error(excinfo)


@pytest.mark.parametrize(
    ("documents", "options", "fragment"),
    [
        ([], {}, "no documents"),
        (["a"], {}, "only 2 token(s)"),
        (["ok"], {"val_fraction": 0}, "val_fraction"),
        (["ok"], {"val_fraction": 1.0}, "val_fraction"),
        ([b"bytes"], {}, "not a string"),
    ],
)
def test_bad_write_requests(tmp_path, documents, options, fragment):
    with pytest.raises(LoopLMError) as excinfo:
        write_shards(documents, BYTE, tmp_path / "shards", **options)
    assert fragment in one_line_error(excinfo)
    assert not (tmp_path / "shards").exists()


def test_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "keep.txt").write_text("precious")
    with pytest.raises(LoopLMError) as excinfo:
        write_shards(["hello"], BYTE, tmp_path / "shards")
    assert "not empty" in one_line_error(excinfo)
    assert (tmp_path / "shards" / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoopLMError) as excinfo:
        write_shards(["hello"], BYTE, tmp_path / "file")
    assert "is a file" in one_line_error(excinfo)


def corrupt(directory: Path, how: str) -> None:
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    if how == "missing":
        meta_path.unlink()
    elif how == "not json":
        meta_path.write_text("{oops")
    elif how == "truncated bin":
        with open(directory / "train.bin", "r+b") as handle:
            handle.truncate(3)
    elif how == "missing bin":
        (directory / "train.bin").unlink()
    else:
        key, value = how.split("=")
        meta[key] = json.loads(value)
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("how", "fragment"),
    [
        ("missing", "no meta.json"),
        ("not json", "not valid JSON"),
        ('format="other"', "does not describe looplm shards"),
        ("version=2", "version 2"),
        ('dtype="float32"', "dtype 'float32'"),
        ('dtype="uint32"', "calls for uint16"),
        ("vocab_size=-1", "'vocab_size'"),
        ('train_tokens="many"', "'train_tokens'"),
        ("vocab_size=100000", "calls for uint32"),
        ("truncated bin", "has 3 bytes"),
        ("missing bin", "is missing"),
    ],
)
def test_corrupt_shards(tmp_path, how, fragment):
    write_shards(["hello there"], BYTE, tmp_path / "shards")
    corrupt(tmp_path / "shards", how)
    with pytest.raises(LoopLMError) as excinfo:
        TokenShards(tmp_path / "shards")
    assert fragment in one_line_error(excinfo)


def test_bad_shard_requests(tmp_path):
    write_shards(["hello there"], BYTE, tmp_path / "shards")
    with pytest.raises(LoopLMError) as excinfo:
        TokenShards(tmp_path / "nowhere")
    assert "does not exist" in one_line_error(excinfo)
    with pytest.raises(LoopLMError) as excinfo:
        TokenShards(tmp_path / "shards", "test")
    assert "unknown split" in one_line_error(excinfo)
    val = TokenShards(tmp_path / "shards", "val")
    with pytest.raises(LoopLMError) as excinfo:
        val.random_batch(2, len(val), torch.Generator())
    assert "fewer than seq_len + 1" in one_line_error(excinfo)
    with pytest.raises(LoopLMError) as excinfo:
        val.sequential_batches(2, 64)
    assert "fewer than seq_len + 1" in one_line_error(excinfo)
    train = TokenShards(tmp_path / "shards")
    with pytest.raises(LoopLMError) as excinfo:
        train.random_batch(0, 2, torch.Generator())
    assert "batch_size" in one_line_error(excinfo)
