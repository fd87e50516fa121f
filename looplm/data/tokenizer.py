"""Tokenizers: a byte-level one that needs no training, and byte-level BPE.

Both are Hugging Face ``tokenizers`` objects behind one small interface, ``Tokenizer``,
saved as a standard ``tokenizer.json``; any other ``tokenizer.json`` loads too.  The word and
char tokenizers fitted to a corpus (lrnnSMDDS's rules) are in ``looplm.data.word_char``.

Byte layout (``byte_tokenizer``): id == byte value for ids 0..255 of the UTF-8 encoding,
then ``<pad>`` = 256, ``<bos>`` = 257, ``<eos>`` = 258, so ``vocab_size`` is 259.

Text that happens to spell a special token (say the five characters ``<eos>``) is
encoded as ordinary text: specials only ever enter a stream when looplm puts them there.
Lone surrogates (which ``json.loads`` lets through from a broken ``\\ud83d`` escape) have
no UTF-8 form and are encoded as U+FFFD.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, trainers
from tokenizers.pre_tokenizers import ByteLevel

from looplm.checkpoint.atomic import atomic_write_text
from looplm.config.model import MAX_VOCAB
from looplm.errors import JSON_ERRORS, LoopLMError, is_int
from looplm.file_names import TOKENIZER_FILE

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MIN_BPE_VOCAB_SIZE = BYTE_VOCAB_SIZE + 1
LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# Earlier names win; each list starts with looplm's own token.
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
EOS_CANDIDATES = (
    "<eos>",
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "[SEP]",
)


class Tokenizer:
    """A text <-> token-id codec wrapping a Hugging Face ``tokenizers.Tokenizer``.

    Attributes:
        backend: the wrapped ``tokenizers.Tokenizer``.
        vocab_size: one more than the largest id, so every id indexes an embedding row.
        pad_id, bos_id, eos_id: special ids; for a foreign file they are found by name
            (see ``from_file``).
        kind: ``"byte"`` for the byte layout above, ``"word"`` for a word-level vocabulary,
            ``"char"`` for a byte-level one without merges that is not the byte layout (both as
            ``looplm.data.word_char`` builds them), ``"bpe"`` for anything else.
        adds_bos: whether a prompt starts with ``bos_id`` (``encode_prompt``): always, except for
            a word or char tokenizer without ``<bos>`` (one imported from lrnnSMDDS, whose models
            never saw such a token).
        stop_ids: the ids that end a generation unless told otherwise: ``[eos_id]``, or none for
            a word or char tokenizer without ``<eos>`` (its fallback eos would be a real token).
    """

    def __init__(self, backend: HFTokenizer) -> None:
        # Truncation or padding saved in a foreign file would silently cut or pad
        # documents; looplm windows the token stream itself.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        self.backend = backend
        self.kind = _kind(json.loads(backend.to_str()))
        vocab = backend.get_vocab(with_added_tokens=True)
        if not vocab:
            raise LoopLMError("the tokenizer has an empty vocabulary: give a trained tokenizer.json, or 'byte'")
        self.vocab_size = max(vocab.values()) + 1
        self.pad_id, self.bos_id, self.eos_id = _find_special_ids(backend, self.vocab_size)
        self._skipped_ids = frozenset((self.pad_id, self.bos_id, self.eos_id))
        fitted = self.kind in ("word", "char")
        self.adds_bos = not fitted or backend.token_to_id("<bos>") is not None
        self.stop_ids = [self.eos_id] if not fitted or backend.token_to_id("<eos>") is not None else []

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        try:
            return self._encode(text)
        except (UnicodeEncodeError, TypeError):
            # Rare, so the replacement stays off the hot path.
            return self._encode(LONE_SURROGATE.sub("\ufffd", text))

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a prompt is fed as: ``bos_id`` first (unless ``adds_bos`` is false), then ``encode(text)``."""
        return ([self.bos_id] if self.adds_bos else []) + self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``; the BPE backend encodes in parallel."""
        try:
            return self._encode_batch(texts)
        except (UnicodeEncodeError, TypeError):
            return self._encode_batch([LONE_SURROGATE.sub("\ufffd", text) for text in texts])

    def _encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        return self.backend.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "byte":
            return [list(text.encode("utf-8")) for text in texts]
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, leaving out pad/bos/eos and ids outside the vocabulary.

        Bytes that do not form valid UTF-8 become U+FFFD replacement characters.
        """
        kept = [i for i in map(int, ids) if 0 <= i < self.vocab_size and i not in self._skipped_ids]
        if self.kind == "byte":
            return bytes(kept).decode("utf-8", errors="replace")
        return self.backend.decode(kept, skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """How many bytes of text each id stands for (0 for pad/bos/eos and other added tokens).

        A byte-level token's characters are bytes in GPT-2's printable alphabet, one each; any
        other token counts the UTF-8 bytes of its decoded text.
        """
        alphabet = set(byte_to_char().values())
        added = set(self.backend.get_added_tokens_decoder())
        lengths = []
        for token_id in range(self.vocab_size):
            token = self.backend.id_to_token(token_id)
            if token is None or token_id in added:
                lengths.append(0)
            elif alphabet.issuperset(token):
                lengths.append(len(token))
            else:
                lengths.append(len(self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")))
        return lengths

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        atomic_write_text(path, self.backend.to_str(pretty=True))
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json``, or the one inside a directory.

        Any Hugging Face tokenizers file loads.  Special ids are looked up by name among
        common spellings (``<pad>``, ``<|endoftext|>``, ``</s>``, ``<s>``, ``<|im_end|>``…).
        When none is found: eos falls back to bos, else to the last special token the file
        adds, else to the last id; bos falls back to eos; pad falls back to eos.
        """
        file = _tokenizer_file(Path(path))
        try:
            text = file.read_text(encoding="utf-8")
            json.loads(text)
        except JSON_ERRORS as error:
            raise LoopLMError(
                f"tokenizer file '{file}' is not valid JSON ({_one_line(error)}): "
                "give a tokenizer.json written by looplm or Hugging Face tokenizers"
            ) from None
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as error:
            raise LoopLMError(
                f"tokenizer file '{file}' is not a Hugging Face tokenizers file ({_one_line(error)}): "
                "give a tokenizer.json written by looplm or Hugging Face tokenizers"
            ) from None
        return cls(backend)


def byte_tokenizer() -> Tokenizer:
    """The byte tokenizer: ids 0..255 are raw UTF-8 bytes, then <pad>, <bos>, <eos>."""
    table = byte_to_char()
    vocab = {table[byte]: byte for byte in range(256)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on ``texts``.

    Ids 0..2 are <pad>, <bos>, <eos>; all 256 bytes are in the alphabet, so any string
    round-trips.  A small corpus may run out of merges first, giving a smaller vocabulary.
    """
    if isinstance(texts, str | bytes):  # one string is one text, not an iterable of characters
        raise LoopLMError("train_bpe takes an iterable of texts (e.g. a list of strings), got one string: wrap it"
                          " in a list")
    if not is_int(vocab_size) or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise LoopLMError(
            f"BPE vocab_size {vocab_size!r} is too small: use an integer of at least {MIN_BPE_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + at least one merge)"
        )
    if vocab_size > MAX_VOCAB:  # the trainer aborts the process on sizes near 2**32
        raise LoopLMError(f"BPE vocab_size {vocab_size:,} is more than a model takes ({MAX_VOCAB:,}): use a smaller"
                          " one")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = _CharacterCounter(texts)
    backend.train_from_iterator(seen, trainer=trainer)
    if seen.characters == 0:
        raise LoopLMError("no text to train BPE on: give documents with text in them")
    return Tokenizer(backend)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` gives ``byte_tokenizer()``; anything else is a tokenizer.json path or its directory."""
    if spec == "byte":
        return byte_tokenizer()
    return Tokenizer.from_file(spec)


class _CharacterCounter:
    """Pass texts through while counting characters, to notice an empty corpus."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.characters = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.characters += len(text)
            yield text


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one ByteLevel pre-tokenization uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return table


# The word layout's token boundaries and the word/char layouts' special entries (lrnnSMDDS's rules;
# looplm.data.word_char fits those tokenizers, ``layout_kind`` recognises them).
BOUNDARY = " \n\t\r.,!?:;\"'()[]{}-/\\@#$%&*+=<>|~`^"
UNKNOWN, PADDING = "<unk>", "<pad>"


def layout_kind(config: dict) -> str | None:
    """"word" or "char" when a tokenizer.json dict has the layout built here, else None."""
    model, pre_tokenizer = config.get("model") or {}, config.get("pre_tokenizer") or {}
    if model.get("type") == "WordLevel" and model.get("unk_token") == UNKNOWN:
        steps = pre_tokenizer.get("pretokenizers") or [{}]
        if (steps[0].get("pattern") or {}).get("Regex") == character_class(BOUNDARY):
            return "word"
    alphabet = set(byte_to_char().values())
    vocab = model.get("vocab") or {}
    if (model.get("type") == "BPE" and not model.get("merges") and model.get("unk_token") in vocab
            and set(vocab) <= alphabet and pre_tokenizer.get("type") == "ByteLevel"
            and pre_tokenizer.get("use_regex") is False):
        return "char"
    return None


def character_class(characters) -> str:
    """A regex class matching any one of ``characters``."""
    return "[" + "".join("\\" + character if character in "[]\\^-" else character for character in characters) + "]"


def _kind(config: dict[str, Any]) -> str:
    """The ``Tokenizer.kind`` of a tokenizer.json dict: a word or char layout is recognised by
    what ``looplm.data.word_char`` writes (its unknown token and pre-tokenizer), so a foreign
    word-level file stays "bpe" as before."""
    return "byte" if _is_byte_layout(config) else layout_kind(config) or "bpe"


def _is_byte_layout(config: dict[str, Any]) -> bool:
    """Whether a tokenizer.json dict is exactly looplm's byte layout.

    Only then does ``list(text.encode())`` give the same ids as the backend, which is what
    lets the byte kind skip the backend on the hot path.
    """
    model = config.get("model") or {}
    pre_tokenizer = config.get("pre_tokenizer") or {}
    decoder = config.get("decoder") or {}
    table = byte_to_char()
    expected_vocab = {table[byte]: byte for byte in range(256)}
    added = {token["content"]: token["id"] for token in config.get("added_tokens", []) if token.get("special")}
    return (
        model.get("type") == "BPE"
        and not model.get("merges")
        and model.get("vocab") == expected_vocab
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and config.get("normalizer") is None
        and pre_tokenizer.get("type") == "ByteLevel"
        and not pre_tokenizer.get("add_prefix_space")
        and decoder.get("type") == "ByteLevel"
        and len(config.get("added_tokens", [])) == len(SPECIAL_TOKENS)
        and added == {token: 256 + index for index, token in enumerate(SPECIAL_TOKENS)}
    )


def _find_special_ids(backend: HFTokenizer, vocab_size: int) -> tuple[int, int, int]:
    """(pad, bos, eos) ids, looked up by name with the fallbacks ``from_file`` documents."""
    pad = _first_present(backend, PAD_CANDIDATES)
    bos = _first_present(backend, BOS_CANDIDATES)
    eos = _first_present(backend, EOS_CANDIDATES)
    if eos is None:
        eos = bos if bos is not None else _last_special_id(backend, vocab_size)
    if bos is None:
        bos = eos
    if pad is None:
        pad = eos
    return pad, bos, eos


def _first_present(backend: HFTokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _last_special_id(backend: HFTokenizer, vocab_size: int) -> int:
    special = [token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special]
    return max(special) if special else vocab_size - 1


def _tokenizer_file(path: Path) -> Path:
    """The tokenizer.json that ``path`` names, directly or as its directory."""
    if path.is_dir():
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise LoopLMError(
                f"directory '{path}' has no {TOKENIZER_FILE}: give a tokenizer directory or file, or 'byte'"
            )
        return file
    if not path.is_file():
        raise LoopLMError(f"tokenizer '{path}' does not exist: give a {TOKENIZER_FILE} path, its directory, or 'byte'")
    return path


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
