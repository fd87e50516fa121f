"""Streaming a generation's text (``looplm.generate.StreamedText`` through ``record_token``):
decoding a window of the last ids per token hands out the same pieces as decoding the whole
generation every time (the reference below), for the byte tokenizer — multi-byte characters cut
across tokens, invalid bytes —, a trained BPE and a fitted word tokenizer, with stop strings."""

from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.data.tokenizer import byte_tokenizer, train_bpe
from looplm.data.word_char import fit_tokenizer
from looplm.generate import Generation, StreamedText, record_token

BYTE = byte_tokenizer()
TEXTS = ["the loop reads the loop", "naïve café — déjà vu", "日本語のテキスト", "emoji 🙂 and 🚀 here"] * 10
BPE = train_bpe(TEXTS, vocab_size=300)
WORD = fit_tokenizer("word", TEXTS)[0]


def whole_decode_pieces(tokenizer, ids, stops):
    """The pieces a stream hands out, from decoding the whole generation at every token: the new
    whole characters, less any end that could begin a stop string (held back until the text goes
    on otherwise), or up to a stop string found."""
    result, given, whole, pieces = Generation(), 0, "", []
    for token in ids:
        result.ids.append(token)
        text = tokenizer.decode(result.ids)
        starts = [found for stop in stops if stop and (found := text.find(stop, max(0, given - len(stop)))) >= 0]
        if starts:
            pieces.append(text[given:min(starts)])
            return pieces, text[:min(starts)], True
        if not text.endswith("\ufffd"):
            whole = text
        held = max((size for stop in stops for size in range(1, len(stop)) if whole.endswith(stop[:size])), default=0)
        end = max(given, len(whole) - held)
        pieces.append(text[given:end])
        given = end
    return pieces, whole, False


def streamed_pieces(tokenizer, ids, stops):
    result, streamed, pieces = Generation(), StreamedText(tokenizer), []
    for token in ids:
        pieces.append(record_token(result, token, 1, streamed, stops))
        if result.stop_reason == "stop_string":
            return pieces, result.text, True
    return pieces, streamed.text, False


def check(tokenizer, ids, stops):
    assert streamed_pieces(tokenizer, ids, stops) == whole_decode_pieces(tokenizer, ids, stops)


@settings(max_examples=200, deadline=None)
@given(text=st.sampled_from(TEXTS), cut=st.integers(0, 60), noise=st.lists(st.integers(3, 258), max_size=4),
       stops=st.sampled_from([(), ("loop",), ("é",), ("🚀", "x"), ("の",), ("oop r", "ee"), ("é v", "テキ")]))
def test_byte_stream_equals_whole_decodes(text, cut, noise, stops):
    ids = BYTE.encode(text)[cut:] + noise + BYTE.encode(text)[:cut]  # cut characters, stray bytes
    check(BYTE, ids, stops)


@settings(max_examples=100, deadline=None)
@given(text=st.sampled_from(TEXTS), cut=st.integers(0, 20),
       stops=st.sampled_from([(), ("loop",), ("é",), ("の",), ("loop r", "the l"), ("déjà v",)]))
def test_bpe_and_word_streams_equal_whole_decodes(text, cut, stops):
    for tokenizer in (BPE, WORD):
        ids = tokenizer.encode(text)
        check(tokenizer, ids[cut:] + ids[:cut], stops)


def test_a_long_stream_decodes_a_window_per_token():
    calls = []

    class Counting:
        def decode(self, ids):
            calls.append(len(ids))
            return BYTE.decode(ids)

    result, streamed = Generation(), StreamedText(Counting())
    for token in BYTE.encode("a long generation " * 40):
        record_token(result, token, 1, streamed, ())
    assert streamed.text == "a long generation " * 40
    assert max(calls) <= 4  # a few ids each time, not the whole generation


def test_a_decoder_that_drops_a_leading_space_keeps_its_spaces_in_the_stream():
    """SentencePiece-style decoders drop the space before a decode's first word: a piece decoded
    without the token before it would lose the space between words."""
    words = [" the", " loop", " reads", "é", " it"]

    class LeadingSpace:
        def decode(self, ids):
            return "".join(words[i] for i in ids).removeprefix(" ")

    for ids in ([0, 1, 2, 4], [1, 3, 3, 0, 4, 2]):
        check(LeadingSpace(), ids, ())
        check(LeadingSpace(), ids, ("loop",))


def test_an_end_that_could_begin_a_stop_string_is_held_back():
    """"ab" could begin the stop string "abc": it is handed out once the text goes on otherwise."""
    result, streamed = Generation(), StreamedText(BYTE)
    pieces = [record_token(result, token, 1, streamed, ("abc",)) for token in BYTE.encode("xab")]
    assert pieces == ["x", "", ""] and result.text == "xab"
    assert record_token(result, BYTE.encode("d")[0], 1, streamed, ("abc",)) == "abd"
    result, streamed = Generation(), StreamedText(BYTE)
    pieces = [record_token(result, token, 1, streamed, ("abc",)) for token in BYTE.encode("xabc")]
    assert pieces == ["x", "", "", ""] and result.text == "x" and result.stop_reason == "stop_string"
