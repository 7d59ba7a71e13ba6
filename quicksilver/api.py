"""The Python API: load a model once, then generate, stream, score and evaluate, under any
policy.

    import quicksilver as qs

    llm = qs.load("smollm2-135m")
    print(llm.generate("The capital of France is", max_new_tokens=8).text)
    with llm.use({"matryoshka": {"fixed_bits": 8}}):
        print(llm.perplexity(open("wiki.txt").read(), max_windows=4).ppl)

This is the contract the CLI, the benchmarks and any server or evaluation harness build on:
arguments are checked before any work starts, a mistake raises an ``InvalidArgument`` (a
``QuicksilverError`` and a ``ValueError``) whose message says what to change, and every
result is a record with a ``to_dict()`` that is strict JSON. Tokenisation is ``quicksilver.text``'s
(prompts get special tokens as the tokenizer's configuration says, perplexity streams none).

An ``LLM`` runs one generation or evaluation at a time; it is not safe to share between
threads (its policy, set by ``use``, is the engine's state).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quicksilver.errors import InvalidArgument, QuicksilverError
from quicksilver.eval.datasets import EvalText
from quicksilver.eval.perplexity import (
    PerplexityResult,
    check_finite_logits,
    check_windows,
    evaluate_perplexity,
)
from quicksilver.eval.report import jsonable
from quicksilver.models import loading
from quicksilver.models.formats import WeightFormat
from quicksilver.policies import Policy, load_policy
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.sampling import SamplingConfig
from quicksilver.text import TextStream, decode, encode_prompt, encode_stream

# What ``use`` and every ``policy=`` argument accept (see ``load_policy``).
PolicySpec = Policy | str | os.PathLike[str] | Mapping[str, Any] | None
# One prompt: text, or token ids.
Prompt = str | Sequence[int]


# ---------------------------------------------------------------- result records


@dataclass(frozen=True)
class Completion:
    """One prompt's continuation."""

    text: str  # cut before a stop string; "" when the model ships no tokenizer
    token_ids: list[int]  # generated ids (an EOS or stop id that ended the row included)
    finish_reason: str  # "stop" (EOS, a stop id or a stop string) or "length"
    prompt_token_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass(frozen=True)
class GenerationOutput:
    """A batched generation: the completions in prompt order and what the run cost."""

    completions: list[Completion]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # forwards after the prompts' one (rows still running ride along)
    decode_tokens_per_s: float  # rows x decode steps / decode seconds
    flops: dict[str, int]  # counted over the prompts' forward and every decode step
    decode_flops: dict[str, int]  # the decode steps only
    policy: dict[str, Any]  # the policy's configuration ({} is dense)
    compile_seconds: float = 0.0  # compiling decode steps (compile=True), not in decode_seconds

    @property
    def text(self) -> str:
        """The first completion's text: the whole answer for a single prompt."""
        return self.completions[0].text

    @property
    def prompt_tokens(self) -> int:
        return sum(len(c.prompt_token_ids) for c in self.completions)

    @property
    def new_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def flops_per_token(self) -> float:
        """Counted FLOPs per token that went through the model: prompts are left-padded into
        one block (rows x longest prompt), then every row feeds one token per decode step,
        finished rows included, because that work ran."""
        longest = max(len(c.prompt_token_ids) for c in self.completions)
        processed = len(self.completions) * (longest + self.decode_steps)
        return self.flops.get("total", 0) / processed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            prompt_tokens=self.prompt_tokens,
            new_tokens=self.new_tokens,
            flops_per_token=self.flops_per_token,
        )
        return jsonable(data)


@dataclass(frozen=True)
class LogLikelihood:
    """How likely a continuation is after a context (lm-evaluation-harness's request)."""

    logprob: float  # natural-log probability of the continuation's tokens, summed
    is_greedy: bool  # greedy decoding from the context would produce exactly these tokens
    tokens: int  # continuation tokens scored

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


class Stream(Iterator[str]):
    """The text of one generation, piece by piece as it is produced.

    Iterate it to the end, then ``output`` holds the ``GenerationOutput`` (the pieces joined
    are its text). Leaving early (``close()``, or a ``with`` block) stops the generation and
    restores the policy that was in use before it.
    """

    def __init__(self, run: Generator[tuple[int, str], None, GenerationOutput]) -> None:
        self._run = run
        self._output: GenerationOutput | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        if self._output is not None:
            raise StopIteration
        try:
            return next(self._run)[1]
        except StopIteration as end:
            self._output = end.value
            raise StopIteration from None

    @property
    def output(self) -> GenerationOutput:
        if self._output is None:
            raise QuicksilverError("the stream has not ended: iterate it to the end first")
        return self._output

    def close(self) -> None:
        self._run.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- loading


def load(
    model: str | os.PathLike[str] = loading.DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "bfloat16",
    weights: str | None = None,
    head_weights: str | None = None,
    group_size: int = 32,
    compile: bool = False,
    device: str | torch.device = "cpu",
) -> LLM:
    """Load a model and its tokenizer: a short name (``smollm2-135m``), a ``.gguf`` file, a
    Hugging Face model directory or a hub id.

    ``dtype`` is the activations' (and embeddings', norms', KV cache's) precision
    (``bfloat16``, ``float32``, or what ``models.loading.DTYPES`` lists). ``weights`` is the
    linear layers' storage format: None (the same as ``dtype``), ``int8`` (per channel) or
    ``int4`` (groups of ``group_size`` = 32, 64 or 128; a GGUF file's Q4_0 / Q4_1 layers load
    as they are with groups of 32). ``head_weights`` overrides the LM head's format (default:
    the blocks', except int8 for an int4 model: a 4-bit head broke greedy output). Only one
    copy of the weights is kept, in the chosen format.

    ``compile=True`` runs each dense decode step of a single row (where it pays: batched
    steps stay eager, which is faster there) as one compiled graph (``runtime.compiled``):
    the first such step compiles (tens of seconds for
    SmolLM2-135M, much less once inductor's on-disk cache has it), reported as
    ``compile_seconds``, never as decode time.

    Only ``device="cpu"`` exists in this build: the engine's caches and step tensors are
    created on the CPU, so a model moved to a GPU could not run.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgument(
            f"model must be a name, a file or a directory, got {type(model).__name__}"
        )
    if str(device) != "cpu":
        raise InvalidArgument(
            f"device {str(device)!r} is not supported: this build runs models on the CPU "
            "only (device='cpu')"
        )
    try:
        torch_dtype = loading.parse_dtype(dtype)
        fmt = weight_format(torch_dtype, weights, head_weights, group_size)
    except QuicksilverError as err:
        raise InvalidArgument(str(err)) from None
    return LLM(
        loading.load(os.fspath(model), torch_dtype, weights=fmt), compile=_flag("compile", compile)
    )


def weight_format(
    dtype: torch.dtype, weights: str | None, head_weights: str | None, group_size: Any
) -> WeightFormat:
    """The checked ``WeightFormat`` of a load's options (names as ``parse_dtype`` reads them;
    a float format must be the activations' dtype: a second float copy would buy nothing)."""
    own = str(dtype).removeprefix("torch.")

    def name(value: str | None, what: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidArgument(f"{what} must be a format name, got {type(value).__name__}")
        if value in ("int8", "int4"):
            return value
        try:
            parsed = str(loading.parse_dtype(value)).removeprefix("torch.")
        except QuicksilverError:
            raise InvalidArgument(
                f"unknown {what} {value!r}; choose int4, int8 or the dtype ({own})"
            ) from None
        if parsed != own:
            raise InvalidArgument(
                f"{what} {value!r} differs from dtype {own!r}: float weights are kept in the "
                "activations' dtype; use dtype= to change both, or int8 / int4"
            )
        return parsed

    group = _integer("group_size", group_size)
    return WeightFormat(
        blocks=name(weights, "weights") or own,
        head=name(head_weights, "head_weights"),
        group_size=group,
    )


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class _Request:
    """A checked generation request."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stop_ids: list[int] | None  # None: the model's EOS ids
    policy: Policy | None  # None: whatever is in use


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

    # ------------------------------------------------------------ text

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """A prompt's token ids, special tokens as the tokenizer's configuration adds them."""
        return self._encode(text, _flag("chat", chat), "text")

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens left out."""
        return decode(self._loaded.text_tokenizer(), self._ids(ids, "ids", allow_empty=True))

    # ------------------------------------------------------------ policies

    @contextlib.contextmanager
    def use(self, policy: PolicySpec) -> Iterator[Policy]:
        """Run every call inside the ``with`` block under ``policy``: a Policy, a preset name,
        a JSON/YAML file, a mapping ``{mechanism: {parameter: value}}`` or None (dense).

        The policy is prepared on entry (e.g. Matryoshka quantises the weights) and released
        on exit, whatever happens inside, and the policy in use before comes back, so blocks
        nest. Yields the Policy.
        """
        chosen = self._policy(policy)
        previous = self.engine.policy
        try:
            self.engine.set_policy(chosen)
            yield chosen
        finally:
            self.engine.set_policy(previous)

    def _policy(self, spec: PolicySpec) -> Policy:
        """The Policy ``spec`` names, checked against this model (PolicyConfigError if it
        names none: an unknown preset or file, a bad mapping, another type)."""
        policy = load_policy(spec)
        policy.check_model(self.config)
        return policy

    def _policy_for_call(self, spec: PolicySpec) -> contextlib.AbstractContextManager[Any]:
        """``use(spec)`` for one call, or nothing when the call names no policy."""
        return contextlib.nullcontext() if spec is None else self.use(spec)

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
    ) -> GenerationOutput:
        """Continue one prompt or a batch (texts, token ids, or lists of either), batched.

        A row ends at an EOS or one of ``stop_ids`` (kept in its tokens), at a ``stop``
        string (its text is cut before it) or after ``max_new_tokens``. ``temperature=0``
        is greedy; ``seed`` makes sampling reproducible. ``chat`` wraps text prompts in the
        tokenizer's chat template.
        """
        request = self._request(
            prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_ids, policy, chat
        )
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
    ) -> Stream:
        """``generate`` for one prompt, as text pieces while they are produced.

        ``for piece in (s := llm.stream(...)): print(piece, end="")``, then ``s.output``.
        A piece is held back while it may still change: an incomplete multi-byte character,
        or text that could be the start of a stop string.
        """
        self._loaded.text_tokenizer()  # streaming text needs one
        request = self._request(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_ids, policy, chat
        )
        if len(request.prompts) != 1:
            raise InvalidArgument(
                "stream takes one prompt (a text or token ids); use generate for a batch"
            )
        return Stream(self._run(request))

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
    ) -> _Request:
        """Check every argument and encode the prompts, before any work."""
        chat = _flag("chat", chat)
        token_ids = self._prompts(prompts, chat)
        max_new_tokens = _count("max_new_tokens", max_new_tokens)
        positions = self.config.max_position_embeddings
        needed = max(len(p) for p in token_ids) + max_new_tokens - 1
        if needed > positions:
            raise InvalidArgument(
                f"the longest prompt ({max(map(len, token_ids))} tokens) plus max_new_tokens "
                f"({max_new_tokens}) need {needed} positions, more than the model's {positions}; "
                "shorten the prompt or lower max_new_tokens"
            )
        try:
            sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None
        note = sampling.ignored_note(self.config.vocab_size)  # e.g. top_p while greedy
        if note:
            warnings.warn(note, stacklevel=3)
        stops = _stop_strings(stop)
        if stops and self.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer, and this model ships none")
        extra_ids = None if stop_ids is None else self._ids(stop_ids, "stop_ids", allow_empty=True)
        return _Request(
            prompts=token_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=stops,
            # Stop ids end a row in addition to the model's EOS, as in vLLM.
            stop_ids=None if extra_ids is None else [*self.config.eos_token_ids, *extra_ids],
            policy=None if policy is None else self._policy(policy),
        )

    def _run(self, request: _Request) -> Generator[tuple[int, str], None, GenerationOutput]:
        """Drive one generation: yield (row, text piece) as pieces become final, return the
        GenerationOutput. The only generation loop of the API (``generate`` drains it)."""
        with self._policy_for_call(request.policy):
            generation = self.engine.start(
                request.prompts, request.max_new_tokens, request.sampling, request.stop_ids
            )
            # Without a tokenizer there is no text to follow: ids only.
            streams = [TextStream(self.tokenizer, request.stop) for _ in request.prompts]
            has_text = self.tokenizer is not None
            for new in generation:
                for row, token in new if has_text else ():
                    piece = streams[row].add(token)
                    if streams[row].stopped:
                        generation.finish(row)
                    if piece:
                        yield row, piece
            for row, stream in enumerate(streams if has_text else ()):
                piece = stream.finish()
                if piece:
                    yield row, piece
            result = generation.result()
            policy = self.engine.policy
        completions = [
            Completion(
                text=streams[row].text,
                token_ids=list(tokens),
                finish_reason="stop" if streams[row].stopped else reason,
                prompt_token_ids=request.prompts[row],
            )
            for row, (tokens, reason) in enumerate(
                zip(result.tokens, result.finish_reasons, strict=True)
            )
        ]
        return GenerationOutput(
            completions=completions,
            prefill_seconds=result.prefill_seconds,
            decode_seconds=result.decode_seconds,
            decode_steps=result.decode_steps,
            decode_tokens_per_s=result.decode_tokens_per_s,
            flops=result.flops,
            decode_flops=result.decode_flops,
            policy=policy.to_config() if policy is not None else {},
            compile_seconds=result.compile_seconds,
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
        # Types here; ranges by check_windows below, the rule evaluate_perplexity applies.
        context = _integer("context", context)
        stride = _integer("stride", stride)
        batch_size = _integer("batch_size", batch_size)
        max_windows = None if max_windows is None else _integer("max_windows", max_windows)
        progress = _flag("progress", progress)
        if isinstance(text, str):
            if not text:
                raise InvalidArgument("text is empty: there is nothing to score")
            ids = encode_stream(self._loaded.text_tokenizer(), text)
            self._ids(ids, "text")
            source = EvalText(
                name="text",
                text=text,
                n_bytes=len(text.encode("utf-8")),
                n_words=len(re.split(r"\s+", text)),  # lm-evaluation-harness's count
                n_documents=1,
            )
        else:
            ids, source = self._ids(text, "text"), None
        try:
            check_windows(
                self.config.max_position_embeddings,
                len(ids),
                context,
                stride,
                batch_size,
                max_windows,
            )
        except QuicksilverError as err:
            raise InvalidArgument(str(err)) from None
        with self._policy_for_call(policy):
            return evaluate_perplexity(
                self.engine,
                ids,
                context=context,
                stride=stride,
                text=source,
                batch_size=batch_size,
                progress=progress,
                max_windows=max_windows,
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
        batch_size = _count("batch_size", batch_size)
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise InvalidArgument("pairs must be a list of (context, continuation) pairs")
        requests = [self._scoring_request(i, pair) for i, pair in enumerate(pairs)]
        # Longest first, so each forward pads little and a too-large batch fails at once.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        results: list[LogLikelihood | None] = [None] * len(requests)
        with self._policy_for_call(policy):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                for i, result in zip(chunk, self._score([requests[i] for i in chunk]), strict=True):
                    results[i] = result
        return [r for r in results if r is not None]

    def _scoring_request(self, index: int, pair: Any) -> tuple[list[int], int]:
        """(token ids of context + continuation, continuation length) for one pair."""
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(s, str) for s in pair)
        ):
            raise InvalidArgument(
                f"pair {index} must be a (context, continuation) pair of strings, got {pair!r}"
            )
        context, continuation = pair
        if not continuation:
            raise InvalidArgument(f"pair {index}: the continuation is empty; nothing to score")
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        tokenizer = self._loaded.text_tokenizer()
        whole = self._ids(encode_prompt(tokenizer, context + continuation), "the text")
        context_ids = encode_prompt(tokenizer, context)
        continuation_ids = whole[len(context_ids) :]
        if not context_ids:
            context_ids = [self._prefix_token()]
        if not continuation_ids:
            raise InvalidArgument(f"pair {index}: the continuation encodes to no tokens")
        positions = self.config.max_position_embeddings
        if len(continuation_ids) > positions:
            raise InvalidArgument(
                f"pair {index}: the continuation has {len(continuation_ids)} tokens, more "
                f"than the model's {positions} positions"
            )
        # The model sees all but the last token: keep at most positions + 1.
        return (context_ids + continuation_ids)[-(positions + 1) :], len(continuation_ids)

    def _prefix_token(self) -> int:
        """What stands for an empty context: BOS, else EOS (lm-evaluation-harness's choice)."""
        candidates = [
            getattr(self.tokenizer, "bos_token_id", None),
            self.config.bos_token_id,
            getattr(self.tokenizer, "eos_token_id", None),
            *self.config.eos_token_ids,
        ]
        token = next((t for t in candidates if t is not None), None)
        if token is None:
            raise InvalidArgument(
                "the context is empty and the model has no BOS or EOS token to stand for it"
            )
        return int(token)

    @torch.inference_mode()
    def _score(self, rows: list[tuple[list[int], int]]) -> list[LogLikelihood]:
        """Score rows of one batch in one forward.

        Rows are right-padded: attention is causal, so a real token never sees the padding
        after it. The LM head runs only on the columns that predict some row's continuation.
        """
        inputs = [ids[:-1] for ids, _ in rows]
        width = max(map(len, inputs))
        pad = self.config.eos_token_ids[0] if self.config.eos_token_ids else 0
        block = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, ids in enumerate(inputs):
            block[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        # Column c predicts token c + 1: row r's continuation is predicted by its last n.
        first = min(len(ids) - n for ids, (_, n) in zip(inputs, rows, strict=True))
        cache = self.engine.new_cache(len(rows), width)
        logits = self.engine.forward(block, cache, logits_at=torch.arange(first, width))
        results = []
        for r, (ids, n) in enumerate(rows):
            end = len(inputs[r]) - first
            row = logits[r, end - n : end]
            check_finite_logits(row)
            targets = torch.tensor(ids[-n:], dtype=torch.long)
            logprobs = torch.log_softmax(row.float(), dim=-1)
            results.append(
                LogLikelihood(
                    logprob=float(logprobs.gather(1, targets[:, None]).double().sum()),
                    is_greedy=bool((row.argmax(dim=-1) == targets).all()),
                    tokens=n,
                )
            )
        return results

    # ------------------------------------------------------------ argument checks

    def _prompts(self, prompts: Any, chat: bool) -> list[list[int]]:
        """Token ids of each prompt: one text, one id list, or a list of either."""
        if isinstance(prompts, str):
            items = [prompts]
        elif isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
            nested = any(isinstance(p, (str, Sequence)) for p in prompts)
            items = list(prompts) if nested or not prompts else [prompts]
        else:
            raise InvalidArgument(
                "prompts must be a text, a list of token ids, or a list of either, got "
                f"{type(prompts).__name__}"
            )
        if not items:
            raise InvalidArgument("no prompts given")
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
        """``ids`` as a list of ints that index the model's vocabulary."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgument(f"{what} must be a list of token ids, got {type(ids).__name__}")
        if not ids and not allow_empty:
            raise InvalidArgument(f"{what} has no tokens")
        vocab = self.config.vocab_size
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise InvalidArgument(
                    f"{what} must hold integer token ids, got {token!r} ({type(token).__name__})"
                )
            if not 0 <= token < vocab:
                raise InvalidArgument(
                    f"{what} holds token id {token}, outside the model's vocabulary 0..{vocab - 1}"
                )
        return [int(token) for token in ids]


def _integer(name: str, value: Any) -> int:
    """``value`` as an int; a bool, a float or text is a mistake, not a count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _count(name: str, value: Any) -> int:
    value = _integer(name, value)
    if value < 1:
        raise InvalidArgument(f"{name} must be at least 1, got {value}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, got {value!r}")
    return value


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument(f"stop must be a string or a list of strings, got {stop!r}")
    if not all(stops):
        raise InvalidArgument("stop strings must not be empty")
    return tuple(stops)
