"""Policy files and ``load_policy`` arguments: whatever they hold, a Policy or a clear
PolicyConfigError, never another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quicksilver.errors import QuicksilverError
from quicksilver.policies import files
from quicksilver.policies.base import PolicyConfigError
from quicksilver.policies.files import (
    MAX_POLICY_BYTES,
    load_policy,
    parse_policy_text,
    read_policy_file,
    write_policy_file,
)
from quicksilver.policies.stack import REGISTRY, Policy

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HALTING = {"halting": {"relative_drift": 0.1, "min_layer": 2}}


def _error(spec: object, overrides: object = None) -> str:
    with pytest.raises(PolicyConfigError) as info:
        load_policy(spec, overrides)  # type: ignore[arg-type]
    return str(info.value)


def _file(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------- file contents


def test_invalid_utf8(tmp_path: Path) -> None:
    path = _file(tmp_path, "p.yaml", b"halting:\n  drift: 0.1 # caf\xe9\n")
    message = _error(path)
    assert str(path) in message and "not UTF-8" in message and "0xe9" in message


def test_binary_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "p.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert "binary file" in _error(path)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = _file(tmp_path, "p.json", b"\xef\xbb\xbf" + json.dumps(HALTING).encode())
    assert load_policy(path) == Policy.from_config(HALTING)


def test_huge_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "p.yaml", b"#" * (MAX_POLICY_BYTES + 1))
    message = _error(path)
    assert "larger than" in message and "MiB" in message


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").mkdir()
    assert "is a directory" in _error(tmp_path / "p.yaml")


@pytest.mark.skipif(IS_ROOT, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "p.yaml", "halting: {}\n")
    path.chmod(0)
    assert "cannot read policy file" in _error(path)


def test_read_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, "p.yaml", "halting: {}\n")

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    message = _error(path)
    assert "cannot read policy file" in message and "Permission denied" in message


@pytest.mark.parametrize(
    "text, message",
    [
        ("- halting\n", "must hold a mapping"),
        ("3\n", "got int"),
        ("just text\n", "got str"),
        ("halting: [1, 2]\n", "'halting' must map parameter names to values, got list"),
        ("halting: 3\n", "got int"),
        ("1: {}\n", "mechanism names must be text, got 1"),
        ("yes: {}\n", "got True (bool)"),  # YAML 1.1 reads an unquoted yes as true
        ("halting: {1: 2}\n", "parameter names of 'halting' must be text"),
        ("halting: {drift: 2001-01-01}\n", "halting.drift must be"),
        ("? [a, b]\n: 1\n", "cannot parse"),  # a key that Python cannot hash
        ("when: 2001-13-45\n", "cannot parse"),  # a date that does not exist
        ("[" * 5000 + "]" * 5000, "cannot parse"),  # deep nesting
        ("policy: [1]\n", "the 'policy' entry of"),
        ("skipdecode: {max_layers: 1180591620717411303424, min_layers: 1}\n", "out of range"),
    ],
)
def test_yaml_of_odd_shapes(tmp_path: Path, text: str, message: str) -> None:
    path = _file(tmp_path, "p.yaml", text)
    assert message in _error(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "got list"),
        ('{"halting": "fast"}', "got str"),
        ('{"halting": {"drift": ' + "9" * 5000 + "}}", "cannot parse"),  # > int digit limit
        ("[" * 5000 + "]" * 5000, "cannot parse"),
        ('{"policy": {"halting": {"drift": NaN}}}', "halting.drift must be a finite number"),
    ],
)
def test_json_of_odd_shapes(tmp_path: Path, text: str, message: str) -> None:
    path = _file(tmp_path, "p.json", text)
    assert message in _error(path)


def test_empty_file_is_the_dense_policy(tmp_path: Path) -> None:
    assert load_policy(_file(tmp_path, "p.yaml", "")).is_off
    assert load_policy(_file(tmp_path, "q.yaml", "# nothing\n")).is_off


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("p.yaml", "halting:\n"),
        ("p.yaml", "halting: {}\n"),
        ("p.json", '{"halting": {}}'),
        ("p.json", '{"fusion": null, "kv_skip": {"treatment": "skip"}}'),
    ],
)
def test_mechanism_named_without_settings_is_refused(tmp_path: Path, name: str, text: str) -> None:
    """``halting:`` alone would run the dense model while claiming a halting policy."""
    message = _error(_file(tmp_path, name, text))
    mechanism = "fusion" if "fusion" in text else "halting"
    assert f"policy {mechanism!r} is named with no settings" in message
    assert ", ".join(param for param, _, _ in REGISTRY[mechanism].parameters()) in message
    assert "\n" not in message


@pytest.mark.parametrize("mechanism", [n for n in REGISTRY if n != "kv_skip"])
def test_mapping_naming_a_mechanism_without_settings_is_refused(mechanism: str) -> None:
    for section in ({}, None):
        assert f"policy {mechanism!r} is named with no settings" in _error({mechanism: section})
    # A setting given by --set is a setting.
    knob = {"halting": "drift=0.1", "fusion": "threshold=0.5", "matryoshka": "fixed_bits=4"}
    if mechanism in knob:
        assert not load_policy({mechanism: {}}, [f"{mechanism}.{knob[mechanism]}"]).is_off


def test_kv_skip_without_settings_is_its_documented_default() -> None:
    """kv_skip only says what halted tokens leave behind; its default ("propagate") is what
    they get without it, so naming it bare is not a silent dense run of something asked for."""
    policy = load_policy({"halting": {"drift": 0.1}, "kv_skip": {}})
    assert policy.kv_treatment == "propagate"


# ----------------------------------------------------------------------------- load_policy specs


def test_mapping_spec_is_copied_not_modified() -> None:
    config = {"halting": {"relative_drift": 0.1}}
    policy = load_policy(config, ["halting.min_layer=3"])
    assert policy.get("halting").min_layer == 3
    assert config == {"halting": {"relative_drift": 0.1}}


def test_policy_spec_is_returned_or_overridden() -> None:
    policy = Policy.from_config(HALTING)
    assert load_policy(policy) is policy
    tuned = load_policy(policy, ["halting.min_layer=4"])
    assert tuned.get("halting").min_layer == 4
    assert policy.get("halting").min_layer == 2  # the original is untouched


def test_path_like_spec(tmp_path: Path) -> None:
    path = _file(tmp_path, "p.json", json.dumps(HALTING))
    assert load_policy(path) == load_policy(str(path)) == Policy.from_config(HALTING)


@pytest.mark.parametrize(
    "spec, name",
    [
        (3, "int"),
        (b"paper", "bytes"),
        (["paper"], "list"),
        (1.5, "float"),
        (True, "bool"),
        (np.array(["paper", ""]), "ndarray"),  # must not be compared element-wise
    ],
)
def test_other_spec_types_are_named(spec: object, name: str) -> None:
    message = _error(spec)
    assert f"got {name}" in message and "preset name" in message


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("halting.min_layer=3", "wrap it in a list"),
        ([3], "got 3 (int)"),
        ([None], "(NoneType)"),
        (5, "got int"),
        (["halting.drift=2001-13-45"], "cannot parse the value"),
        (["skipdecode.max_layers=1180591620717411303424"], "out of range"),
    ],
)
def test_bad_overrides(overrides: object, message: str) -> None:
    assert message in _error(None, overrides)


def test_mapping_spec_of_odd_shape() -> None:
    assert "mechanism names must be text" in _error({1: {}})
    assert "must map parameter names" in _error({"halting": [1]})


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_write_policy_file_is_atomic_with_usual_mode(tmp_path: Path, suffix: str) -> None:
    policy = Policy.from_config(HALTING)
    path = tmp_path / f"chosen{suffix}"
    path.write_text("old")
    path.chmod(0o640)
    write_policy_file(policy, path)
    assert load_policy(path) == policy
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_policy_file_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path, "chosen.yaml", "old")

    def interrupted(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(QuicksilverError, match="cannot write"):
        write_policy_file(Policy.from_config(HALTING), path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["chosen.yaml"]


def test_write_policy_file_into_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(QuicksilverError, match="does not exist"):
        write_policy_file(Policy(), tmp_path / "missing" / "p.json")


# ----------------------------------------------------------------------------- properties

PARAMETERS = sorted({f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls)})
KEYS = st.one_of(
    st.sampled_from([*REGISTRY, "policy", *PARAMETERS]),
    st.text(max_size=6),
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=2),
    st.text(max_size=8),
    st.sampled_from(["skip", "zero", "propagate", "l2", "cosine", "relative", "1e-2", "inf"]),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
# Mostly well-formed policies (mechanism -> {parameter: value}), so the mechanisms' own checks
# are reached, plus any document at all.
POLICY_LIKE = st.dictionaries(
    st.sampled_from(list(REGISTRY)),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(PARAMETERS), SCALARS, max_size=4)),
    max_size=4,
)

# --set items as a user would type them: a real mechanism and parameter, any value text.
SETS = st.builds(
    "{}.{}={}".format,
    st.sampled_from(list(REGISTRY)),
    st.sampled_from(PARAMETERS),
    st.one_of(SCALARS.map(str), st.text(max_size=8)),
)


def _policy_or_error(data: bytes, json_format: bool) -> Policy | PolicyConfigError:
    """The policy in ``data`` or the error refusing it; any other exception fails the test."""
    try:
        return Policy.from_config(parse_policy_text(data, "generated", json_format))
    except PolicyConfigError as error:
        assert "\n" not in str(error)  # the CLI prints it as one line
        return error


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200), json_format=st.booleans())
def test_random_bytes(data: bytes, json_format: bool) -> None:
    _policy_or_error(data, json_format)


@settings(max_examples=200, deadline=None)
@given(document=st.one_of(POLICY_LIKE, DOCUMENTS), as_json=st.booleans())
def test_random_documents(document: object, as_json: bool) -> None:
    if as_json:
        try:
            text = json.dumps(document)
        except (TypeError, ValueError):  # JSON keys must be text or numbers
            return
    else:
        text = yaml.safe_dump(document)
    _policy_or_error(text.encode(), as_json)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=POLICY_LIKE, overrides=st.lists(st.one_of(st.text(max_size=24), SETS), max_size=3))
def test_random_files_and_overrides_through_load_policy(
    tmp_path: Path, document: dict, overrides: list[str]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    try:
        policy = load_policy(path, overrides)
    except PolicyConfigError:
        return
    assert isinstance(policy, Policy)
    # A policy that loads round-trips through its own file form.
    out = tmp_path / "again.json"
    write_policy_file(policy, out)
    assert read_policy_file(out) == json.loads(json.dumps(policy.to_config()))
    assert not any(isinstance(v, float) and math.isnan(v) for v in _leaves(policy.to_config()))


def _leaves(config: dict) -> list[object]:
    return [v for section in config.values() for v in section.values()]


def test_parse_limit_is_enforced_on_bytes() -> None:
    """The size check does not depend on the file system (a pipe reports no size)."""
    with pytest.raises(PolicyConfigError, match="larger than"):
        parse_policy_text(b" " * (files.MAX_POLICY_BYTES + 1), "stdin", json_format=False)
