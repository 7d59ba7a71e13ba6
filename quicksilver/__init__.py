"""quicksilver: frozen pretrained LLMs with adaptive per-token computation, and an honest
account of what it saves.

    import quicksilver as qs

    llm = qs.load()  # smollm2-135m; or a .gguf file, a Hugging Face directory or hub id
    print(llm.generate("The capital of France is", max_new_tokens=8).text)

Everything here is ``quicksilver.api``'s (see there); the command line is ``quicksilver.cli``,
which this package never imports.
"""

from importlib.metadata import PackageNotFoundError, version

from quicksilver.api import (
    LLM,
    Batch,
    BatchEvent,
    Completion,
    GenerationOptions,
    GenerationOutput,
    InvalidArgument,
    LogLikelihood,
    Stream,
    load,
)
from quicksilver.errors import QuicksilverError
from quicksilver.eval.perplexity import PerplexityResult
from quicksilver.models.loading import DEFAULT_MODEL
from quicksilver.policies import Policy, load_policy
from quicksilver.runtime.sampling import SamplingConfig
from quicksilver.runtime.speculative.settings import METHODS as SPECULATIVE_METHODS
from quicksilver.runtime.speculative.settings import SpeculativeConfig, speculative_config

try:
    __version__ = version("quicksilver-llm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_MODEL",
    "LLM",
    "Batch",
    "BatchEvent",
    "Completion",
    "GenerationOptions",
    "GenerationOutput",
    "InvalidArgument",
    "LogLikelihood",
    "PerplexityResult",
    "Policy",
    "QuicksilverError",
    "SamplingConfig",
    "SPECULATIVE_METHODS",
    "SpeculativeConfig",
    "Stream",
    "__version__",
    "load",
    "load_policy",
    "speculative_config",
]
