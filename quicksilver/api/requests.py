"""What one model accepts as input: token ids of its vocabulary, text through its tokenizer,
and generation requests (prompts + ``GenerationOptions``) checked into a ``Request``.

``LLM``, ``Batch`` and the evaluation functions share one ``ModelInputs``, so a prompt or an
id list is checked by the same rule, with the same message, wherever it comes in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quicksilver.api.arguments import flag, prompt_items, token_ids
from quicksilver.api.options import GenerationOptions
from quicksilver.errors import InvalidArgument, QuicksilverError
from quicksilver.models.loading import LoadedModel
from quicksilver.text import encode_prompt


@dataclass(frozen=True)
class Request:
    """Prompts encoded and options checked against one model: what a ``Batch`` admits."""

    prompts: tuple[tuple[int, ...], ...]
    options: GenerationOptions
    # Stop ids end a row in addition to the model's EOS (unless ignored), as in vLLM.
    stop_ids: frozenset[int]

    @property
    def longest(self) -> int:
        return max(map(len, self.prompts))


class ModelInputs:
    """Checks input against one loaded model (every mistake an ``InvalidArgument``)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.config = loaded.model.config
        self.tokenizer = loaded.tokenizer  # None when the checkpoint ships none
        self._loaded = loaded

    def text_tokenizer(self) -> Any:
        """The tokenizer, or a clear error for work that starts from text."""
        return self._loaded.text_tokenizer()

    def ids(self, ids: Any, what: str, allow_empty: bool = False) -> list[int]:
        """``ids`` as a list of ints that index the model's vocabulary."""
        return token_ids(ids, what, self.config.vocab_size, allow_empty)

    def encode(self, text: Any, chat: bool, what: str) -> list[int]:
        """A text prompt's ids, special tokens as the tokenizer's configuration adds them
        (``chat``: wrapped in its chat template)."""
        if not isinstance(text, str):
            raise InvalidArgument(f"{what} must be a str, got {type(text).__name__}")
        if not text:
            raise InvalidArgument(f"{what} is empty")
        try:
            ids = encode_prompt(self.text_tokenizer(), text, chat)
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None
        return self.ids(ids, what)

    def prompts(self, prompts: Any, chat: bool) -> list[list[int]]:
        """Token ids of each prompt: one text, one id list, or a list of either."""
        items = prompt_items(prompts)
        encoded = []
        for i, item in enumerate(items):
            what = "the prompt" if len(items) == 1 else f"prompt {i}"
            if isinstance(item, str):
                encoded.append(self.encode(item, chat, what))
            elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
                encoded.append(self.ids(item, what))
            else:
                raise InvalidArgument(
                    f"{what} must be a text or a list of token ids, got {type(item).__name__}"
                )
        return encoded

    def request(self, prompts: Any, options: GenerationOptions, chat: Any) -> Request:
        """Encode the prompts and check what of the options depends on this model (stop
        ids in its vocabulary, stop strings need its tokenizer). Whether the request fits
        depends on where it runs: ``Batch.add`` checks that, once."""
        prompt_ids = self.prompts(prompts, flag("chat", chat))
        if options.stop and self.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer, and this model ships none")
        extra_ids = self.ids(options.stop_ids, "stop_ids", allow_empty=True)
        eos = [] if options.ignore_eos else self.config.eos_token_ids
        return Request(
            prompts=tuple(map(tuple, prompt_ids)),
            options=options,
            stop_ids=frozenset([*eos, *extra_ids]),
        )
