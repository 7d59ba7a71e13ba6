"""The API's result records: each a frozen dataclass whose ``to_dict()`` is strict JSON."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from quicksilver.errors import QuicksilverError
from quicksilver.outputs import jsonable
from quicksilver.runtime.rows import StepStats
from quicksilver.runtime.speculative.settings import SpeculativeConfig


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
    decode_steps: int  # forwards over the running rows after the prompts' one
    decode_tokens_per_s: float  # tokens those forwards produced / decode seconds
    flops: dict[str, int]  # counted over every forward; "dense" is the dense model's cost
    decode_flops: dict[str, int]  # the decode forwards only
    policy: dict[str, Any]  # the policy's configuration ({} is dense)
    compile_seconds: float = 0.0  # compiling decode steps (compile=True), not in decode_seconds
    fed_tokens: int = 0  # token positions through the model (left padding, drafts included)
    speculative: dict[str, Any] | None = None  # drafts and acceptance (verified decoding)

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
        """Counted FLOPs per token position that went through the model: the prompts'
        left-padded block, then each running row's fed tokens per decode step (drafts that
        were rolled back included, because that work ran)."""
        return self.flops.get("total", 0) / max(1, self.fed_tokens)

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


@dataclass
class BatchEvent:
    """What one step of a ``Batch`` produced for one request."""

    request: int  # the id ``Batch.submit`` returned
    text: str  # text that became final in this step ("" when none did)
    token_ids: list[int]  # tokens produced in this step
    logprobs: list[float] | None = None  # each token's log-prob, when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None  # alternatives, when asked
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once finished
    completion: Completion | None = None  # the whole result, once finished
    flops: float = 0.0  # once finished: the request's share of the counted FLOPs
    dense_flops: float = 0.0  # and of what the dense model would have spent
    first_token_seconds: float | None = field(default=None, repr=False)


class Stream(Iterator[str]):
    """The text of one generation, piece by piece as it is produced.

    Iterate it to the end, then ``output`` holds the ``GenerationOutput`` (the pieces joined
    are its text). Leaving early (``close()``, or a ``with`` block) stops the generation and
    frees its rows.
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


def speculative_record(config: SpeculativeConfig | None, stats: StepStats) -> dict[str, Any] | None:
    """What verified decoding did in one generation (None when it was off): drafts, drafted and
    accepted tokens, ``mean_accepted_length`` (vLLM's definition: 1 + accepted / drafts),
    acceptance per draft position and per method, the FLOPs of draft forwards and of the
    verify forwards, the seconds draft forwards took (inside decode time) and the seconds
    spent measuring the drafting plan (outside it; 0 when it came from the cache), and
    ``plan_notes``: a measurement begun or finished during this generation."""
    if config is None:
        return None
    return {
        **config.to_dict(),
        "drafts": stats.drafts,
        "draft_tokens": stats.draft_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "mean_accepted_length": 1 + stats.accepted_tokens / max(1, stats.drafts),
        "accepted_per_position": list(stats.accepted_at),
        "by_method": {
            method: {"drafts": d, "draft_tokens": t, "accepted_tokens": a}
            for method, (d, t, a) in stats.by_method.items()
        },
        "draft_flops": stats.draft_flops,
        "verify_flops": stats.verify_flops,
        "draft_seconds": stats.draft_seconds,
        "calibration_seconds": stats.calibration_seconds,
        "plan_notes": list(stats.plan_notes),
    }
