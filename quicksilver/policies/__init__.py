"""Mechanisms that give each token only the computation it needs, one per file."""

from quicksilver.policies.base import Decision, LayerView, Mechanism, PolicyConfigError, TokenState
from quicksilver.policies.files import load_policy
from quicksilver.policies.stack import PRESETS, REGISTRY, Policy

__all__ = [
    "PRESETS",
    "REGISTRY",
    "Decision",
    "LayerView",
    "Mechanism",
    "PolicyConfigError",
    "Policy",
    "TokenState",
    "load_policy",
]
