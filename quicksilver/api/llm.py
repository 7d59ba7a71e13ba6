"""``LLM``: a loaded model with its tokenizer and runner — generate, stream, batch, score.

Every call is checked before any work starts; generation of every kind runs through one
driver (``Batch`` over the step core). The model is shared state, so every piece of work
(a step, an evaluation) runs under the LLM's lock and under the policy of the call that
asked for it: calls from several threads interleave or wait, and each gets the result it
would get alone. ``use(policy)`` scopes a policy to the calling thread.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from quicksilver.api import evaluation
from quicksilver.api.arguments import (
    PolicySpec,
    Prompt,
    check_drafting,
    count,
    flag,
    integer,
    prompt_items,
    stop_strings,
    token_ids,
)
from quicksilver.api.drafting import plans_for
from quicksilver.api.records import GenerationOutput, LogLikelihood, Stream, speculative_record
from quicksilver.api.session import Batch, Request, open_batch
from quicksilver.errors import InvalidArgument, QuicksilverError
from quicksilver.eval.perplexity import PerplexityResult
from quicksilver.models import loading
from quicksilver.policies import Policy, load_policy
from quicksilver.runtime.batch import DEFAULT_PREFILL_TOKENS
from quicksilver.runtime.cache import room_for, sequence_fit_error
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.sampling import NonFiniteLogits, SamplingConfig
from quicksilver.runtime.speculative import DraftPlan, SpeculativeConfig, speculative_config
from quicksilver.scoring import TokenScores, prefix_token_id
from quicksilver.text import decode, encode_prompt

# Alternatives per generated token a request may ask for (OpenAI's limit).
MAX_LOGPROBS = 20


def speculative_option(value: Any) -> SpeculativeConfig | None:
    """A ``speculative=`` argument checked (an InvalidArgument naming what is accepted)."""
    try:
        return speculative_config(value)
    except QuicksilverError as err:
        raise InvalidArgument(str(err)) from None


class LLM:
    """A loaded model with its tokenizer and engine: generate, stream, score, evaluate.

    ``policy=`` on a call applies a policy for that call only (None: the one in use); ``use``
    applies one for a block of calls. Without either, the model runs dense.
    """

    def __init__(self, loaded: loading.LoadedModel, compile: bool = False) -> None:
        self._loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer  # None when the checkpoint ships none
        self.engine = Engine(loaded.model, compile=compile)
        self.weights = loaded.model.weight_format  # how the linear weights are stored
        self.config = loaded.model.config
        self.source = loaded.source
        self.name = loaded.source.name
        self.dtype = str(loaded.model.dtype).removeprefix("torch.")
        self.load_seconds = loaded.load_seconds
        # What an int8 / int4 load of a GGUF file rounded a second time, with the measured
        # weight error (``models.loading.Requantised``); None for float or non-GGUF loads.
        self.requantised = loaded.requantised
        self.speculative: SpeculativeConfig | None = None  # the default for generate/stream
        self._lock = threading.RLock()
        self._scope = threading.local()
        self.draft_plans = plans_for(self)  # per policy, for every batch; kept on disk

    def __repr__(self) -> str:
        fmt, extra = self.weights, ""
        if fmt.quantised:
            extra += f", weights={fmt.blocks!r}, head_weights={fmt.head_format!r}"
        if self.engine.compiled is not None:
            extra += ", compile=True"
        return f"LLM({self.name!r}, dtype={self.dtype!r}{extra})"

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling decode steps so far (0 unless loaded with compile=True)."""
        return self.engine.compile_seconds

    @property
    def prefix_token_id(self) -> int:
        """What stands for an empty context or before a document: BOS, else EOS (the one
        rule, as lm-evaluation-harness chooses)."""
        try:
            return prefix_token_id(
                self.tokenizer, self.config.eos_token_ids, self.config.bos_token_id
            )
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None

    # ------------------------------------------------------------ text

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """A prompt's token ids, special tokens as the tokenizer's configuration adds them."""
        return self._encode(text, flag("chat", chat), "text")

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens left out."""
        return decode(self._loaded.text_tokenizer(), self._ids(ids, "ids", allow_empty=True))

    def draft_plan(self, *, policy: PolicySpec = None, progress: Any = None) -> DraftPlan:
        """What drafting costs and earns here under ``policy`` (``api.drafting``): read from
        the on-disk cache, or measured now (``progress(message)`` hears each stage)."""
        with self._working(policy):
            return self.draft_plans.measure(self.engine, [self.prefix_token_id], progress)

    # ------------------------------------------------------------ policies

    @contextlib.contextmanager
    def use(self, policy: PolicySpec) -> Iterator[Policy]:
        """Run every call of this thread inside the ``with`` block under ``policy``: a Policy,
        a preset name, a JSON/YAML file, a mapping ``{mechanism: {parameter: value}}`` or
        None (dense).

        The policy is prepared on entry (e.g. Matryoshka quantises the weights) and released
        on exit, whatever happens inside, and the policy in use before comes back, so blocks
        nest. Other threads keep their own policy. Yields the Policy.
        """
        chosen = self._policy(policy)
        stack = self._stack()
        with self._lock:
            self._activate(chosen)
        stack.append(chosen)
        try:
            yield chosen
        finally:
            stack.pop()
            with self._lock:
                self._activate(self._scoped_policy())

    def _stack(self) -> list[Policy | None]:
        if not hasattr(self._scope, "stack"):
            self._scope.stack = []
        return self._scope.stack

    def _scoped_policy(self) -> Policy | None:
        """The policy of the innermost ``use`` of the calling thread (None: dense)."""
        stack = self._stack()
        return stack[-1] if stack else None

    def _activate(self, policy: Policy | None) -> None:
        """Make ``policy`` the engine's (caller holds the lock)."""
        if self.engine.policy is not policy:
            self.engine.set_policy(policy)

    def _policy(self, spec: PolicySpec) -> Policy:
        """The Policy ``spec`` names, checked against this model (PolicyConfigError if it
        names none: an unknown preset or file, a bad mapping, another type)."""
        policy = load_policy(spec)
        policy.check_model(self.config)
        return policy

    @contextlib.contextmanager
    def _working(self, spec: PolicySpec) -> Iterator[None]:
        """Hold the model for one piece of work under the call's policy."""
        policy = self._scoped_policy() if spec is None else self._policy(spec)
        with self._lock, self._checked_weights():
            self._activate(policy)
            try:
                yield
            finally:  # a policy for one call is released after it
                self._activate(self._scoped_policy())

    @contextlib.contextmanager
    def _checked_weights(self) -> Iterator[None]:
        """NaN or inf logits may come from a damaged converted-model cache (bytes flipped
        inside a tensor change no size, so a load cannot see them): verify the entry these
        weights came from, and if it is damaged, say so — it is removed and the next load
        rebuilds it — instead of blaming the checkpoint."""
        try:
            yield
        except NonFiniteLogits as err:
            damaged = self._loaded.verify_cache()
            if damaged is not None:
                raise QuicksilverError(f"{damaged}; load the model again") from err
            raise

    def _speculative(self, value: Any) -> SpeculativeConfig | None:
        return self.speculative if value is None else speculative_option(value)

    # ------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_ids: Sequence[int] | None = None,
        policy: PolicySpec = None,
        chat: bool = False,
        speculative: Any = None,
        ignore_eos: bool = False,
    ) -> GenerationOutput:
        """Continue one prompt or a batch (texts, token ids, or lists of either), batched.

        A row ends at an EOS or one of ``stop_ids`` (kept in its tokens), at a ``stop``
        string (its text is cut before it) or after ``max_new_tokens``; ``ignore_eos=True``
        turns the EOS stop off (``stop_ids`` still apply), as in vLLM. ``temperature=0``
        is greedy; ``seed`` makes sampling reproducible. ``chat`` wraps text prompts in the
        tokenizer's chat template. ``speculative`` (default: the one given to ``load``)
        drafts tokens that the full model verifies: the same tokens in fewer forwards.
        """
        request = self._request(
            prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_ids, policy,
            chat, speculative=speculative, ignore_eos=ignore_eos,
        )  # fmt: skip
        run = self._run(request)
        while True:
            try:
                next(run)
            except StopIteration as end:
                return end.value

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_ids: Sequence[int] | None = None,
        policy: PolicySpec = None,
        chat: bool = False,
        speculative: Any = None,
        ignore_eos: bool = False,
    ) -> Stream:
        """``generate`` for one prompt, as text pieces while they are produced.

        ``for piece in (s := llm.stream(...)): print(piece, end="")``, then ``s.output``.
        A piece is held back while it may still change: an incomplete multi-byte character,
        or text that could be the start of a stop string.
        """
        self._loaded.text_tokenizer()  # streaming text needs one
        request = self._request(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_ids, policy,
            chat, speculative=speculative, ignore_eos=ignore_eos,
        )  # fmt: skip
        if len(request.prompts) != 1:
            raise InvalidArgument(
                "stream takes one prompt (a text or token ids); use generate for a batch"
            )
        policy = request.policy if request.policy is not None else self._scoped_policy()
        check_drafting(policy, request.speculative)  # now, not at the first piece
        return Stream(self._run(request))

    def open_batch(
        self,
        *,
        max_rows: int = 16,
        max_len: int = 2048,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        policy: PolicySpec = None,
    ) -> Batch:
        """A continuous batch: ``submit`` requests at any time, ``step()`` to advance every
        running one, ``cancel`` to free one. ``max_rows`` rows of up to ``max_len`` positions
        share one KV cache; at most ``prefill_tokens`` prompt tokens go in per step, so
        running rows keep streaming while a long prompt is read. See ``api.session``."""
        return open_batch(
            self,
            max_rows=max_rows,
            max_len=max_len,
            prefill_tokens=prefill_tokens,
            policy=policy,
        )

    def _request(
        self,
        prompts: Any,
        max_new_tokens: Any,
        temperature: Any,
        top_k: Any,
        top_p: Any,
        seed: Any,
        stop: Any,
        stop_ids: Any,
        policy: PolicySpec,
        chat: Any,
        logprobs: Any = None,
        speculative: Any = None,
        ignore_eos: Any = False,
    ) -> Request:
        """Check every argument and encode the prompts, before any work."""
        chat = flag("chat", chat)
        prompt_ids = self._prompts(prompts, chat)
        max_new_tokens = count("max_new_tokens", max_new_tokens)
        positions = self.config.max_position_embeddings
        error = sequence_fit_error(
            max(map(len, prompt_ids)), max_new_tokens, positions, f"the model's {positions}"
        )
        if error is not None:
            raise InvalidArgument(f"{error}; shorten the prompt or lower max_new_tokens")
        try:
            sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None
        note = sampling.ignored_note(self.config.vocab_size)  # e.g. top_p while greedy
        if note:
            warnings.warn(note, stacklevel=4)
        stops = stop_strings(stop)
        if stops and self.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer, and this model ships none")
        extra_ids = [] if stop_ids is None else self._ids(stop_ids, "stop_ids", allow_empty=True)
        ignore_eos = flag("ignore_eos", ignore_eos)
        if logprobs is not None:
            logprobs = integer("logprobs", logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise InvalidArgument(f"logprobs must be in 0..{MAX_LOGPROBS}, got {logprobs}")
        return Request(
            prompts=prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=stops,
            # Stop ids end a row in addition to the model's EOS (unless ignored), as in vLLM.
            stop_ids=frozenset([*([] if ignore_eos else self.config.eos_token_ids), *extra_ids]),
            policy=None if policy is None else self._policy(policy),
            logprobs=logprobs,
            speculative=self._speculative(speculative),
        )

    def _run(self, request: Request) -> Generator[tuple[int, str], None, GenerationOutput]:
        """Drive one generation: yield (row, text piece) as pieces become final, return the
        GenerationOutput. The prompts go in together as one left-padded block; each row
        leaves the batch when it ends."""
        policy = request.policy if request.policy is not None else self._scoped_policy()
        prompts = request.prompts
        longest = max(map(len, prompts))
        batch = Batch(
            self,
            max_rows=len(prompts),
            max_len=room_for(
                self.config,
                longest + request.max_new_tokens - 1,
                request.speculative.max_tokens if request.speculative is not None else 0,
            ),
            prefill_tokens=len(prompts) * longest,
            policy=policy,
        )
        ids = batch.add(request)
        index = {request_id: i for i, request_id in enumerate(ids)}
        completions: list[Any] = [None] * len(ids)
        try:
            while batch.has_work:
                for event in batch.step():
                    row = index[event.request]
                    if event.completion is not None:
                        completions[row] = event.completion
                    if event.text:
                        yield row, event.text
        finally:
            for request_id in ids:  # a stream left early frees its rows
                batch.cancel(request_id)
            with self._lock:  # a policy for one call is released after it
                self._activate(self._scoped_policy())
        stats = batch.stats
        return GenerationOutput(
            completions=completions,
            prefill_seconds=stats.prefill_seconds,
            decode_seconds=stats.decode_seconds,
            decode_steps=stats.decode_steps,
            decode_tokens_per_s=stats.decode_tokens / stats.decode_seconds
            if stats.decode_seconds
            else 0.0,
            flops=dict(stats.flops),
            decode_flops=dict(stats.decode_flops),
            policy=policy.to_config() if policy is not None else {},
            compile_seconds=stats.compile_seconds,
            fed_tokens=stats.fed_tokens,
            speculative=speculative_record(request.speculative, stats),
        )

    # ------------------------------------------------------------ scoring

    def perplexity(
        self,
        text: str | Sequence[int],
        *,
        context: int = 1024,
        stride: int = 512,
        batch_size: int = 1,
        max_windows: int | None = None,
        progress: bool = False,
        policy: PolicySpec = None,
    ) -> PerplexityResult:
        """Sliding-window perplexity of a text (or of token ids), as ``quicksilver eval``.

        Text is tokenised as one raw stream with no special tokens, the way the reference
        numbers were measured; for text, bits per byte and word perplexity are filled in.
        """
        return evaluation.perplexity(
            self, text, context, stride, batch_size, max_windows, progress, policy
        )

    def loglikelihood(
        self, context: str, continuation: str, *, policy: PolicySpec = None
    ) -> LogLikelihood:
        """log P(continuation | context), summed over the continuation's tokens, and whether
        greedy decoding would produce exactly them; tokenised as lm-evaluation-harness does
        (``loglikelihoods`` explains)."""
        return self.loglikelihoods([(context, continuation)], policy=policy, batch_size=1)[0]

    def loglikelihoods(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        policy: PolicySpec = None,
        batch_size: int = 8,
    ) -> list[LogLikelihood]:
        """``loglikelihood`` for many (context, continuation) pairs, ``batch_size`` per forward.

        Tokenised as lm-evaluation-harness does: trailing whitespace of the context moves to
        the continuation, context + continuation are encoded whole (special tokens as for a
        prompt) and split at the context's own token count, and an empty context becomes the
        BOS token (EOS without one). Too long a context loses its oldest tokens.
        """
        return evaluation.loglikelihoods(self, pairs, policy, batch_size)

    def token_scores(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        firsts: Sequence[int] | None = None,
        top: int = 0,
        policy: PolicySpec = None,
    ) -> list[TokenScores]:
        """Log-probs of ``sequence[first:]`` given the tokens before (``firsts`` default: 1),
        with the ``top`` best alternatives at each position: what ``echo`` with ``logprobs``
        and lm-evaluation-harness's rolling windows need. One teacher-forced forward."""
        return evaluation.token_scores(self, sequences, firsts, top, policy)

    def rolling_loglikelihood(
        self, ids: Sequence[int], *, max_length: int, batch_size: int = 8, policy: PolicySpec = None
    ) -> float:
        """log P(document) of token ids in lm-evaluation-harness's rolling windows of at most
        ``max_length`` tokens, the prefix token (``prefix_token_id``) before the first."""
        return evaluation.rolling(self, ids, max_length, batch_size, policy)

    def counted_flops(self) -> dict[str, int]:
        """Everything the runner has counted so far (``total``, ``dense`` and their parts):
        take it before and after work to see what the work cost."""
        with self._lock:
            return self.engine.counter.summary()

    # ------------------------------------------------------------ argument checks

    def _prompts(self, prompts: Any, chat: bool) -> list[list[int]]:
        """Token ids of each prompt: one text, one id list, or a list of either."""
        items = prompt_items(prompts)
        encoded = []
        for i, item in enumerate(items):
            what = "the prompt" if len(items) == 1 else f"prompt {i}"
            if isinstance(item, str):
                encoded.append(self._encode(item, chat, what))
            elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
                encoded.append(self._ids(item, what))
            else:
                raise InvalidArgument(
                    f"{what} must be a text or a list of token ids, got {type(item).__name__}"
                )
        return encoded

    def _encode(self, text: Any, chat: bool, what: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidArgument(f"{what} must be a str, got {type(text).__name__}")
        if not text:
            raise InvalidArgument(f"{what} is empty")
        try:
            ids = encode_prompt(self._loaded.text_tokenizer(), text, chat)
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None
        return self._ids(ids, what)

    def _ids(self, ids: Any, what: str, allow_empty: bool = False) -> list[int]:
        return token_ids(ids, what, self.config.vocab_size, allow_empty)
