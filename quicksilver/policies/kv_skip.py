"""KV Cache Skipping (QuickSilver): what a halted token leaves in the layers it skips.

- ``propagate`` (the default, also when this mechanism is absent): K/V computed from the
  frozen state (CALM-style state propagation); only the K/V projections run, later tokens
  still see the token. The quality-preserving option.
- ``skip``: no K/V written; later tokens do not attend to the token in those layers (the
  attention pairs are not computed either).
- ``zero``: the paper's literal multiply-by-zero: K = V = 0 is written, so the entry still
  takes softmax mass (score 0, not -inf) but contributes nothing to the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from quicksilver.policies.base import Mechanism, PolicyConfigError

TREATMENTS = ("propagate", "skip", "zero")


@dataclass
class KVSkip(Mechanism):
    name = "kv_skip"
    summary = "what halted tokens write to the KV cache: propagate | skip | zero"
    choices = {"treatment": TREATMENTS}

    treatment: str = "propagate"

    def validate(self) -> None:
        if self.treatment not in TREATMENTS:
            raise PolicyConfigError(
                f"kv_skip.treatment must be one of {', '.join(TREATMENTS)}, got {self.treatment!r}"
            )

    @property
    def is_off(self) -> bool:
        # It only says what happens to halted tokens; alone it changes nothing.
        return True

    @property
    def kv_treatment(self) -> str:
        return self.treatment
