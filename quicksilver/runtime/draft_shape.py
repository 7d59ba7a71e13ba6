"""The shape of a cheaper forward of the same model, which ``Engine.forward`` runs as told.

It lives below the engine so the runner can take one without knowing who drafts with it
(``speculative.self_draft`` builds them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftShape:
    """A cheaper forward of the same model: the layers that run (None: all) and the weight
    width of their matmuls (None: the model's own; 4: the Matryoshka hi plane).
    ``layer_bytes``: what one run layer reads, for the counter (None: the stored format).
    ``exit_layer``: the head reads the last state through this layer's exit head (a model
    with fitted ones, ``quicksilver.adapt.exits``: an early exit); None: as it is."""

    layers: frozenset[int] | None = None
    bits: int | None = None
    layer_bytes: int | None = None
    exit_layer: int | None = None

    def runs(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers
