"""The training forward: the engine's own forward, with autograd, under a given policy.

Training must see exactly what inference will run (the same layer loop, the same gathering
of the tokens a schedule lets through, the same attention), so it calls ``Engine.forward``
inside ``Engine.gradients()`` rather than keeping a second model. Two things differ from
inference, both here:

- the KV cache holds one tensor per layer (``PerLayerKV``). The engine's cache is one
  [L, ...] tensor, and autograd would see each layer's write as a change to the keys an
  earlier layer's attention saved for its backward pass;
- SkipDecode's schedule counts *generated* positions from where the prompt ended. A training
  sequence of S tokens is read as a prompt of its first ``prompt_tokens`` tokens (every
  layer, as prefill runs) followed by S - prompt_tokens positions decoded one by one. The
  schedule is non-increasing, so every layer a position runs was run by all earlier ones:
  the teacher-forced block computes, position by position, the states that step-by-step
  decoding under the same schedule would, and the loss trains the model for the skips it
  will meet at the generation step it will meet them.
"""

from __future__ import annotations

import torch

from quicksilver.runtime.cache import KVCache
from quicksilver.runtime.engine import Engine


class PerLayerKV:
    """Keys or values as one tensor per layer, indexed like the engine's [L, B, H, T, hd]
    tensor with the layer first (``kv[layer, rows, :, slots] = ...``)."""

    def __init__(self, like: torch.Tensor) -> None:
        self.layers = [torch.zeros_like(like[0]) for _ in range(like.shape[0])]
        self.shape = like.shape
        self.device = like.device
        self.dtype = like.dtype

    def __getitem__(self, key: int | tuple) -> torch.Tensor:
        if isinstance(key, tuple):
            return self.layers[key[0]][key[1:]]
        return self.layers[key]

    def __setitem__(self, key: int | tuple, value: torch.Tensor | float) -> None:
        if isinstance(key, tuple):
            self.layers[key[0]][key[1:]] = value
        else:
            self.layers[key][...] = value


def training_cache(engine: Engine, batch: int, length: int) -> KVCache:
    """A fresh cache for one training batch, whose layers autograd can tell apart."""
    cache = engine.new_cache(batch, length)
    cache.k, cache.v = PerLayerKV(cache.k), PerLayerKV(cache.v)
    return cache


def training_logits(
    engine: Engine, tokens: torch.Tensor, prompt_tokens: int | None = None
) -> torch.Tensor:
    """Logits [B, S, V] of every position of ``tokens`` [B, S] under the engine's policy,
    with gradients; positions from ``prompt_tokens`` on count as generated (None: all
    prompt, i.e. every position runs every layer the policy lets it)."""
    with engine.gradients():
        cache = training_cache(engine, tokens.shape[0], tokens.shape[1])
        if prompt_tokens is not None:
            cache.set_prompt_end(prompt_tokens)
        return engine.forward(tokens, cache, logits_at="all")


@torch.inference_mode()
def inference_logits(
    engine: Engine, tokens: torch.Tensor, prompt_tokens: int | None = None
) -> torch.Tensor:
    """The same positions' logits through the ordinary inference path (no gradients)."""
    cache = engine.new_cache(tokens.shape[0], tokens.shape[1])
    if prompt_tokens is not None:
        cache.set_prompt_end(prompt_tokens)
    return engine.forward(tokens, cache, logits_at="all")
