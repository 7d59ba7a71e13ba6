"""The registry of mechanisms and their composition into one policy, with its file form.

A policy configuration is a plain mapping ``{mechanism name: {parameter: value}}``, e.g.
``{"halting": {"relative_drift": 0.05, "min_layer": 20}, "kv_skip": {"treatment": "skip"}}``;
``{}`` is the dense model. It is stored with every result (``Policy.to_config``).
Mechanisms always run in registry order (halting, kv_skip, fusion, matryoshka, skipdecode),
whatever the order in the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quicksilver.models.config import ModelConfig
from quicksilver.models.transformer import Transformer
from quicksilver.policies.base import Mechanism, PolicyConfigError
from quicksilver.policies.fusion import TokenFusion
from quicksilver.policies.halting import TokenHalting
from quicksilver.policies.kv_skip import KVSkip
from quicksilver.policies.matryoshka import Matryoshka
from quicksilver.policies.skipdecode import SkipDecode

REGISTRY: dict[str, type[Mechanism]] = {
    cls.name: cls for cls in (TokenHalting, KVSkip, TokenFusion, Matryoshka, SkipDecode)
}

# The paper's reported defaults, taken literally: absolute drift 0.045 and logit-lens entropy
# 1.15 bits (both must hold), halted tokens' K/V multiplied by zero.
PRESETS: dict[str, dict[str, Any]] = {
    "dense": {},
    "paper": {
        "halting": {"drift": 0.045, "entropy_bits": 1.15, "min_layer": 1},
        "kv_skip": {"treatment": "zero"},
    },
}


@dataclass
class Policy:
    """A set of mechanisms applied together (``{}``: the dense model). The runner asks it
    what its mechanisms declared; it never asks for a mechanism by name."""

    policies: list[Mechanism] = field(default_factory=list)  # in registry order

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Policy:
        config = config or {}
        if not isinstance(config, dict):
            raise PolicyConfigError(
                "a policy configuration is a mapping {mechanism: {parameter: value}}, "
                f"got {type(config).__name__}"
            )
        for name in config:
            if name not in REGISTRY:
                raise PolicyConfigError(
                    f"unknown policy {name!r}; known: {', '.join(REGISTRY)} "
                    "(see `quicksilver policies`)"
                )
        policies = [
            REGISTRY[name].from_dict(config[name] or {}) for name in REGISTRY if name in config
        ]
        return cls(policies)

    def to_config(self) -> dict[str, Any]:
        return {p.name: p.to_dict() for p in self.policies}

    def get(self, name: str) -> Mechanism | None:
        return next((p for p in self.policies if p.name == name), None)

    @property
    def is_off(self) -> bool:
        return all(p.is_off for p in self.policies)

    @property
    def active(self) -> list[Mechanism]:
        return [p for p in self.policies if not p.is_off]

    @property
    def kv_treatment(self) -> str:
        """What halted tokens leave in the cache: the first mechanism that says, else their
        K/V are propagated from the frozen state (the quality-preserving choice)."""
        said = (p.kv_treatment for p in self.policies if p.kv_treatment is not None)
        return next(said, "propagate")

    @property
    def size_weighted(self) -> bool:
        return any(p.attention_bias for p in self.active)

    @property
    def narrowing(self) -> Mechanism | None:
        """The mechanism that gives tokens narrower weights, if any (at most one may)."""
        return next((p for p in self.active if p.narrows_weights), None)

    @property
    def knob_savings(self) -> frozenset[str]:
        """What scaling this policy's set knobs can save (see ``Mechanism.savings``)."""
        return frozenset().union(*(p.savings for p in self.policies if p.has_knob_set))

    def deciders(self, layer: int) -> list[Mechanism]:
        """The mechanisms that may act after ``layer`` (in registry order)."""
        return [p for p in self.policies if not p.is_off and p.decides_after(layer)]

    def check_model(self, config: ModelConfig) -> None:
        for policy in self.policies:
            if not policy.is_off:  # an off mechanism's layer settings are never used
                policy.check_model(config)

    def prepare(self, model: Transformer) -> None:
        for policy in self.policies:
            if not policy.is_off:
                policy.prepare(model)

    def release(self, model: Transformer, keep: Policy | None = None) -> None:
        """Undo what ``prepare`` attached, except what ``keep`` (the next policy) shares."""
        kept = {(p.name, p.prepare_key()) for p in (keep.policies if keep else []) if not p.is_off}
        for policy in self.policies:
            if not policy.is_off and (policy.name, policy.prepare_key()) not in kept:
                policy.release(model)

    def layer_plan(self, steps: torch.Tensor, n_layers: int) -> torch.Tensor | None:
        """The layers each token runs: the AND of every policy's plan (None: all)."""
        plan = None
        for policy in self.policies:
            if policy.is_off:
                continue
            part = policy.layer_plan(steps, n_layers)
            if part is not None:
                plan = part if plan is None else plan & part
        return plan

    def replacing(self, mechanism: Mechanism) -> Policy:
        """This policy with ``mechanism`` in place of any of its kind (e.g. a SkipDecode
        schedule derived from a target speedup), kept in registry order."""
        order = list(REGISTRY)
        kept = [p for p in self.policies if type(p) is not type(mechanism)]
        return Policy(sorted([*kept, mechanism], key=lambda p: order.index(p.name)))

    def scaled(self, factor: float) -> Policy:
        """The same policy with every calibration knob multiplied by ``factor``."""
        return Policy([p.scaled(factor) for p in self.policies])

    def describe(self) -> str:
        if self.is_off:
            return "dense"
        parts = []
        for policy in self.policies:
            defaults = type(policy)()
            changed = [
                f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                for key, value in policy.to_dict().items()
                if value != getattr(defaults, key) or key in policy.choices
            ]
            parts.append(f"{policy.name}({', '.join(changed)})")
        return " + ".join(parts)
