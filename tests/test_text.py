"""Tokenisation in one place: prompts get the tokenizer's own special tokens, perplexity streams
none, and the streaming decoder releases only text that can no longer change."""

from __future__ import annotations

import pytest
from tiny_models import SPECIAL_IDS, byte_level_tokenizer
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from quicksilver.errors import QuicksilverError
from quicksilver.text import TextStream, decode, encode_prompt, encode_stream

BOS = SPECIAL_IDS["bos"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}bot:{% endif %}"
)


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny byte-level tokenizer, configured like Llama-2's to put a BOS before every
    text, with a chat template that writes its own BOS."""
    tokenizer = byte_level_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def byte_ids(text: str) -> list[int]:
    """What the byte-level tokenizers give for ``text`` without specials: one id per byte."""
    return byte_level_tokenizer().backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_prompts_get_the_tokenizers_own_special_tokens() -> None:
    assert encode_prompt(byte_level_tokenizer(), "hi") == byte_ids("hi")  # like SmolLM2, GPT-2
    assert encode_prompt(bos_tokenizer(), "hi") == [BOS, *byte_ids("hi")]  # like Llama-2


def test_streams_for_perplexity_get_no_special_tokens() -> None:
    text = "Hello there. Héllo again."
    assert encode_stream(bos_tokenizer(), text) == byte_ids(text)
    assert encode_stream(byte_level_tokenizer(), text) == byte_ids(text)


def test_chat_prompts_carry_the_templates_bos_once() -> None:
    ids = encode_prompt(bos_tokenizer(), "hi", chat=True)
    assert ids == [BOS, *byte_ids("user: hi\nbot:")]


def test_chat_without_a_template_is_an_error() -> None:
    with pytest.raises(QuicksilverError, match="chat template"):
        encode_prompt(byte_level_tokenizer(), "hi", chat=True)


def test_decode_leaves_special_tokens_and_spacing_alone() -> None:
    tokenizer = bos_tokenizer()
    ids = encode_prompt(tokenizer, "a .b ,c") + [SPECIAL_IDS["eos"]]
    assert decode(tokenizer, ids) == "a .b ,c"


def _stream(text: str, stop: tuple[str, ...] = ()) -> tuple[TextStream, list[str]]:
    """Feed ``text``'s ids one at a time; return the stream and every piece it released."""
    stream = TextStream(byte_level_tokenizer(), stop)
    pieces = [stream.add(token) for token in byte_ids(text)]
    pieces.append(stream.finish())
    return stream, pieces


def test_multibyte_characters_wait_for_their_last_byte() -> None:
    text = "aé€😀b"  # 1, 2, 3, 4 and 1 bytes: one token per byte
    stream, pieces = _stream(text)
    assert "".join(pieces) == stream.text == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[:5] == ["a", "", "é", "", ""]  # "€" is complete at its third byte


def test_stop_string_cuts_the_text_and_holds_back_its_start() -> None:
    stream, pieces = _stream("one. two. three", stop=(". t",))
    assert stream.stopped
    assert stream.text == "".join(pieces) == "one"
    assert pieces[:5] == ["o", "n", "e", "", ""]  # ". " could start ". t": held back
    assert stream.add(byte_ids("x")[0]) == ""  # nothing after a stop


def test_text_held_back_for_a_stop_string_that_never_comes_is_released() -> None:
    stream, pieces = _stream("a.b.", stop=(".c",))
    assert not stream.stopped
    assert pieces == ["a", "", ".b", "", "."]
    assert "".join(pieces) == stream.text == "a.b."


def test_earliest_stop_string_wins() -> None:
    stream, pieces = _stream("x = 1; y = 2\nz", stop=("\n", ";"))
    assert stream.text == "".join(pieces) == "x = 1"
