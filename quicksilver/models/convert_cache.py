"""The converted-model cache: a GGUF file dequantised once into fp32 safetensors, its config
and its tokenizer, under ``~/.cache/quicksilver/converted/<key>`` (``QUICKSILVER_CACHE``
moves the root), so later loads skip the conversion.

An entry is written whole or not at all (temporary directory, rename) and proves itself:
its manifest records every file's size and SHA-256, and each tensor's SHA-256 as stored.
A load checks cheaply (the manifest, sizes, the safetensors header and the hashes of the
small files: config and tokenizer), so an edited config or a truncated file is caught there;
``verify_entry`` hashes every tensor too, which is what catches bytes flipped inside the
weights without any size changing. Either way a damaged entry is named, removed and rebuilt,
never used silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from quicksilver.errors import QuicksilverError
from quicksilver.models.config import ModelConfig
from quicksilver.models.hf import load_hf_tokenizer
from quicksilver.models.state import StreamedTensors, check_state
from quicksilver.models.transformer import Transformer

CONVERSION_VERSION = "5"  # bump when the converted cache layout or its config changes
MANIFEST = "complete"  # written last: an entry without it was never finished
WEIGHTS = "model.safetensors"
BLOCKS = "gguf-tensors.json"  # where each tensor's blocks lie in the source file
_HASH_CHUNK = 1 << 22


def cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return cache_dir
    env = os.environ.get("QUICKSILVER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "quicksilver"


def entry_path(gguf_path: Path, cache_dir: Path | None) -> Path:
    """Where the conversion of ``gguf_path`` lives: keyed by the file's path, size and
    modification time, so a replaced file gets a new entry."""
    stat = gguf_path.stat()
    key = hashlib.sha1(
        f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}".encode()
    ).hexdigest()[:16]
    return cache_root(cache_dir) / "converted" / key


def entries(cache_dir: Path | None) -> list[Path]:
    """Every entry under the cache root (finished or not; temporary directories excluded)."""
    converted = cache_root(cache_dir) / "converted"
    if not converted.is_dir():
        return []
    return sorted(p for p in converted.iterdir() if not p.name.startswith(".tmp-"))


def remove_entry(target: Path) -> None:
    """Delete an entry, whatever state it is in; an entry that is already gone is fine."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            target.unlink()


def _manifest_of(target: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def source_of(target: Path) -> str | None:
    """The GGUF file an entry was converted from, as its manifest says (None if unreadable)."""
    source = (_manifest_of(target) or {}).get("source")
    return source if isinstance(source, str) else None


def is_outdated(target: Path) -> bool:
    """Whether a finished entry was written by an earlier conversion version: its key differs
    from any this version computes, so it is never read again, only taking space."""
    manifest = _manifest_of(target)
    return manifest is not None and manifest.get("version") != CONVERSION_VERSION


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_of_range(f: Any, start: int, end: int) -> str:
    digest = hashlib.sha256()
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(left, _HASH_CHUNK))
        if not chunk:
            break  # truncated: the digest then cannot match
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _weight_hashes(path: Path, tensors: StreamedTensors) -> tuple[str, dict[str, str]]:
    """The SHA-256 of the safetensors header and of each tensor's bytes as stored."""
    with open(path, "rb") as f:
        header = _sha256_of_range(f, 0, tensors.header_bytes)
        ranges = sorted(tensors.byte_ranges().items(), key=lambda item: item[1])
        return header, {name: _sha256_of_range(f, start, end) for name, (start, end) in ranges}


def _check(target: Path, full: bool) -> tuple[dict[str, Any], StreamedTensors]:
    """Raise a QuicksilverError saying what is wrong with the entry, if anything; else its
    manifest and weights. ``full`` also hashes every tensor (seconds, not milliseconds)."""
    if not target.is_dir():
        raise QuicksilverError("it is not a directory")
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except FileNotFoundError as err:
        raise QuicksilverError("its manifest is missing (the conversion never finished)") from err
    except (OSError, ValueError) as err:
        raise QuicksilverError(f"its manifest cannot be read ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("version") != CONVERSION_VERSION:
        raise QuicksilverError("its manifest is not one this version of quicksilver writes")
    files, hashes = manifest.get("files"), manifest.get("sha256")
    weights = manifest.get("weights")
    if not (isinstance(files, dict) and isinstance(hashes, dict) and isinstance(weights, dict)):
        raise QuicksilverError("its manifest lists no files")
    if WEIGHTS not in files or files.keys() - {WEIGHTS} != hashes.keys():
        raise QuicksilverError("its manifest does not list a hash for every file")
    for name, size in files.items():
        file = target / name
        if not file.is_file():
            raise QuicksilverError(f"{name} is missing")
        if file.stat().st_size != size:
            raise QuicksilverError(f"{name} has {file.stat().st_size} bytes, expected {size}")
    for name, expected in hashes.items():  # config and tokenizer: small, so always hashed
        if _sha256_of_file(target / name) != expected:
            raise QuicksilverError(f"{name} hash mismatch")
    tensors = StreamedTensors(target / WEIGHTS)
    with open(target / WEIGHTS, "rb") as f:
        if _sha256_of_range(f, 0, tensors.header_bytes) != weights.get("header_sha256"):
            raise QuicksilverError(f"{WEIGHTS} header hash mismatch")
    expected_tensors = weights.get("tensors")
    if not isinstance(expected_tensors, dict) or expected_tensors.keys() != set(tensors):
        raise QuicksilverError(f"{WEIGHTS} does not hold the tensors its manifest lists")
    if full:
        _, found = _weight_hashes(target / WEIGHTS, tensors)
        for name, digest in found.items():
            if digest != expected_tensors[name]:
                raise QuicksilverError(f"tensor {name} hash mismatch")
    return manifest, tensors


def read_entry(target: Path) -> tuple[ModelConfig, StreamedTensors, Any, dict[str, Any]]:
    """An entry's config, weights (read when taken), tokenizer and the source file's tensor
    index (``gguf_file.TensorIndex.to_dict``), after the cheap check and a check of the
    tensors against the shapes the config implies; raises on any damage."""
    manifest, state = _check(target, full=False)
    data = json.loads((target / "config.json").read_text())
    if not isinstance(data, dict):
        raise QuicksilverError("config.json does not hold a JSON object")
    config = ModelConfig.from_dict(data)
    with torch.device("meta"):
        check_state(Transformer(config), state)
    tokenizer = load_hf_tokenizer(target / "tokenizer")
    if tokenizer is None and any(name.startswith("tokenizer/") for name in manifest["files"]):
        raise QuicksilverError("the tokenizer files are missing")
    if BLOCKS not in manifest["files"]:
        raise QuicksilverError(f"{BLOCKS} is missing")
    index = json.loads((target / BLOCKS).read_text())
    return config, state, tokenizer, index


def verify_entry(target: Path) -> str | None:
    """Why the entry is damaged (every byte checked against its manifest), or None."""
    try:
        _check(target, full=True)
    except Exception as err:  # anything unreadable in our own cache means damage
        return " ".join(str(err).split())[:200] or type(err).__name__
    return None


def damaged_message(target: Path, reason: str) -> str:
    return (
        f"the cached conversion at {target} is damaged ({reason}); it was removed and will be "
        "rebuilt on the next load"
    )


def write_entry(
    target: Path,
    source: Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    index: dict[str, Any],
) -> None:
    """Write an entry into a temporary sibling and rename it into place, so an interrupted
    run leaves no half entry. The manifest, written last, lists every file with its size and
    hash. A read-only or full cache only costs speed: the entry is then not kept."""
    from safetensors.torch import save_file

    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        (tmp / BLOCKS).write_text(json.dumps(index))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        files = {
            file.relative_to(tmp).as_posix(): file.stat().st_size
            for file in sorted(tmp.rglob("*"))
            if file.is_file()
        }
        header, tensor_hashes = _weight_hashes(tmp / WEIGHTS, StreamedTensors(tmp / WEIGHTS))
        manifest = {
            "version": CONVERSION_VERSION,
            "source": str(source),
            "files": files,
            "sha256": {name: _sha256_of_file(tmp / name) for name in files if name != WEIGHTS},
            "weights": {"header_sha256": header, "tensors": tensor_hashes},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        tmp.rename(target)  # fails if another process renamed its entry first: keep that one
    except OSError:
        pass
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def report(cache_dir: Path | None) -> Iterator[tuple[Path, str | None, str, str | None]]:
    """Each entry with its source, its state ("ok", "damaged" or "outdated") and, when
    damaged, why: for listing."""
    for target in entries(cache_dir):
        if is_outdated(target):
            yield target, source_of(target), "outdated", None
            continue
        reason = verify_entry(target)
        yield target, source_of(target), "ok" if reason is None else "damaged", reason
