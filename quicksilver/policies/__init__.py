"""Mechanisms that give each token only the computation it needs, one per file."""

from quicksilver.policies.base import Decision, LayerView, Policy, PolicyConfigError, TokenState
from quicksilver.policies.stack import PRESETS, REGISTRY, PolicyStack, load_policy

__all__ = [
    "PRESETS",
    "REGISTRY",
    "Decision",
    "LayerView",
    "Policy",
    "PolicyConfigError",
    "PolicyStack",
    "TokenState",
    "load_policy",
]
