"""Word and char tokenizers fitted to a corpus, with lrnnSMDDS's rules, and its ``auto`` choice.

Both are Hugging Face ``tokenizers`` objects (so they save as a standard ``tokenizer.json`` and
``looplm.data.tokenizer.Tokenizer`` loads them like any other), written in the byte-level
alphabet (GPT-2's byte → printable character table), so that every token is a byte string:

**char** — the distinct *bytes* of the corpus, sorted by value; id = rank.  A byte the corpus
never had maps to id 0 (the smallest byte of the vocabulary, often ``\\n``); there is no
unknown token.  Decoding is one byte per id.  looplm's ``byte`` tokenizer differs: it has all
256 bytes with id = byte value, so nothing is ever unknown.

**word** — *boundary characters* are space, ``\\n \\t \\r`` and ``. , ! ? : ; " ' ( ) [ ] { } -
/ \\ @ # $ % & * + = < > | ~ ` ^``; a *word* is a maximal run of other bytes (UTF-8 stays
inside words), case-sensitive, cut to its first 63 bytes.  The vocabulary, in id order:

1. ``<unk>``, ``<pad>``, space, ``\\n``, ``. , ! ? : ; " ' ( ) -``, ``\\t``;
2. every word of the corpus in order of first appearance;
3. the remaining boundary characters except ``\\t`` and ``\\r``, in the order listed above;

at most 32,767 entries (later new words stay out and encode as ``<unk>``).  Encoding maps a
word to its id or ``<unk>``, a space to the space token, ``\\t`` to the *space* token, drops
``\\r``, and maps any other boundary character to its token (dropped when the vocabulary lacks
it).  Decoding concatenates the tokens (spaces are tokens of their own).

looplm's own tokenizers of both kinds end with the special tokens it needs (``<pad>`` for char,
then ``<bos>``, ``<eos>``), after every id above, so the ids above are the source's.  One
imported with a lrnnSMDDS model file has the file's entries only: no ``<bos>``, so prompts get
no prefix token (``Tokenizer.adds_bos``), as the source feeds prompts.

**auto** — char when the corpus has fewer than 20,000 bytes (UTF-8), word otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from looplm.data.tokenizer import BOUNDARY, PADDING, SPECIAL_TOKENS, UNKNOWN, Tokenizer, byte_to_char, character_class
from looplm.errors import LoopLMError

KINDS = ("word", "char", "auto")
FIRST_ENTRIES = (" ", "\n", ".", ",", "!", "?", ":", ";", '"', "'", "(", ")", "-", "\t")
WORD_CAPACITY = 32767
MAX_WORD_BYTES = 63
AUTO_CHAR_BELOW_BYTES = 20_000
_WORD = re.compile(b"[^" + re.escape(BOUNDARY.encode()) + b"]+")


@dataclass
class CorpusScan:
    """What one pass over a corpus gives both kinds: its bytes, its distinct bytes and its words
    (cut to 63 bytes) in order of first appearance (at most as many as the word vocabulary holds)."""

    size: int = 0
    byte_values: set[int] = field(default_factory=set)
    words: dict[bytes, None] = field(default_factory=dict)

    def add(self, text: str) -> None:
        data = text.encode("utf-8", errors="replace")
        self.size += len(data)
        self.byte_values.update(data)
        room = WORD_CAPACITY - 2 - len(FIRST_ENTRIES)
        for match in _WORD.finditer(data):
            if len(self.words) >= room:
                break
            self.words.setdefault(match.group()[:MAX_WORD_BYTES])


def scan(texts: Iterable[str]) -> CorpusScan:
    """One pass over ``texts`` (documents, in corpus order)."""
    result = CorpusScan()
    for text in texts:
        result.add(text)
    return result


def auto_kind(corpus_bytes: int) -> str:
    """lrnnSMDDS's choice: char below 20,000 bytes of corpus, else word."""
    return "char" if corpus_bytes < AUTO_CHAR_BELOW_BYTES else "word"


def fit_tokenizer(kind: str, texts: Iterable[str]) -> tuple[Tokenizer, int]:
    """A ``word``, ``char`` or ``auto`` tokenizer fitted to ``texts``, and the corpus size in bytes."""
    if kind not in KINDS:
        raise LoopLMError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    corpus = scan(texts)
    if corpus.size == 0:
        raise LoopLMError("no text to build a vocabulary from: give documents with text in them")
    chosen = auto_kind(corpus.size) if kind == "auto" else kind
    if chosen == "char":
        return char_tokenizer(sorted(corpus.byte_values), looplm_specials=True), corpus.size
    return word_tokenizer(word_entries(corpus.words), looplm_specials=True), corpus.size


def word_entries(words: Iterable[bytes]) -> list[bytes | None]:
    """The word vocabulary in id order (``None`` for ``<unk>`` and ``<pad>``), from the corpus's
    words in order of first appearance."""
    entries: list[bytes | None] = [None, None, *(character.encode() for character in FIRST_ENTRIES)]
    present = set(entries)
    for word in words:
        if len(entries) >= WORD_CAPACITY:
            break
        if word not in present:
            entries.append(word)
            present.add(word)
    for character in BOUNDARY:
        token = character.encode()
        if character not in "\t\r" and token not in present and len(entries) < WORD_CAPACITY:
            entries.append(token)
            present.add(token)
    return entries


def _byte_level(data: bytes) -> str:
    table = byte_to_char()
    return "".join(table[value] for value in data)


def word_tokenizer(entries: Sequence[bytes | None], unknown: int = 0, padding: int | None = 1,
                   looplm_specials: bool = False) -> Tokenizer:
    """The word tokenizer of a vocabulary in id order: ``entries[i]`` is token i's bytes (``None``
    for the unknown and padding ids).  ``looplm_specials`` appends ``<bos>``, ``<eos>``."""
    names = {unknown: UNKNOWN, **({padding: PADDING} if padding is not None and padding != unknown else {})}
    vocab: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if index in names:
            token = names[index]
        elif entry is None or entry == b"":
            raise LoopLMError(f"word vocabulary entry {index} is empty: only the unknown and padding entries may be")
        else:
            token = _byte_level(entry)
        if token in vocab:
            raise LoopLMError(f"word vocabulary entry {index} repeats entry {vocab[token]}: every token must differ")
        vocab[token] = index
    # \t becomes a space; \r and the boundary characters the vocabulary lacks end a word, then
    # are dropped.
    dropped = ["\r"] + [character for character in BOUNDARY
                        if character not in " \t\r" and _byte_level(character.encode()) not in vocab]
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    backend.normalizer = normalizers.Replace("\t", " ")
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(character_class(BOUNDARY)), "isolated"),
        pre_tokenizers.Split(Regex(character_class(dropped)), "removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        # One byte per character now: drop what follows a word's first 63 bytes.
        pre_tokenizers.Split(Regex(f"(?<=^.{{{MAX_WORD_BYTES}}}).+"), "removed"),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(names.values()) + (["<bos>", "<eos>"] if looplm_specials else []))
    return Tokenizer(backend)


def char_tokenizer(byte_values: Sequence[int], looplm_specials: bool = False) -> Tokenizer:
    """The char tokenizer of ``byte_values`` in id order (sorted ascending, as the source builds
    it); an unknown byte encodes as id 0.  ``looplm_specials`` appends ``<pad>``, ``<bos>``, ``<eos>``."""
    if not byte_values:
        raise LoopLMError("a char vocabulary needs at least one byte")
    if len(set(byte_values)) != len(byte_values) or not all(0 <= value < 256 for value in byte_values):
        raise LoopLMError("a char vocabulary holds distinct byte values 0..255")
    table = byte_to_char()
    vocab = {table[value]: index for index, value in enumerate(byte_values)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=table[byte_values[0]]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if looplm_specials:
        backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)
