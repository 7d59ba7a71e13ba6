"""Output files: atomic writes with the usual permissions, and every unwritable output path
(or one that is the run's own input) refused up front with a clear QuicksilverError."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from quicksilver import outputs as report
from quicksilver.errors import QuicksilverError
from quicksilver.outputs import (
    check_output_path,
    current_umask,
    write_json_atomic,
    write_text_atomic,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def umask_027() -> Iterator[int]:
    """Run with a umask that differs from the usual 022, so the test sees which one applied."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _refused(path: object, **kwargs: object) -> str:
    with pytest.raises(QuicksilverError) as info:
        check_output_path(path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# ----------------------------------------------------------------------------- writing


def test_current_umask_reads_without_changing(umask_027: int) -> None:
    assert current_umask() == umask_027
    assert current_umask() == umask_027  # reading twice: nothing was reset along the way


def test_new_file_gets_the_usual_permissions(tmp_path: Path, umask_027: int) -> None:
    path = write_text_atomic(tmp_path / "out.txt", "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    assert _mode(path) == 0o666 & ~umask_027 == 0o640  # not mkstemp's 0600


def test_json_goes_through_the_same_write(tmp_path: Path, umask_027: int) -> None:
    path = write_json_atomic(tmp_path / "r.json", {"x": float("nan"), "y": [1, float("-inf")]})
    assert json.loads(path.read_text()) == {"x": None, "y": [1, None]}
    assert _mode(path) == 0o640


def test_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    path.chmod(0o604)
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert _mode(path) == 0o604


def test_no_temporary_file_is_left(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.txt", "1")
    write_text_atomic(tmp_path / "a.txt", "2")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_symlink_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")

    def no_space(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.os, "replace", no_space)
    with pytest.raises(QuicksilverError, match="cannot write .*No space left on device"):
        write_json_atomic(path, {"a": 1})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_text_that_cannot_be_encoded_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QuicksilverError, match="cannot write"):
        write_text_atomic(tmp_path / "x.txt", "lone surrogate \ud800")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- checking


def test_writable_path_is_returned_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_output_path("~/out.json") == tmp_path / "out.json"
    assert check_output_path(tmp_path / "out.json", inputs=[None, tmp_path / "in.txt"])


def test_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory" in _refused(tmp_path)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path / "no" / "such" / "out.json")
    assert "does not exist" in message and str(tmp_path / "no" / "such") in message


@pytest.mark.parametrize(
    ("name", "existing"), [("out/", ""), ("out/.", ""), ("out/dir/", "out"), ("out/dir/.", "out")]
)
def test_name_of_a_missing_directory_is_refused(
    name: str, existing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``out/dir/`` names a directory, not a file ``dir`` to create inside ``out`` (Path drops
    the trailing separator, so without this check the JSON would land in a file ``out/dir``)."""
    monkeypatch.chdir(tmp_path)
    if existing:
        (tmp_path / existing).mkdir()
    message = _refused(name)
    assert f"output path {name} names a directory" in message and "does not exist" in message
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == (
        [existing] if existing else []
    )


def test_existing_directory_with_trailing_separator_is_refused(tmp_path: Path) -> None:
    assert "is a directory" in _refused(f"{tmp_path}{os.sep}")


@pytest.mark.parametrize("below", ["out.json", "sub/out.json"])
def test_parent_that_is_a_file_is_refused(tmp_path: Path, below: str) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    message = _refused(blocker / below)
    assert f"{blocker} is a file, not a directory" in message


def test_device_is_refused() -> None:
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null here")
    assert "not a regular file" in _refused("/dev/null")


@pytest.mark.skipif(IS_ROOT, reason="root may write anywhere")
def test_unwritable_directory_and_read_only_file(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "not writable" in _refused(locked / "out.json")
    finally:
        locked.chmod(0o700)
    read_only = tmp_path / "ro.json"
    read_only.write_text("{}")
    read_only.chmod(0o444)
    assert "read-only" in _refused(read_only)


@pytest.mark.parametrize("bad", [None, 3, b"out.json", ["out.json"], "a\0b", ""])
def test_values_that_are_not_file_names(bad: object) -> None:
    message = _refused(bad)
    assert "file name" in message


def test_output_equal_to_an_input_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "policy.json"
    source.write_text("{}")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(source)
    hard = tmp_path / "hard.json"
    os.link(source, hard)
    monkeypatch.chdir(tmp_path / "sub")
    for output in (
        source,
        link,
        hard,
        "../policy.json",
        str(tmp_path / "sub" / ".." / "policy.json"),
    ):
        message = _refused(output, inputs=[tmp_path / "other.txt", source])
        assert "same file as the input" in message and "policy.json" in message, output
    # An input that does not exist yet is still the same path.
    assert "same file" in _refused(tmp_path / "new.json", inputs=["../new.json"])


def test_other_file_than_the_inputs_is_accepted(tmp_path: Path) -> None:
    source = tmp_path / "policy.json"
    source.write_text("{}")
    assert check_output_path(tmp_path / "chosen.json", inputs=[source]) == tmp_path / "chosen.json"


def test_writes_refuse_what_the_check_refuses(tmp_path: Path) -> None:
    with pytest.raises(QuicksilverError, match="is a directory"):
        write_text_atomic(tmp_path, "x")
    with pytest.raises(QuicksilverError, match="does not exist"):
        write_json_atomic(tmp_path / "missing" / "r.json", {})
