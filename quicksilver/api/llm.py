"""``LLM``: a loaded model with its tokenizer and runner — generate, stream, batch, score.

Every call is checked before any work starts; generation of every kind runs through one
driver (``Batch`` over the step core). The model is shared state, so every piece of work
(a step, an evaluation) runs under the LLM's lock and under the policy of the call that
asked for it: calls from several threads interleave or wait, and each gets the result it
would get alone. ``use(policy)`` scopes a policy to the calling thread.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Unpack

from quicksilver.api import evaluation
from quicksilver.api.access import ModelAccess
from quicksilver.api.arguments import PolicySpec, Prompt, flag
from quicksilver.api.drafting import plans_for
from quicksilver.api.options import GenerationOptions, OptionKeywords, options_from
from quicksilver.api.records import GenerationOutput, LogLikelihood, Stream
from quicksilver.api.requests import ModelInputs, Request
from quicksilver.api.session import Batch, one_request_batch, open_batch
from quicksilver.errors import InvalidArgument, QuicksilverError
from quicksilver.eval.perplexity import PerplexityResult
from quicksilver.models import loading
from quicksilver.policies import Policy
from quicksilver.runtime.batch import DEFAULT_PREFILL_TOKENS
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.speculative import DraftPlan, SpeculativeConfig
from quicksilver.scoring import TokenScores, prefix_token_id
from quicksilver.text import decode


class LLM:
    """A loaded model with its tokenizer and engine: generate, stream, score, evaluate.

    ``policy=`` on a call applies a policy for that call only (None: the one in use); ``use``
    applies one for a block of calls. Without either, the model runs dense. ``access`` (the
    lock and the policy in use) and ``inputs`` (the checks of prompts and ids) are shared by
    everything that works on this model: batches, streams, evaluations.
    """

    def __init__(self, loaded: loading.LoadedModel, compile: bool = False) -> None:
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
        self.adapter: str | None = None  # the adapter file applied at load (``load``)
        self.access = ModelAccess(self.engine, loaded.verify_cache)
        self.inputs = ModelInputs(loaded)
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
        return self.inputs.encode(text, flag("chat", chat), "text")

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens left out."""
        return decode(self.inputs.text_tokenizer(), self.inputs.ids(ids, "ids", allow_empty=True))

    def draft_plan(self, *, policy: PolicySpec = None, progress: Any = None) -> DraftPlan:
        """What drafting costs and earns here under ``policy`` (``api.drafting``): read from
        the on-disk cache, or measured now (``progress(message)`` hears each stage)."""
        with self.access.work(policy):
            return self.draft_plans.measure(self.engine, [self.prefix_token_id], progress)

    # ------------------------------------------------------------ policies

    def use(self, policy: PolicySpec) -> AbstractContextManager[Policy]:
        """Run every call of this thread inside the ``with`` block under ``policy``: a Policy,
        a preset name, a JSON/YAML file, a mapping ``{mechanism: {parameter: value}}`` or
        None (dense).

        The policy is prepared on entry (e.g. Matryoshka quantises the weights) and released
        on exit, whatever happens inside, and the policy in use before comes back, so blocks
        nest. Other threads keep their own policy. Yields the Policy.
        """
        return self.access.use(policy)

    # ------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        options: GenerationOptions | None = None,
        *,
        policy: PolicySpec = None,
        chat: bool = False,
        **keywords: Unpack[OptionKeywords],
    ) -> GenerationOutput:
        """Continue one prompt or a batch (texts, token ids, or lists of either), batched;
        ``options.n`` completions per prompt, in prompt order.

        How to generate is ``options`` or the keywords of ``GenerationOptions.build`` (not
        both): ``max_new_tokens=64``, ``temperature=0`` (greedy), ``top_k``, ``top_p``,
        ``seed``, ``stop``, ``stop_ids``, ``ignore_eos``, ``speculative`` (default: the one
        given to ``load``), ``n``; ``GenerationOptions`` says what each does. ``chat`` wraps
        text prompts in the tokenizer's chat template; ``policy`` runs this call under a
        policy.
        """
        request = self._request(prompts, options_from(options, keywords), chat)
        stream = Stream(self._run(request, policy))
        for _ in stream:
            pass
        return stream.output

    def stream(
        self,
        prompt: Prompt,
        options: GenerationOptions | None = None,
        *,
        policy: PolicySpec = None,
        chat: bool = False,
        **keywords: Unpack[OptionKeywords],
    ) -> Stream:
        """``generate`` for one prompt, as text pieces while they are produced (the same
        arguments; every check happens at this call, before the first piece).

        ``for piece in (s := llm.stream(...)): print(piece, end="")``, then ``s.output``.
        A piece is held back while it may still change: an incomplete multi-byte character,
        or text that could be the start of a stop string.
        """
        self.inputs.text_tokenizer()  # streaming text needs one
        options = options_from(options, keywords)
        request = self._request(prompt, options, chat)
        if len(request.prompts) != 1 or options.n != 1:
            raise InvalidArgument(
                "stream gives one continuation of one prompt (a text or token ids, n=1); "
                "use generate for more"
            )
        return Stream(self._run(request, policy))

    def _request(self, prompts: Any, options: GenerationOptions, chat: Any) -> Request:
        """The call's checked request (log-probs are for batches: a GenerationOutput has
        no place for them)."""
        if options.logprobs is not None:
            raise InvalidArgument(
                "logprobs: generate and stream return text and token ids; "
                "use open_batch().submit for log-probs"
            )
        return self.inputs.request(prompts, options, chat)

    def _run(
        self, request: Request, policy: PolicySpec
    ) -> Generator[tuple[int, str], None, GenerationOutput]:
        """``request`` queued in a batch of its own (``Batch.run``, the one driver)."""
        batch = one_request_batch(self, request, self.access.chosen_policy(policy))
        return batch.run(request)

    def open_batch(
        self,
        *,
        max_rows: int = 16,
        max_len: int = 2048,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        policy: PolicySpec = None,
        speculative: Any = None,
    ) -> Batch:
        """A continuous batch: ``submit`` requests at any time, ``step()`` to advance every
        running one, ``cancel`` to free one. ``max_rows`` rows of up to ``max_len`` positions
        share one KV cache; at most ``prefill_tokens`` prompt tokens go in per step, so
        running rows keep streaming while a long prompt is read. ``speculative`` drafts for
        requests whose options name no drafting (None: the one given to ``load``). See
        ``api.session``."""
        return open_batch(
            self,
            max_rows=max_rows,
            max_len=max_len,
            prefill_tokens=prefill_tokens,
            policy=policy,
            speculative=speculative,
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
        with self.access.lock:
            return self.engine.counter.summary()
