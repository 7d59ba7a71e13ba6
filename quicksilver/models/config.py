"""One configuration for every supported family (Llama, GPT-2, OPT).

Family differences are a handful of switches (norm type, activation, position encoding,
biases, pre/post norm) so the transformer code stays one readable implementation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from quicksilver.errors import QuicksilverError

FAMILIES = ("llama", "gpt2", "opt")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "rms"  # "rms" or "layer"
    norm_eps: float = 1e-5
    activation: str = "silu"  # "silu" (gated), "gelu_tanh", "relu"
    gated_mlp: bool = True
    position: str = "rope"  # "rope" or "learned"
    position_offset: int = 0  # OPT's learned positions start at index 2
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # Per-frequency divisors stored in Llama-3 GGUF files (``rope_freqs.weight``) in place of
    # the scaling parameters; when set they replace ``rope_scaling``.
    rope_freq_factors: list[float] | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    pre_norm: bool = True  # OPT-350m normalises after each block instead
    final_norm: bool = True
    word_embed_proj_dim: int | None = None  # OPT: embeddings narrower than the residual stream
    tie_word_embeddings: bool = True
    head_dim_override: int | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        """Reject what no model can be built from, before any memory is allocated for it.

        Configs come from files users hand us; a zero, negative, fractional or boolean size
        would otherwise surface as an obscure torch error, or never (``True`` is an int).
        """
        if self.family not in FAMILIES:
            raise QuicksilverError(
                f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}"
            )
        sizes = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
        }
        optional = {
            "head_dim": self.head_dim_override,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "sliding_window": self.sliding_window,
        }
        sizes.update({k: v for k, v in optional.items() if v is not None})
        bad = {k: v for k, v in sizes.items() if not _positive_int(v)}
        if bad:
            raise QuicksilverError(f"model config sizes must be positive integers, got {bad}")
        if not (_is_int(self.position_offset) and self.position_offset >= 0):
            raise QuicksilverError(
                f"position_offset must be an integer >= 0, got {self.position_offset!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise QuicksilverError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.head_dim < 1:
            raise QuicksilverError(
                f"hidden_size ({self.hidden_size}) is smaller than num_attention_heads "
                f"({self.n_heads}): each head would have no dimensions"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise QuicksilverError(
                f"RoPE needs an even head dimension, got {self.head_dim} "
                f"(hidden_size {self.hidden_size} / {self.n_heads} heads)"
            )
        if not (_finite(self.norm_eps) and self.norm_eps >= 0):
            raise QuicksilverError(
                f"norm epsilon must be a finite number >= 0, got {self.norm_eps!r}"
            )
        if not (_finite(self.rope_theta) and self.rope_theta > 0):
            raise QuicksilverError(
                f"rope_theta must be a finite number > 0, got {self.rope_theta!r}"
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    def parameter_count(self) -> int:
        """How many weights the model built from this config holds (exact, from the same
        shapes as ``Transformer``), in Python integers so absurd sizes cannot overflow.

        An untied LM head is counted separately; a tied one shares the embedding.
        """
        d, e = self.hidden_size, self.embed_dim
        norm = d * (2 if self.norm == "layer" else 1)
        qkv_rows = self.q_dim + 2 * self.kv_dim
        up_rows = self.intermediate_size * (2 if self.gated_mlp else 1)
        block = (
            2 * norm
            + qkv_rows * d
            + (qkv_rows if self.qkv_bias else 0)
            + self.q_dim * d
            + (d if self.out_bias else 0)
            + up_rows * d
            + self.intermediate_size * d
            + (up_rows + d if self.mlp_bias else 0)
        )
        total = self.vocab_size * e + self.n_layers * block
        if self.position == "learned":
            total += (self.max_position_embeddings + self.position_offset) * d
        if self.word_embed_proj_dim:
            total += 2 * e * d  # project_in and project_out
        if self.final_norm:
            total += norm
        if not self.tie_word_embeddings:
            total += self.vocab_size * e
        return total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face ``config.json`` dict onto our switches."""
        model_type = hf.get("model_type")
        if not model_type:
            raise QuicksilverError(
                "config.json has no model_type; supported: llama (also mistral, qwen2-style), "
                "gpt2, opt"
            )
        try:
            return cls._from_hf(hf, model_type)
        except KeyError as err:
            raise QuicksilverError(
                f"config.json for model_type {model_type!r} lacks the required key {err}"
            ) from err
        except (TypeError, ValueError, AttributeError, OverflowError) as err:  # e.g. a list
            raise QuicksilverError(f"config.json has an invalid value: {err}") from err

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], model_type: str) -> ModelConfig:
        eos = hf.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        common = dict(
            vocab_size=hf["vocab_size"],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=hf.get("_name_or_path", model_type),
        )
        if model_type in ("llama", "mistral", "qwen2"):
            return cls(**_llama_switches(hf, model_type), **common)
        if model_type == "gpt2":
            return cls(**_gpt2_switches(hf), **common)
        if model_type == "opt":
            return cls(**_opt_switches(hf), **common)
        raise QuicksilverError(
            f"model_type {model_type!r} is not supported; supported: llama (also mistral, "
            "qwen2-style), gpt2, opt"
        )


def _llama_switches(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The family fields of a Llama-style ``config.json`` (Llama, Mistral, Qwen2): the ones
    these families run differently are refused here rather than run wrongly."""
    rope = _rope_settings(hf)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    layers = hf.get("num_hidden_layers", 0)
    if model_type == "qwen2" and window and hf.get("max_window_layers", layers) < layers:
        raise QuicksilverError(
            "Qwen2 with a sliding window on only some layers is not supported; "
            "set use_sliding_window to false in config.json to run it with full attention"
        )
    activation = _activation(hf.get("hidden_act", "silu"))
    if activation != "silu":
        # The gated MLP is SiLU-gated (SwiGLU); other gates would be silently wrong.
        raise QuicksilverError(
            f"{model_type} models with hidden_act {hf.get('hidden_act')!r} are not "
            "supported; only silu"
        )
    return dict(
        family="llama",
        hidden_size=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=_unless_none(hf.get("num_key_value_heads"), hf["num_attention_heads"]),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation,
        gated_mlp=True,
        position="rope",
        rope_theta=rope[0],
        rope_scaling=rope[1],
        qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim_override=hf.get("head_dim"),
        sliding_window=window,
    )


def _gpt2_switches(hf: dict[str, Any]) -> dict[str, Any]:
    """The family fields of a GPT-2 ``config.json``: its keys have names of their own."""
    d = hf["n_embd"]
    return dict(
        family="gpt2",
        hidden_size=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"],
        intermediate_size=_unless_none(hf.get("n_inner"), 4 * d),
        max_position_embeddings=hf["n_positions"],
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_plain_activation(hf.get("activation_function", "gelu_new")),
        gated_mlp=False,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    )


def _opt_switches(hf: dict[str, Any]) -> dict[str, Any]:
    """The family fields of an OPT ``config.json``, post-norm (350m) and projected embeddings
    included."""
    d = hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim") or d
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    return dict(
        family="opt",
        hidden_size=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_attention_heads"],
        intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm="layer",
        norm_eps=1e-5,
        activation=_plain_activation(hf.get("activation_function", "relu")),
        gated_mlp=False,
        position="learned",
        position_offset=2,
        qkv_bias=bool(hf.get("enable_bias", True)),
        out_bias=bool(hf.get("enable_bias", True)),
        mlp_bias=bool(hf.get("enable_bias", True)),
        pre_norm=pre_norm,
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        word_embed_proj_dim=proj if proj != d else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _unless_none(value: Any, default: Any) -> Any:
    """``value`` unless it is absent (None): a 0 in config.json is an error, not "default"."""
    return default if value is None else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _finite(value: Any) -> bool:
    """A real number that is not inf/NaN (any int is: math.isfinite would overflow on 10**400)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _check_rope_scaling(scaling: Any) -> None:
    if not isinstance(scaling, dict):
        raise QuicksilverError(f"rope_scaling must be a mapping, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise QuicksilverError(
            f"RoPE scaling type {kind!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if key in scaling and not (_finite(scaling[key]) and scaling[key] > 0):
            raise QuicksilverError(
                f"rope_scaling.{key} must be a finite number > 0, got {scaling[key]!r}"
            )
    if kind == "llama3" and scaling.get("high_freq_factor", 4.0) <= scaling.get(
        "low_freq_factor", 1.0
    ):
        raise QuicksilverError("rope_scaling.high_freq_factor must exceed low_freq_factor")


def _activation(name: str) -> str:
    table = {
        "silu": "silu",
        "swish": "silu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu": "gelu",
        "relu": "relu",
    }
    if name not in table:
        raise QuicksilverError(f"activation {name!r} is not supported; supported: {sorted(table)}")
    return table[name]


def _plain_activation(name: str) -> str:
    """Activations the non-gated (GPT-2/OPT) MLP implements; anything else would run as ReLU."""
    activation = _activation(name)
    if activation not in ("gelu_tanh", "gelu", "relu"):
        raise QuicksilverError(
            f"activation {name!r} is not supported for GPT-2/OPT-style MLPs; "
            "supported: gelu, gelu_new (tanh), relu"
        )
    return activation


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling, from either the transformers 4.x or 5.x config layout."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if kind == "default" else dict(scaling)
    return theta, scaling
