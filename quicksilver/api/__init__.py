"""The Python API: load a model once, then generate, stream, score and evaluate, under any
policy.

    import quicksilver as qs

    llm = qs.load("smollm2-135m")
    print(llm.generate("The capital of France is", max_new_tokens=8).text)
    with llm.use({"matryoshka": {"fixed_bits": 8}}):
        print(llm.perplexity(open("wiki.txt").read(), max_windows=4).ppl)

How to generate is one ``GenerationOptions`` (``llm.generate(prompts, options)``), checked
where it is built; the same keywords (``max_new_tokens=8``) build one for the call.

This is the contract the CLI, the benchmarks and any server or evaluation harness build on:
arguments are checked before any work starts, a mistake raises an ``InvalidArgument`` (a
``QuicksilverError`` and a ``ValueError``) whose message says what to change, and every
result is a record with a ``to_dict()`` that is strict JSON. Tokenisation is ``quicksilver.text``'s
(prompts get special tokens as the tokenizer's configuration says, perplexity streams none).

An ``LLM`` may be shared between threads: every step of work runs under its lock and under
the policy of the call (or the calling thread's ``use``) that asked for it.
"""

from quicksilver.api.arguments import PolicySpec, Prompt
from quicksilver.api.llm import LLM
from quicksilver.api.load import load, weight_format
from quicksilver.api.options import GenerationOptions
from quicksilver.api.records import BatchEvent, Completion, GenerationOutput, LogLikelihood, Stream
from quicksilver.api.session import Batch
from quicksilver.errors import InvalidArgument

__all__ = [
    "LLM",
    "Batch",
    "BatchEvent",
    "Completion",
    "GenerationOptions",
    "GenerationOutput",
    "InvalidArgument",
    "LogLikelihood",
    "PolicySpec",
    "Prompt",
    "Stream",
    "load",
    "weight_format",
]
