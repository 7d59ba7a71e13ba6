"""Loading a model into an ``LLM``, with its options checked before anything is read."""

from __future__ import annotations

import os
from typing import Any

import torch

from quicksilver.adapt.files import Adapter, read_adapter
from quicksilver.api.arguments import flag, integer
from quicksilver.api.llm import LLM
from quicksilver.api.options import speculative_option
from quicksilver.errors import InvalidArgument, QuicksilverError
from quicksilver.models import loading
from quicksilver.models.formats import WeightFormat


def load(
    model: str | os.PathLike[str] = loading.DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "bfloat16",
    weights: str | None = None,
    head_weights: str | None = None,
    group_size: int | None = None,
    compile: bool = False,
    device: str | torch.device = "cpu",
    speculative: Any = None,
    adapter: str | os.PathLike[str] | None = None,
) -> LLM:
    """Load a model and its tokenizer: a short name (``smollm2-135m``), a ``.gguf`` file, a
    Hugging Face model directory or a hub id.

    ``dtype`` is the activations' (and embeddings', norms', KV cache's) precision
    (``bfloat16``, ``float32``, or what ``models.loading.DTYPES`` lists). ``weights`` is the
    linear layers' storage format: None (the same as ``dtype``), ``int8`` (per channel) or
    ``int4`` (groups of ``group_size`` = 32 (default), 64 or 128; GGUF Q4_0 / Q4_1 layers load
    as they are with groups of 32). ``head_weights`` overrides the LM head's format (default:
    the blocks', except int8 for an int4 model: a 4-bit head broke greedy output). Only one
    copy of the weights is kept, in the chosen format.

    ``compile=True`` runs each dense decode step of a single row (where it pays: batched
    steps stay eager, which is faster there) as one compiled graph (``runtime.compiled``):
    the first such step compiles (tens of seconds for
    SmolLM2-135M, much less once inductor's on-disk cache has it), reported as
    ``compile_seconds``, never as decode time.

    ``speculative`` is the default for every ``generate`` / ``stream`` call (None: off), e.g.
    ``"ngram"`` or ``{"method": "ngram", "num_tokens": 6}``: drafted tokens verified by the
    full model, the plain decoder's exact tokens in fewer forwards.

    ``adapter`` is a file ``quicksilver adapt`` wrote for this very model (another model is
    refused): LoRA adapters are merged into the weights as they load, before any int8 / int4
    quantisation, so decoding costs what the frozen model costs; exit heads feed the
    logit-lens signals of halting and Matryoshka (their cost counted with the signal's).

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
    default = speculative_option(speculative)
    found = None if adapter is None else adapter_for(model, adapter)
    merge = None if found is None else found.weight_merge()
    loaded = loading.load(os.fspath(model), torch_dtype, weights=fmt, merge=merge)
    if found is not None:
        loaded.model.exit_heads = found.exit_heads()  # None for a LoRA adapter
    llm = LLM(loaded, compile=flag("compile", compile))
    llm.speculative = default or None  # False: off, as None
    llm.adapter = None if adapter is None else os.fspath(adapter)
    return llm


def adapter_for(model: str | os.PathLike[str], path: Any) -> Adapter:
    """The adapter file at ``path``, checked against the model it is to be applied to."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"adapter must be a file path, got {type(path).__name__}")
    found = read_adapter(path)
    found.check_base(loading.resolve(os.fspath(model)), path)
    return found


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

    blocks, head = name(weights, "weights") or own, name(head_weights, "head_weights")
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    elif "int4" not in (blocks, head):  # it would change nothing: refused, not ignored
        raise InvalidArgument(
            f"group_size {group_size!r} applies to int4 weights only; pass weights='int4' (or "
            "head_weights='int4'), or leave group_size out"
        )
    return WeightFormat(blocks=blocks, head=head, group_size=integer("group_size", group_size))


# int4 groups when none is asked for (a GGUF file's Q4 blocks are groups of 32 too).
DEFAULT_GROUP_SIZE = 32
