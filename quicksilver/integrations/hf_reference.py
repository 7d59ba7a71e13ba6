"""Hugging Face transformers as the reference implementation.

`eval --compare transformers` checks our perplexity against transformers' own forward on the
same tokens, and `bench --compare transformers` times its ``generate`` next to our engine.
Both need the same checkpoint loaded by transformers itself, in the same dtype, without its
warnings and progress bars interleaving with our output.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from quicksilver.errors import QuicksilverError

# transformers' perplexity on our window plan lives with the window plan it follows; it is
# re-exported here so that everything transformers-as-reference is importable from one place.
from quicksilver.eval.perplexity import transformers_perplexity
from quicksilver.models.loading import ModelSource

__all__ = ["load_transformers_model", "quiet_transformers", "transformers_perplexity"]

# Longest piece of a transformers exception message kept in ours: its messages can quote
# whole configs.
MAX_DETAIL_CHARS = 300


@contextlib.contextmanager
def quiet_transformers(capture_stderr: bool = False) -> Iterator[None]:
    """Silence transformers' warnings and progress bars (they would interleave with ours).

    ``capture_stderr`` also swallows what bypasses transformers' logging, such as the bare
    tqdm bar of its GGUF loader.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if capture_stderr:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        else:
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_transformers_model(source: ModelSource, dtype: torch.dtype) -> Any:
    """transformers' own model for the same checkpoint and dtype, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise QuicksilverError(
            f"transformers is not importable ({err}); run `pip install transformers`"
        ) from err
    try:
        with quiet_transformers(capture_stderr=True):
            if source.kind == "gguf":
                path = Path(source.path)
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=dtype
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    except Exception as err:  # transformers raises many types; all mean "cannot compare"
        message = " ".join(str(err).split())[:MAX_DETAIL_CHARS]
        hint = "; run `pip install accelerate`" if "accelerate" in message.lower() else ""
        raise QuicksilverError(
            f"transformers cannot load {source.name!r} ({type(err).__name__}: {message}){hint}"
        ) from err
    return model.eval()
