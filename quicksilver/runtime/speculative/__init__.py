"""Verified decoding: drafters guess the next tokens, the full model keeps what it agrees with.

``settings`` (what a row asks for), ``ngram`` and ``self_draft`` (the drafters),
``cost_plan`` (what drafting costs and earns here, measured in pieces), ``plans`` (measured
plans by policy, shared by every batch of a model), ``chooser`` (each step's drafts) and
``acceptance`` (which drafted tokens are kept). Built on the engine; the step batch uses it.
"""

from quicksilver.runtime.speculative.acceptance import accept_drafts
from quicksilver.runtime.speculative.cost_plan import (
    PLAN_VERSION,
    DraftPlan,
    PlanMeasurement,
    calibrate,
    expected_speedup,
)
from quicksilver.runtime.speculative.ngram import ngram_draft
from quicksilver.runtime.speculative.plans import DraftPlans, PlanStore
from quicksilver.runtime.speculative.settings import (
    FUSION_NOT_VERIFIABLE,
    MAX_DRAFT_TOKENS,
    METHODS,
    MODEL_METHODS,
    SpeculativeConfig,
    speculative_config,
    speculative_policy_error,
    splits_change_output,
)

__all__ = [
    "FUSION_NOT_VERIFIABLE",
    "MAX_DRAFT_TOKENS",
    "METHODS",
    "MODEL_METHODS",
    "PLAN_VERSION",
    "DraftPlan",
    "DraftPlans",
    "PlanMeasurement",
    "PlanStore",
    "SpeculativeConfig",
    "accept_drafts",
    "calibrate",
    "expected_speedup",
    "ngram_draft",
    "speculative_config",
    "speculative_policy_error",
    "splits_change_output",
]
