"""The mechanism protocol: what a mechanism sees after each layer, what it may decide, and
what it declares about itself.

A mechanism is a small dataclass (its fields are its parameters) with one method to
implement, ``after_layer``: given the states of the tokens that just ran a layer, it returns a
``Decision`` — tokens to halt, tokens to merge, weight widths to use from now on. The runner
applies the decisions and owns everything else (gathering the active tokens, the KV cache,
the FLOP counter), so a mechanism never touches tensors it does not own.

Everything else the runner or calibration needs to know is declared on the mechanism's own
class, never looked up by name: ``kv_treatment`` (what halted tokens leave in the cache),
``attention_bias`` (cache entries weighted by the tokens they stand for), ``narrows_weights``
with ``layer_weight_bytes`` (a per-token weight width), ``layer_plan`` (layers decided before
the first one), ``knobs`` and ``savings`` (what calibration may scale, and what that buys).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from quicksilver.accounting import exit_head_flops, lens_check_flops
from quicksilver.errors import QuicksilverError
from quicksilver.models.config import ModelConfig
from quicksilver.models.transformer import Transformer

# Logit-lens rows at once: bounds the temporary logits to ENTROPY_CHUNK * vocab floats.
ENTROPY_CHUNK = 256


class PolicyConfigError(QuicksilverError):
    """A policy configuration that cannot run (unknown key, bad value, layer out of range)."""


@dataclass
class TokenState:
    """Per-token bookkeeping of one adaptive forward over a flattened [B * S] block.

    A token is *active* while it runs layers. It stops being active when it is halted
    (its state is frozen and goes to the head as is), merged into a token on its right
    (fusion), or when it is padding (never ran).
    """

    batch: int
    seq: int
    active: torch.Tensor  # bool [B*S]
    halted: torch.Tensor  # bool [B*S]
    merged: torch.Tensor  # bool [B*S]
    size: torch.Tensor  # float32 [B*S]: tokens represented (fusion)
    bits: torch.Tensor  # int64 [B*S]: weight width, 0 = the model's precision
    streak: torch.Tensor  # int64 [B*S]: consecutive passed halting checks

    @classmethod
    def start(cls, real: torch.Tensor) -> TokenState:
        """``real`` [B, S] marks the tokens that exist (False: left padding)."""
        flat = real.reshape(-1).clone()
        n = flat.numel()
        return cls(
            batch=real.shape[0],
            seq=real.shape[1],
            active=flat,
            halted=torch.zeros(n, dtype=torch.bool),
            merged=torch.zeros(n, dtype=torch.bool),
            size=torch.ones(n),
            bits=torch.zeros(n, dtype=torch.long),
            streak=torch.zeros(n, dtype=torch.long),
        )


@dataclass
class LayerView:
    """What a policy sees after layer ``layer``: the tokens that ran it (flat indices into
    the [B*S] block, in row-major order) and their states before and after the layer."""

    layer: int
    model: Transformer
    state: TokenState
    index: torch.Tensor  # [N] int64
    before: torch.Tensor  # [N, d]
    after: torch.Tensor  # [N, d]
    check_flops: int = 0  # cost of the signals computed so far (the engine counts it)
    _entropies: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # by vocab rows

    @property
    def rows(self) -> torch.Tensor:
        return torch.div(self.index, self.state.seq, rounding_mode="floor")

    def lens_entropy(self, vocab: int | None = None) -> torch.Tensor:
        """Entropy in bits of the logit-lens distribution softmax(head(final_norm(h))) of
        every token here, over the whole vocabulary or only its first ``vocab`` ids; h goes
        through the layer's exit head first when the model has fitted ones (a tuned lens).

        The shortlist is our cheap variant: BPE vocabularies are numbered in merge order, so
        the first ids are the most frequent pieces, and a head product over K of them costs
        K / V of the full one. Computed once per layer and number of rows even if several
        policies ask (a shortlist as long as the vocabulary is the full check); its cost, the
        head product for every token here, is counted.
        """
        model = self.model
        rows = model.config.vocab_size if vocab is None else min(vocab, model.config.vocab_size)
        if rows not in self._entropies:
            parts = []
            for chunk in self.after.split(ENTROPY_CHUNK):
                state = model.lens_state(chunk, self.layer)
                logits = model.lm_head.partial(model.final_hidden(state), 0, rows)
                logp = torch.log_softmax(logits.float(), dim=-1)
                parts.append(-(logp.exp() * logp).sum(-1) / math.log(2))
            self._entropies[rows] = torch.cat(parts) if parts else self.after.new_zeros(0)
            self.check_flops += lens_check_flops(model.config, len(self.after), rows)
            if model.exit_heads is not None:
                self.check_flops += exit_head_flops(model.config, len(self.after))
        return self._entropies[rows]

    def count(self, flops: int) -> None:
        """Add the cost of a signal a policy computed itself."""
        self.check_flops += int(flops)


@dataclass
class Decision:
    """A policy's verdict on the tokens of a ``LayerView`` (positions 0..N-1 of the view)."""

    halt: torch.Tensor | None = None  # bool [N]: stop running layers after this one
    merge_from: torch.Tensor | None = None  # [M] view positions that stop and fold into ...
    merge_into: torch.Tensor | None = None  # [M] ... these (to their right; -1: nowhere)
    bits: torch.Tensor | None = None  # int64 [N]: weight width for later layers (0 = keep)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass
class Mechanism:
    """Base of every mechanism. Subclasses set ``name`` and implement ``after_layer``; their
    dataclass fields are their parameters (plain numbers, strings or None)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}  # allowed values of fixed-choice fields
    # Thresholds a calibration scales together; larger values must always mean more savings.
    knobs: ClassVar[tuple[str, ...]] = ()
    # What turning the knobs up saves: "prompt_flops" (teacher-forced / prefill work),
    # "decode_flops" (generated tokens' work), "weight_bytes" (bytes read, not FLOPs).
    savings: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that make no sense for any model (raise PolicyConfigError)."""

    def check_model(self, config: ModelConfig) -> None:
        """Reject values that do not fit this model (e.g. a layer beyond its depth)."""

    def prepare(self, model: Transformer) -> None:
        """One-time work on the model (e.g. quantising weights) before the first forward."""

    def prepare_key(self) -> tuple | None:
        """What ``prepare`` depends on: two settings with the same key share the preparation."""
        return None

    def release(self, model: Transformer) -> None:
        """Undo ``prepare`` (free what it attached) when the engine stops using the policy."""

    def begin(self, state: TokenState) -> None:
        """Called at the start of each forward, before layer 0."""

    def decides_after(self, layer: int) -> bool:
        """Whether ``after_layer`` may act after ``layer``. The engine builds no view and
        calls nothing at the other layers, which keeps decoding's per-layer overhead low."""
        return type(self).after_layer is not Mechanism.after_layer

    def after_layer(self, view: LayerView) -> Decision | None:
        """Decide about the tokens that ran layer ``view.layer`` (None: nothing to do)."""
        return None

    def layer_plan(self, steps: torch.Tensor, n_layers: int) -> torch.Tensor | None:
        """Which layers each token of a block runs, decided before the first layer ([N, L]
        bool; None: all). ``steps`` is each token's generation step (0 = the first generated
        token; negative for prompt positions or when there is no prompt boundary)."""
        return None

    @property
    def is_off(self) -> bool:
        """True when this setting cannot change anything (the dense model exactly)."""
        return False

    @property
    def kv_treatment(self) -> str | None:
        """What halted tokens leave in the K/V of the layers they skip ("propagate", "skip",
        "zero"), if this mechanism decides it; None: it has no say."""
        return None

    @property
    def attention_bias(self) -> bool:
        """True when cache entries get + log(tokens they stand for) in attention scores."""
        return False

    @property
    def narrows_weights(self) -> bool:
        """True when ``Decision.bits`` (or ``begin``) can give tokens a narrower weight width,
        which ``prepare`` must have made runnable."""
        return False

    def layer_weight_bytes(self, config: ModelConfig, bits: int) -> int:
        """Bytes of one layer's weights read at width ``bits`` (for a mechanism that
        ``narrows_weights``)."""
        raise NotImplementedError(f"{self.name} does not narrow weights")

    def scaled(self, factor: float) -> Mechanism:
        """The same mechanism with every calibration knob multiplied by ``factor``."""
        changes = {
            key: getattr(self, key) * factor for key in self.knobs if getattr(self, key) is not None
        }
        return dataclasses.replace(self, **changes)

    @property
    def has_knob_set(self) -> bool:
        """True when at least one calibration knob has a value to scale."""
        return any(getattr(self, key) is not None for key in self.knobs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def parameters(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of each parameter, for ``quicksilver policies``."""
        hints = _field_types(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind = _type_name(hints[f.name])
            if f.name in cls.choices:
                kind = " | ".join(str(c) for c in cls.choices[f.name])
            out.append((f.name, kind, f.default))
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Mechanism:
        if not isinstance(values, dict):
            raise PolicyConfigError(
                f"policy {cls.name!r} needs a mapping of parameters, got {values!r}"
            )
        hints = _field_types(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        values = {k: _number_from_text(v, hints.get(k)) for k, v in values.items()}
        for key, value in values.items():
            if key not in known:
                raise PolicyConfigError(
                    f"unknown parameter {key!r} for policy {cls.name!r}; known: {', '.join(known)}"
                )
            if not _type_ok(value, hints[key]):
                raise PolicyConfigError(
                    f"{cls.name}.{key} must be {_type_name(hints[key])}, got {value!r}"
                )
        converted = {
            k: float(v) if _wants_float(hints[k]) and isinstance(v, int) else v
            for k, v in values.items()
        }
        return cls(**converted)


def _number_from_text(value: Any, hint: Any) -> Any:
    """YAML reads '1e-2' as text; accept it where a number is expected."""
    if isinstance(value, str) and hint is not None and _wants_float(hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_args(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _wants_float(hint: Any) -> bool:
    return float in _type_args(hint)


# Integers past float precision are never a meaningful setting, and past int64 they would
# overflow inside torch.
MAX_INT = 2**53


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return False
    for option in _type_args(hint):
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if option is str and isinstance(value, str):
            return True
    return False


def _type_name(hint: Any) -> str:
    names = {type(None): "null", bool: "bool", int: "int", float: "number", str: "text"}
    return " | ".join(names.get(option, str(option)) for option in _type_args(hint))


def check_threshold(owner: str, name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise PolicyConfigError(f"{owner}.{name} must be a finite number >= 0, got {value}")


def check_layer(owner: str, name: str, value: int, config: ModelConfig) -> None:
    if not 0 <= value < config.n_layers - 1:
        raise PolicyConfigError(
            f"{owner}.{name} = {value} is outside this model's layers: it has "
            f"{config.n_layers} layers, so use 0..{config.n_layers - 2} "
            "(a decision after the last layer changes nothing)"
        )
