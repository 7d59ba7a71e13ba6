"""--group-size shapes int4 weights only: every command that takes it refuses it, in one line
and before loading anything, when no int4 weights are asked for, instead of ignoring it."""

from __future__ import annotations

from pathlib import Path

import pytest

import quicksilver
from quicksilver.cli.generate import check_group_size
from quicksilver.cli.main import build_parser, main, parse
from quicksilver.errors import QuicksilverError

# Each command with the least it needs to reach its option checks.
COMMANDS = {
    "generate": ["generate", "--prompt", "hi"],
    "eval": ["eval"],
    "eval-gen": ["eval-gen"],
    "calibrate": ["calibrate", "--output", "{tmp}/policy.json"],
    "bench": ["bench"],
}


def _argv(command: str, tmp_path: Path, *extra: str) -> list[str]:
    return [arg.format(tmp=tmp_path) for arg in COMMANDS[command]] + list(extra)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model would mean the option check came too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before --group-size was checked")

    monkeypatch.setattr(quicksilver, "load", refuse)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("size", ["64", "32"])  # 32 is the default, but given: still refused
def test_group_size_without_int4_is_one_line_error(
    command: str, size: str, tmp_path: Path, capsys: pytest.CaptureFixture, no_loading: None
) -> None:
    assert main(_argv(command, tmp_path, "--group-size", size)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --group-size {size} applies to int4 weights only; add --weights int4 (or "
        "--head-weights int4), or leave --group-size out"
    ]


@pytest.mark.parametrize("command", ["generate", "eval", "eval-gen", "calibrate"])
def test_group_size_with_a_float_format_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture, no_loading: None
) -> None:
    argv = _argv(command, tmp_path, "--weights", "int8", "--group-size", "128")
    assert main(argv) == 2
    assert "applies to int4 weights only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "formats", "expected"),
    [
        ([], None, 32),  # not given: the default, whatever the format
        (["--weights", "int4", "--group-size", "64"], "int4", 64),
        (["--head-weights", "int4", "--group-size", "128"], None, 128),
    ],
)
def test_group_size_accepted_with_int4_or_when_not_given(
    extra: list[str], formats: str | None, expected: int
) -> None:
    args = parse(build_parser(), ["generate", "--prompt", "hi", *extra])
    check_group_size(args, [args.weights])
    assert args.group_size == expected and type(args.group_size) is int


def test_bench_accepts_group_size_when_one_of_its_formats_is_int4() -> None:
    args = parse(build_parser(), ["bench", "--weights", "bfloat16", "int4", "--group-size", "64"])
    check_group_size(args, args.weights)
    assert args.group_size == 64
    refused = parse(build_parser(), ["bench", "--weights", "bfloat16", "--group-size", "64"])
    with pytest.raises(QuicksilverError, match="int4 weights only"):
        check_group_size(refused, refused.weights)


def test_given_group_size_reaches_the_load_as_a_plain_int(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = {}

    def fake_load(model, **kwargs):
        seen.update(kwargs)
        raise QuicksilverError("stopped after the load call")

    monkeypatch.setattr(quicksilver, "load", fake_load)
    assert main(["generate", "--prompt", "hi", "--weights", "int4", "--group-size", "64"]) == 2
    assert "stopped after the load call" in capsys.readouterr().err
    assert seen["group_size"] == 64 and type(seen["group_size"]) is int


def test_help_still_shows_the_default(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--help"]) == 0
    assert "(default: 32)" in capsys.readouterr().out
