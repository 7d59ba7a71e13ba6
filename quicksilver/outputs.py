"""Writing outputs: atomic text and strict-JSON files, checked before any work.

Every output goes through ``write_text_atomic``: a temporary sibling file, fsync, rename. A
reader never sees half a file and an interrupted run leaves any previous file untouched.
``check_output_path`` runs the same checks up front, so a run that could not save its result
fails in its first second rather than after an hour of work. The bottom layer: policies,
evaluations, benchmarks and the command line all write through it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quicksilver.errors import QuicksilverError

PathInput = str | os.PathLike[str]


def check_output_path(path: PathInput, inputs: Iterable[PathInput | None] = ()) -> Path:
    """Fail now, not after an hour of work, if `path` cannot be written later.

    Refused: a directory (or a name ending in ``/``), a device or pipe, a read-only file, a
    missing parent directory (or a parent that is a file), an unwritable directory, and the
    same file as any of ``inputs`` (the run's own input files: overwriting one would destroy
    what the run reads). Returns the path with ``~`` expanded.
    """
    given = path
    path = _as_path(path, "output path")
    try:
        _check_directory_name(os.fspath(given), path)
        _check_writable(path)
        for item in inputs:
            if item is not None and _same_file(path, _as_path(item, "input path")):
                raise QuicksilverError(
                    f"output path {path} is the same file as the input {item}; writing it "
                    "would destroy the input: choose another output name"
                )
    except OSError as err:  # e.g. a name too long or a path component unreadable
        raise QuicksilverError(f"cannot write {path}: {err.strerror or err}") from err
    return path


def _as_path(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise QuicksilverError(f"{what} must be a file name, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise QuicksilverError(f"{what} {text!r} is not a usable file name")
    return Path(text).expanduser()


def _check_directory_name(given: str, path: Path) -> None:
    """Refuse a name that can only mean a directory: ``out/``, ``out/.`` or ``out/..``.

    ``Path`` drops a trailing separator and ``.``, so ``out/dir/`` would otherwise be written
    as a *file* called ``dir`` inside ``out`` when ``out/dir`` does not exist yet: the user
    meant a directory, so the result would land somewhere they do not expect.
    """
    separators = os.sep + (os.altsep or "")
    last = given.rstrip(separators).rsplit(os.sep, 1)[-1]
    if os.altsep:
        last = last.rsplit(os.altsep, 1)[-1]
    if not (given.endswith(tuple(separators)) or last in (".", "..")):
        return
    if path.is_dir():
        raise QuicksilverError(f"output path {given} is a directory; give a file name")
    raise QuicksilverError(
        f"output path {given} names a directory, and directory {path} does not exist; "
        "give a file name (create the directory first if it should hold the file)"
    )


def _write_target(path: Path) -> Path:
    """Where writing `path` really lands: a symlink is followed, as a plain open() would."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _check_writable(path: Path) -> None:
    target = _write_target(path)
    if target.is_dir():
        raise QuicksilverError(f"output path {path} is a directory; give a file name")
    if target.exists():
        if not target.is_file():
            raise QuicksilverError(
                f"output path {path} is not a regular file (a device, pipe or socket); "
                "give a file name"
            )
        if not os.access(target, os.W_OK):
            raise QuicksilverError(f"cannot write {path}: the file is read-only")
    parent = target.parent
    if not parent.is_dir():
        ancestor = next((p for p in parent.parents if p.exists()), None)
        blocker = parent if parent.exists() else ancestor
        if blocker is not None and not blocker.is_dir():
            raise QuicksilverError(f"cannot write {path}: {blocker} is a file, not a directory")
        raise QuicksilverError(
            f"cannot write {path}: directory {parent} does not exist; create it first"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuicksilverError(f"cannot write {path}: directory {parent} is not writable")


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file (symlinks, hard links, `..` and `~` resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it, which briefly changes it for every thread;
    Linux reports it in /proc/self/status, so that is tried first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: PathInput, text: str) -> Path:
    """Write `text` (UTF-8) through a temporary sibling file and a rename.

    The file gets the permissions a plain ``open(path, "w")`` gives: an existing file keeps
    its mode, a new one gets 0666 minus the umask (mkstemp alone would leave 0600). A symlink
    is followed, so the file it points to is replaced, not the link.
    """
    path = check_output_path(path)
    target = _write_target(path)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except (OSError, UnicodeEncodeError) as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise QuicksilverError(f"cannot write {path}: {reason}") from err
    return path


def jsonable(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json_atomic(path: PathInput, data: Any) -> Path:
    """Write `data` as strict JSON (NaN and infinities become null), atomically."""
    return write_text_atomic(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")
