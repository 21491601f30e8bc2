"""Incremental detokenizer tests: streamed deltas against the tokenizer's own full decode, on a
byte-level BPE (GPT-2/Qwen style) and a sentencepiece-style (Llama style, byte fallback)
tokenizer, both built offline."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, decode_token
from tests.tiny_models import _CORPUS, build_tokenizer

Tok = transformers.PreTrainedTokenizerFast

TEXTS = [
    "日本語のテキスト、中文文本，한국어 텍스트 🙂🚀✨",
    "Hello, world! 🙂 How are you today?  Two  spaces.",
    "  leading spaces and 🚀 trailing ✨ ",
    "def fibonacci(n):\n    return n",
    "中文🙂a🚀b✨c 한국어",
]


def build_sentencepiece_tokenizer() -> Tok:
    """Llama-style: Metaspace pre-tokenizer, BPE with byte fallback, a decoder that turns "▁"
    into spaces, joins <0xNN> bytes and strips the sequence's first space. Rare characters
    (most CJK, the emoji) are left out of the alphabet so they fall back to byte tokens."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False, limit_alphabet=60)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # the byte fallback pieces, as sentencepiece has them
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    data["model"]["byte_fallback"] = True
    return Tok(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
               eos_token="</s>", unk_token="<unk>")


BYTE_LEVEL = build_tokenizer()
SENTENCEPIECE = build_sentencepiece_tokenizer()


def byte_token_ids(tokenizer: Tok, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte, so every multi-byte character is split."""
    if "<0x41>" in tokenizer.get_vocab():  # sentencepiece byte fallback pieces
        return tokens_to_ids(tokenizer, [f"<0x{b:02X}>" for b in text.encode()])
    # the byte-level pre-tokenizer maps each byte to one character of its alphabet, and
    # every such character is a token of its own
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    chars = [char for piece, _ in pieces for char in piece]
    assert len(chars) == len(text.encode())
    return tokens_to_ids(tokenizer, chars)


def tokens_to_ids(tokenizer: Tok, tokens: list[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert isinstance(ids, list)
    return ids


def stream(detokenizer: IncrementalDetokenizer, token_ids: Sequence[int],
           chunk: int = 1) -> tuple[list[str], str | None]:
    """Feed `chunk` tokens at a time; collect each step's delta and the final one."""
    deltas: list[str] = []
    stop = None
    for start in range(0, len(token_ids), chunk):
        stop = detokenizer.update(token_ids[start:start + chunk])
        deltas.append(detokenizer.get_delta(finished=stop is not None))
        # the whole text so far: what went out, then what is held back
        assert detokenizer.output_text.startswith("".join(deltas))
        if stop is not None:
            return deltas, stop
    deltas.append(detokenizer.get_delta(finished=True))
    return deltas, stop


def decode(tokenizer: Tok, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The reference: the tokenizer's own full decode."""
    text = tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


def expected_text(tokenizer: Tok, prompt: Sequence[int], output: Sequence[int],
                  skip_special_tokens: bool = True) -> str:
    """What the output adds to the prompt's text in a full decode."""
    full = decode(tokenizer, [*prompt, *output], skip_special_tokens)
    prompt_text = decode(tokenizer, prompt, skip_special_tokens)
    assert full.startswith(prompt_text)
    return full[len(prompt_text):]


# ---- plain streaming ------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", [BYTE_LEVEL, SENTENCEPIECE], ids=["bpe", "sentencepiece"])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("split_bytes", [False, True])
def test_streamed_deltas_equal_full_decode(tokenizer: Tok, text: str, split_bytes: bool) -> None:
    ids = byte_token_ids(tokenizer, text) if split_bytes else tokenizer.encode(text)
    special = tokenizer.eos_token_id
    assert special is not None
    # no context; plain context; context that is only a special token (like a lone BOS)
    prompts = [[], tokenizer.encode("Hello, world!"), tokenizer.encode("日本語"), [special]]
    for prompt in prompts:
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        deltas, stop = stream(detokenizer, ids)
        assert stop is None
        assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
        assert "".join(deltas) == expected_text(tokenizer, prompt, ids)
        assert detokenizer.output_text == "".join(deltas)


def test_split_character_is_held_until_complete() -> None:
    ids = byte_token_ids(BYTE_LEVEL, "a🙂")  # 'a' then four byte tokens
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [])
    deltas = []
    for token_id in ids:
        detokenizer.update([token_id])
        deltas.append(detokenizer.get_delta(finished=False))
    assert deltas == ["a", "", "", "", "🙂"]


def test_sentencepiece_keeps_leading_space_after_prompt() -> None:
    prompt = SENTENCEPIECE.encode("the quick")
    output = SENTENCEPIECE.encode("the brown fox", add_special_tokens=False)[1:]  # "▁brown"...
    assert SENTENCEPIECE.convert_ids_to_tokens([output[0]])[0].startswith("▁")
    deltas, _ = stream(IncrementalDetokenizer(SENTENCEPIECE, prompt), output)
    assert "".join(deltas) == " brown fox"
    # with no prompt the first space goes, as in a full decode
    deltas, _ = stream(IncrementalDetokenizer(SENTENCEPIECE, []), output)
    assert "".join(deltas) == "brown fox"


def test_unfinished_partial_character_is_released_at_finish() -> None:
    ids = byte_token_ids(BYTE_LEVEL, "ok🙂")[:-1]  # the emoji's last byte never comes
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [])
    detokenizer.update(ids)
    assert detokenizer.get_delta(finished=False) == "ok"
    assert detokenizer.get_delta(finished=True) == decode(BYTE_LEVEL, ids)[2:]
    assert detokenizer.output_text == decode(BYTE_LEVEL, ids)


# ---- special tokens -------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", [BYTE_LEVEL, SENTENCEPIECE], ids=["bpe", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tokenizer: Tok, skip: bool) -> None:
    special = tokenizer.eos_token_id
    assert special is not None
    words = [tokenizer.encode(w, add_special_tokens=False) for w in ("Hello", " world", " 🙂")]
    ids = [*words[0], special, special, *words[1], special, *words[2], special]
    prompt = tokenizer.encode("The quick")
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip), ids)
    text = "".join(deltas)
    assert text == expected_text(tokenizer, prompt, ids, skip_special_tokens=skip)
    assert (tokenizer.eos_token in text) is not skip


def with_added_special(tokenizer: Tok) -> Tok:
    """A copy of `tokenizer` with one more special token, added after training."""
    copy = Tok(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
               eos_token=tokenizer.eos_token)
    copy.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    return copy


def spaced_reference(tokenizer: Tok, ids: Sequence[int]) -> str:
    """The slow tokenizers' decode with spaces_between_special_tokens: every added token,
    and every run of other tokens decoded as one, is a piece; non-empty pieces join with " "."""
    added = set(tokenizer.added_tokens_decoder)
    pieces, run = [], []
    for token_id in ids:
        if token_id in added:
            pieces += [decode(tokenizer, run, False), decode(tokenizer, [token_id], False)]
            run = []
        else:
            run.append(token_id)
    pieces.append(decode(tokenizer, run, False))
    return " ".join(piece for piece in pieces if piece)


@pytest.mark.parametrize("tokenizer", [BYTE_LEVEL, SENTENCEPIECE], ids=["bpe", "sentencepiece"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_spaces_between_special_tokens_stream_the_joined_full_decode(tokenizer: Tok,
                                                                     chunk: int) -> None:
    tokenizer = with_added_special(tokenizer)
    tool, eos = tokenizer.convert_tokens_to_ids(["<|tool|>", tokenizer.eos_token])
    words = [tokenizer.encode(w, add_special_tokens=False) for w in ("Hello", " world", " 🙂")]
    split_chars = byte_token_ids(tokenizer, "日本")  # characters split across tokens
    ids = [tool, *words[0], eos, tool, *words[1], *split_chars, tool, *words[2], eos]
    # no context; plain context; context ending in a special token
    for prompt in ([], tokenizer.encode("The quick"), [*tokenizer.encode("Hi"), tool]):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=False,
                                             spaces_between_special_tokens=True)
        deltas, _ = stream(detokenizer, ids, chunk=chunk)
        full = spaced_reference(tokenizer, [*prompt, *ids])
        prompt_text = spaced_reference(tokenizer, prompt)
        assert full.startswith(prompt_text)
        assert "".join(deltas) == full[len(prompt_text):] == detokenizer.output_text
        assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


@pytest.mark.parametrize(("tokenizer", "expected"), [
    (BYTE_LEVEL, "Hello <|im_end|> <|im_end|>  world <|im_end|>"),
    (SENTENCEPIECE, "Hello </s> </s> world </s>"),  # a run's first "▁" goes, as in a decode
], ids=["bpe", "sentencepiece"])
def test_spaces_between_special_tokens_only_when_specials_are_kept(tokenizer: Tok,
                                                                   expected: str) -> None:
    eos = tokenizer.eos_token_id
    words = [tokenizer.encode(w, add_special_tokens=False) for w in ("Hello", " world")]
    ids = [*words[0], eos, eos, *words[1], eos]
    spaced, _ = stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False,
                                              spaces_between_special_tokens=True), ids)
    assert "".join(spaced) == expected
    plain, _ = stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False), ids)
    assert "".join(plain) == decode(tokenizer, ids, skip_special_tokens=False)
    skipped, _ = stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True,
                                               spaces_between_special_tokens=True), ids)
    assert "".join(skipped) == decode(tokenizer, ids)  # nothing to set apart


def test_stop_string_spanning_an_inserted_space() -> None:
    eos = BYTE_LEVEL.eos_token_id
    ids = [*BYTE_LEVEL.encode("Hello"), eos, *BYTE_LEVEL.encode(" world")]
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], skip_special_tokens=False,
                                         stop=["end|>  w"], spaces_between_special_tokens=True)
    deltas, stop = stream(detokenizer, ids)
    assert stop == "end|>  w" and "".join(deltas) == "Hello <|im_"


# ---- stop strings ---------------------------------------------------------------------------

def test_stop_string_across_tokens_is_cut_and_never_leaks() -> None:
    text = "The quick brown fox jumps over"
    ids = byte_token_ids(BYTE_LEVEL, text)  # one token per character
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["fox jumps", "zebra"])
    sent = ""
    for count, token_id in enumerate(ids, start=1):
        stop = detokenizer.update([token_id])
        sent += detokenizer.get_delta(finished=stop is not None)
        # nothing of the stop string goes out before the match is known
        assert "The quick brown ".startswith(sent)
        if stop is not None:
            assert stop == "fox jumps"
            assert count == len("The quick brown fox jumps")  # found at its last character
            break
    assert sent == "The quick brown " == detokenizer.output_text


def test_stop_string_included_when_asked() -> None:
    ids = BYTE_LEVEL.encode("Hello, world! How are you today?")
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["world! How"],
                                         include_stop_str_in_output=True)
    deltas, stop = stream(detokenizer, ids)
    assert stop == "world! How"
    assert "".join(deltas) == "Hello, world! How"


def test_stop_string_inside_one_token_cuts_the_token_text() -> None:
    ids = BYTE_LEVEL.encode("Hello, world")
    assert "Ġworld" in BYTE_LEVEL.convert_ids_to_tokens(ids)
    deltas, stop = stream(IncrementalDetokenizer(BYTE_LEVEL, [], stop=["orl"]), ids)
    assert stop == "orl" and "".join(deltas) == "Hello, w"


def test_earliest_stop_wins() -> None:
    ids = BYTE_LEVEL.encode("The quick brown fox")
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["fox", "brown", "quick brown"])
    deltas, stop = stream(detokenizer, ids, chunk=len(ids))  # all at once
    assert stop == "quick brown" and "".join(deltas) == "The "


def test_stop_prefix_is_held_then_released() -> None:
    ids = byte_token_ids(BYTE_LEVEL, "a fox is a fo")
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["fox!"])
    deltas = []
    for token_id in ids:
        assert detokenizer.update([token_id]) is None
        deltas.append(detokenizer.get_delta(finished=False))
    sent = "".join(deltas)
    assert sent == "a fox is a "  # "fox" went once " " showed it is no stop; "fo" may be one
    # held while "fox" could still become "fox!"
    assert deltas[2:5] == ["", "", ""] and deltas[5] == "fox "
    assert detokenizer.get_delta(finished=True) == "fo"


def test_stop_string_with_multibyte_characters() -> None:
    text = "中文🙂a🚀b✨c"
    ids = byte_token_ids(BYTE_LEVEL, text)
    deltas, stop = stream(IncrementalDetokenizer(BYTE_LEVEL, [], stop=["a🚀"]), ids)
    assert stop == "a🚀" and "".join(deltas) == "中文🙂"
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_sentencepiece_stop_string_spanning_tokens() -> None:
    ids = SENTENCEPIECE.encode("Hello, world! How are you today?", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(SENTENCEPIECE, SENTENCEPIECE.encode("Hi"),
                                         stop=["ld! H"])
    deltas, stop = stream(detokenizer, ids)
    assert stop == "ld! H" and "".join(deltas) == " Hello, wor"


def test_updates_after_stop_or_finish_are_ignored() -> None:
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL, [], stop=["lo"])
    assert detokenizer.update(BYTE_LEVEL.encode("Hello there")) == "lo"
    assert detokenizer.update(BYTE_LEVEL.encode("lo")) is None
    assert detokenizer.get_delta(finished=True) == "Hel"
    finished = IncrementalDetokenizer(BYTE_LEVEL, [])
    finished.update(BYTE_LEVEL.encode("Hi"))
    assert finished.get_delta(finished=True) == "Hi"
    finished.update(BYTE_LEVEL.encode(" there"))
    assert finished.get_delta(finished=True) == "" and finished.output_text == "Hi"


# ---- decode_token ---------------------------------------------------------------------------

def test_decode_token_whole_and_partial_characters() -> None:
    for text in ("Hello", " world", "日本語のテキスト"):
        (token_id,) = BYTE_LEVEL.encode(text)
        assert decode_token(BYTE_LEVEL, token_id) == text
    assert decode_token(BYTE_LEVEL, BYTE_LEVEL.eos_token_id) == "<|im_end|>"
    first, *_ = byte_token_ids(BYTE_LEVEL, "🙂")
    assert decode_token(BYTE_LEVEL, first) == "bytes:\\xf0"
    first, *_ = byte_token_ids(SENTENCEPIECE, "日")
    assert decode_token(SENTENCEPIECE, first) == "bytes:\\xe6"
    (space_a,) = byte_token_ids(BYTE_LEVEL, " ")
    assert decode_token(BYTE_LEVEL, space_a) == " "


# ---- property: any token sequence -----------------------------------------------------------

def check_any_sequence(tokenizer: Tok, ids: list[int], chunks: list[int], skip: bool,
                       stops: list[str], include_stop: bool) -> None:
    """Whatever the tokens, chunking and stops: what is sent is always a prefix of the full
    decode (so no half character and no piece of a stop ever goes out early), and at the end
    it is the full decode, cut at the first stop string."""
    full = decode(tokenizer, ids, skip)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip, stop=stops,
                                         include_stop_str_in_output=include_stop)
    sent, position, stop = "", 0, None
    for size in chunks:  # the chunks cover all of ids
        stop = detokenizer.update(ids[position:position + size])
        position += size
        if stop is not None:
            break
        sent += detokenizer.get_delta(finished=False)
        assert full.startswith(sent)
    sent += detokenizer.get_delta(finished=True)
    assert full.startswith(sent) and sent == detokenizer.output_text
    if not any(s in full for s in stops):
        assert sent == full
        return
    # the text ends at (or just after) a stop string, with no stop string complete before it
    if include_stop:
        ends = [s for s in stops if sent.endswith(s) and not _has_stop(sent[:-len(s)], stops)]
    else:
        ends = [s for s in stops if full[len(sent):].startswith(s) and not _has_stop(sent, stops)]
    assert ends
    assert stop is None or stop in ends  # None: the stop hid behind a partial character


def _has_stop(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)


def token_ids(tokenizer: Tok) -> st.SearchStrategy[list[int]]:
    """Byte-level BPE: any ids at all, specials included. Byte fallback: any non-byte ids, and
    byte pieces only as whole characters. Its decoder turns a byte run that is not valid UTF-8
    into one U+FFFD per byte, earlier complete characters of the run included, so its full
    decode of a broken run is not a prefix of the decode of a longer one and cannot be
    streamed; a well-formed run can."""
    vocab = tokenizer.get_vocab()
    byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
    if not byte_pieces <= vocab.keys():
        return st.lists(st.integers(0, len(tokenizer) - 1), max_size=40)
    other_ids = sorted(i for token, i in vocab.items() if token not in byte_pieces)
    char_ids = st.characters(codec="utf-8").map(lambda c: byte_token_ids(tokenizer, c))
    pieces = st.one_of(st.sampled_from(other_ids).map(lambda i: [i]), char_ids)
    return st.lists(pieces, max_size=25).map(lambda ps: [i for p in ps for i in p])


@st.composite
def cases(draw: st.DrawFn, tokenizer: Tok) -> tuple[list[int], list[int], bool, list[str], bool]:
    ids = draw(token_ids(tokenizer))
    chunks = draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)))
    skip = draw(st.booleans())
    full = decode(tokenizer, ids, skip)
    # stops drawn from the text itself, so that they do occur, plus one that may not
    stops = []
    if full and draw(st.booleans()):
        start = draw(st.integers(0, len(full) - 1))
        stops.append(full[start:start + draw(st.integers(1, 4))])
    if draw(st.booleans()):
        stops.append(draw(st.text(alphabet="ab 日🙂", min_size=1, max_size=3)))
    return ids, chunks, skip, stops, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(cases(BYTE_LEVEL))
def test_any_byte_level_sequence(case: tuple[list[int], list[int], bool, list[str], bool]
                                 ) -> None:
    check_any_sequence(BYTE_LEVEL, *case)


@settings(max_examples=150, deadline=None)
@given(cases(SENTENCEPIECE))
def test_any_sentencepiece_sequence(case: tuple[list[int], list[int], bool, list[str], bool]
                                    ) -> None:
    check_any_sequence(SENTENCEPIECE, *case)


def test_each_step_decodes_a_short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # O(new tokens) per step: a long output never makes a step decode more than a small window
    tokenizer = build_tokenizer()
    decoded_lengths: list[int] = []
    real_decode = tokenizer.decode

    def recording_decode(token_ids: list[int], **kwargs: bool) -> str | list[str]:
        decoded_lengths.append(len(token_ids))
        return real_decode(token_ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", recording_decode)
    ids = tokenizer.encode(" ".join(TEXTS) * 20) + byte_token_ids(tokenizer, "🙂🚀✨" * 20)
    prompt = tokenizer.encode(TEXTS[0])
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, prompt, stop=["zzz"]), ids)
    assert len(ids) > 1000
    assert max(decoded_lengths) <= 10  # a 4-byte character and its context at most
    monkeypatch.undo()
    assert "".join(deltas) == expected_text(tokenizer, prompt, ids)
