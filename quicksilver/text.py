"""Text <-> token ids, in one place, so that every entry point tokenises the same way.

Two encodings, because the references they reproduce differ:

- ``encode_prompt``: what the model sees as a prompt (generation, log-likelihoods). Special
  tokens are added exactly as the tokenizer's own configuration says: a BOS for Llama-2 or
  Mistral-style tokenizers, nothing for SmolLM2 or GPT-2. Models were trained that way, and
  a prompt without the BOS they expect (or with one they never saw) reads differently.
- ``encode_stream``: a raw stream for perplexity, with no special tokens at all, as the
  Hugging Face perplexity guide and the project's reference numbers do.

Decoding is incremental for streaming (``TextStream``), and the same class decides when a
stop string has been reached, so streamed pieces and the final text always agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from quicksilver.errors import QuicksilverError

# What a byte-level or SentencePiece decoder shows for the bytes of a character that is not
# complete yet (its remaining bytes come with the next tokens).
INCOMPLETE = "\ufffd"


def check_text(text: str, what: str = "the text") -> str:
    """``text`` if it is valid Unicode. A Python str (from JSON's ``\\ud800`` escapes, or
    command-line bytes that are not UTF-8) can hold lone surrogates, which no tokenizer can
    encode: they would fail deep inside it with an obscure TypeError or encode error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        raise QuicksilverError(
            f"{what} holds a lone surrogate (U+{code:04X} at character {err.start}), which is "
            "not valid Unicode text; send the character's full surrogate pair or UTF-8"
        ) from None
    return text


def encode_prompt(tokenizer: Any, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt, special tokens as the tokenizer's configuration adds them.

    With ``chat``, ``text`` becomes one user turn of the tokenizer's chat template (with the
    assistant's turn opened); the template writes its own special tokens (e.g. a BOS) as
    text, so the result is encoded without adding them a second time.
    """
    check_text(text)
    if chat:
        if not has_chat_template(tokenizer):
            raise QuicksilverError(
                "chat=True needs a tokenizer with a chat template, and this one has none; "
                "pass the prompt without chat"
            )
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(templated, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_stream(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as one raw stream, with no BOS or other special tokens.

    No BOS, because the project's reference perplexity (transformers, fp32) was measured on
    the plain token stream, as in the Hugging Face guide; a BOS would add a token and change
    the first window. The whole text is encoded in one call: the Rust tokenizer handles a
    WikiText-sized file in about a second, and cutting the text into pieces could change the
    tokens at each seam (byte-level BPE merges whitespace runs; SentencePiece adds a prefix
    space per piece). With a fast tokenizer we call its backend directly, which gives the same
    ids without transformers' "sequence longer than the model maximum" warning.
    """
    check_text(text)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of generated ids, special tokens (EOS, chat markers) left out.

    No "clean-up" of spaces before punctuation: that English-only heuristic rewrites text
    the model produced (``a .b`` in code) and would make the text of a longer sequence stop
    being an extension of a shorter one's, which streaming relies on.
    """
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextStream:
    """One row's text as its tokens arrive: ``add`` returns the text that is now final.

    The whole sequence is decoded at every token (not token by token), which keeps
    characters spread over several tokens and the tokenizer's spacing rules right. Text is
    held back while it may still change: a trailing U+FFFD (a character whose remaining
    bytes are in the next token) and a tail that could be the start of a stop string. When
    the text contains a stop string, it is cut just before it and ``stopped`` turns True, as
    OpenAI's and vLLM's ``stop`` do. The pieces returned by ``add`` and ``finish`` join up to
    ``text``.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the row's text so far; final once stopped or finished
        self.stopped = False
        self._released = ""

    def add(self, token: int) -> str:
        """Take the next token; return the text that became final (often "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = decode(self.tokenizer, self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(self.text, final=True)
        settled = self.text[: len(self.text) - self._stop_prefix_length()]
        return self._release(settled.rstrip(INCOMPLETE), final=False)

    def finish(self) -> str:
        """No more tokens: release whatever was held back."""
        return self._release(self.text, final=True)

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, target: str, final: bool) -> str:
        if target.startswith(self._released):
            piece = target[len(self._released) :]
        elif not final:
            return ""  # decoding the longer sequence changed earlier text: wait for the end
        else:
            # Rare (a decoder that rewrites earlier characters): send what follows the part
            # already shown; the pieces then differ from ``text`` where the rewrite happened.
            piece = target[len(os.path.commonprefix([target, self._released])) :]
        self._released = target
        return piece
