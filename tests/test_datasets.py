"""Tests for evaluation text loading."""

from __future__ import annotations

import gzip
import json
import re
import sys
import types
from pathlib import Path

import pytest

from quicksilver.errors import QuicksilverError
from quicksilver.eval.datasets import (
    DATASETS,
    default_data_dir,
    load_eval_text,
    load_jsonl,
    load_text_file,
)

DATA = default_data_dir()
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = DATA / "wikitext-2-raw" / "wiki.valid.raw"
C4_SAMPLE = DATA / "c4" / "c4-validation-sample-1000.jsonl.gz"

needs_wikitext = pytest.mark.skipif(
    not (WIKI_TEST.is_file() and WIKI_VALID.is_file()),
    reason=f"WikiText-2 raw files not found under {DATA} (set QUICKSILVER_DATA_DIR)",
)
needs_c4 = pytest.mark.skipif(
    not C4_SAMPLE.is_file(), reason=f"C4 sample not found at {C4_SAMPLE} (set QUICKSILVER_DATA_DIR)"
)


def _hub_rows(path: Path) -> list[str]:
    """The hub's rows, derived independently: split on "\\n", blank lines become ""."""
    lines = path.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == ""  # the file ends with a newline
    return [line + "\n" if line.strip() else "" for line in lines[:-1]]


# --- real WikiText-2 -------------------------------------------------------------------------


@needs_wikitext
def test_wikitext2_test_is_the_raw_file_verbatim() -> None:
    rows = _hub_rows(WIKI_TEST)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"

    ev = load_eval_text("wikitext-2", "test", data_dir=DATA)
    assert ev.name == "wikitext-2/test"
    assert ev.text.encode("utf-8") == WIKI_TEST.read_bytes()
    assert ev.text.startswith(" \n = Robert Boulter = \n \n Robert Boulter is")
    assert ev.n_bytes == len(ev.text.encode("utf-8")) == 1_290_590
    assert ev.n_words == len(re.split(r"\s+", ev.text))
    assert ev.n_documents == 60  # the two " = ... = " equation lines are not titles


@needs_wikitext
def test_wikitext2_validation() -> None:
    rows = _hub_rows(WIKI_VALID)
    assert len(rows) == 3760
    ev = load_eval_text("wikitext-2", "validation", data_dir=DATA)
    assert ev.text.encode("utf-8") == WIKI_VALID.read_bytes()
    assert ev.n_documents == 60


@needs_wikitext
def test_wikitext103_uses_wikitext2_files_when_missing() -> None:
    if (DATA / "wikitext-103-raw").exists():
        pytest.skip("a real wikitext-103-raw directory is present")
    ev103 = load_eval_text("wikitext-103", "test", data_dir=DATA)
    assert ev103.name == "wikitext-103/test"
    assert ev103.text == load_eval_text("wikitext-2", "test", data_dir=DATA).text


@needs_wikitext
def test_wikitext_limits_are_prefixes() -> None:
    full = load_eval_text("wikitext-2", "test", data_dir=DATA).text

    two = load_eval_text("wikitext-2", "test", data_dir=DATA, max_documents=2)
    assert two.n_documents == 2
    assert full.startswith(two.text)
    assert " = Du Fu = " in two.text
    assert " = Kiss You ( One Direction song ) = " not in two.text

    cut = load_eval_text("wikitext-2", "test", data_dir=DATA, max_chars=1000)
    assert len(cut.text) <= 1000
    assert full.startswith(cut.text)
    assert full[len(cut.text)].isspace()  # no word split in half
    assert cut.n_documents == 1


# --- real C4 sample --------------------------------------------------------------------------


@needs_c4
def test_c4_validation_sample() -> None:
    with gzip.open(C4_SAMPLE, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    ev = load_eval_text("c4", "validation", data_dir=DATA)
    assert ev.name == "c4/validation-sample"
    assert ev.n_documents == len(docs) == 1000
    assert ev.text == "\n\n".join(docs)

    five = load_eval_text("c4", "validation", data_dir=DATA, max_documents=5)
    assert five.n_documents == 5
    assert five.text == "\n\n".join(docs[:5])


# --- synthetic WikiText ----------------------------------------------------------------------

SYNTHETIC_WIKI = (
    " \n = First = \n \n Intro text .\n \n = = Section = = \n \n Body ; where L \n"
    " = 1 henry and C = \n 1 farad .\n \n = Second = \n \n More text .\n \n"
)


def _synthetic_data_dir(tmp_path: Path) -> Path:
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(SYNTHETIC_WIKI, encoding="utf-8")
    return tmp_path


def test_synthetic_wikitext_rows_and_articles(tmp_path: Path) -> None:
    ev = load_eval_text("wikitext-2", data_dir=_synthetic_data_dir(tmp_path))
    assert ev.text == SYNTHETIC_WIKI
    assert ev.n_documents == 2  # " = 1 henry and C = " sits between text lines: not a title

    first = load_eval_text("wikitext-2", data_dir=tmp_path, max_documents=1)
    assert first.n_documents == 1
    assert "Second" not in first.text and "1 farad" in first.text


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _synthetic_data_dir(tmp_path)
    monkeypatch.setenv("QUICKSILVER_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert load_eval_text("wikitext-2").n_documents == 2


# --- missing data and the hub fallback -------------------------------------------------------


def test_missing_data_without_datasets_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(QuicksilverError) as info:
        load_eval_text("wikitext-2", "test", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in message
    assert "QUICKSILVER_DATA_DIR" in message and "--data-dir" in message
    assert "datasets" in message
    assert "\n" not in message


def test_missing_data_when_hub_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    fake = types.SimpleNamespace(load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(QuicksilverError) as info:
        load_eval_text("c4", "validation", data_dir=tmp_path)
    message = str(info.value)
    assert "c4-validation-sample-1000.jsonl.gz" in message
    assert "ConnectionError: no network" in message


def test_hub_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, config: str, split: str, streaming: bool = False) -> object:
        calls.append((path, config, split, streaming))
        if path == "wikitext":
            return {"text": ["", " = Title = \n", "", " Body .\n", ""]}
        return iter([{"text": f"doc {i}"} for i in range(5000)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    wiki = load_eval_text("wikitext-103", "validation", data_dir=tmp_path)
    assert wiki.text == " \n = Title = \n \n Body .\n \n"  # the raw file the rows came from
    assert wiki.n_documents == 1
    c4 = load_eval_text("c4", "validation", data_dir=tmp_path)
    assert c4.n_documents == 1000
    assert c4.name == "c4/validation-first1000"  # not the local sample, so not the same name
    assert calls == [
        ("wikitext", "wikitext-103-raw-v1", "validation", False),
        ("allenai/c4", "en", "validation", True),
    ]


# --- names, splits and limits ----------------------------------------------------------------


def test_unknown_name_lists_known_datasets() -> None:
    with pytest.raises(QuicksilverError, match="known datasets: c4, wikitext-103, wikitext-2"):
        load_eval_text("penn-treebank")
    assert set(DATASETS) == {"wikitext-2", "wikitext-103", "c4"}


def test_unknown_split_lists_valid_splits() -> None:
    with pytest.raises(QuicksilverError, match="valid splits: validation"):
        load_eval_text("c4", "test")
    with pytest.raises(QuicksilverError, match="valid splits: test, validation"):
        load_eval_text("wikitext-2", "train")


@pytest.mark.parametrize("kwargs", [{"max_documents": 0}, {"max_chars": -5}])
def test_bad_limits(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(QuicksilverError, match="positive integer"):
        load_eval_text("wikitext-2", data_dir=tmp_path, **kwargs)


# --- plain text files ------------------------------------------------------------------------


def test_text_file_is_loaded_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "foo.txt"
    path.write_bytes("héllo  wörld\r\nsecond line\n".encode())
    ev = load_text_file(path)
    assert ev.name == f"file:{path}"
    assert ev.text == "héllo  wörld\r\nsecond line\n"
    assert ev.n_bytes == path.stat().st_size
    # lm-eval-harness word convention: the trailing "\n" adds an empty word.
    assert ev.n_words == len(["héllo", "wörld", "second", "line", ""]) == 5
    assert ev.n_documents == 1


def test_text_file_max_chars_cuts_at_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("alpha beta gamma delta", encoding="utf-8")
    assert load_text_file(path, max_chars=13).text == "alpha beta"
    assert load_text_file(path, max_chars=10).text == "alpha beta"
    assert load_text_file(path, max_chars=100).text == "alpha beta gamma delta"
    assert load_text_file(path, max_chars=3).text == "alp"  # no whitespace to cut at


def test_text_file_errors(tmp_path: Path) -> None:
    with pytest.raises(QuicksilverError, match="not found"):
        load_text_file(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(QuicksilverError, match="is empty"):
        load_text_file(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(QuicksilverError, match="is not UTF-8 text"):
        load_text_file(binary)


def test_text_file_not_utf8_says_where(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(QuicksilverError) as error:
        load_text_file(path)
    message = str(error.value)
    assert str(path) in message
    assert "byte 0xe9 at offset 14, line 2" in message and "convert it to UTF-8" in message


def test_text_file_that_is_a_directory_or_empty(tmp_path: Path) -> None:
    with pytest.raises(QuicksilverError, match="is a directory"):
        load_text_file(tmp_path)
    empty = tmp_path / "zero.txt"
    empty.write_bytes(b"")
    with pytest.raises(QuicksilverError, match="is empty"):
        load_text_file(empty)


@pytest.mark.parametrize("bad", [None, 3, "", b"x.txt", "a\0b"])
def test_paths_that_are_not_file_names(bad: object) -> None:
    for loader in (load_text_file, load_jsonl):
        with pytest.raises(QuicksilverError, match="must be a file name"):
            loader(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [True, 1.5, "3", 0, -1])
def test_limits_must_be_positive_integers(tmp_path: Path, value: object) -> None:
    path = tmp_path / "t.txt"
    path.write_text("some text", encoding="utf-8")
    with pytest.raises(QuicksilverError, match="max_chars must be a positive integer"):
        load_text_file(path, max_chars=value)  # type: ignore[arg-type]
    with pytest.raises(QuicksilverError, match="max_documents must be a positive integer"):
        load_jsonl(path, max_documents=value)  # type: ignore[arg-type]


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(QuicksilverError, match="data directory .* is a file"):
        load_eval_text("wikitext-2", data_dir=path)


def test_local_wikitext_not_utf8(tmp_path: Path) -> None:
    raw = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    raw.parent.mkdir()
    raw.write_bytes(b" \n = Title = \n \n caf\xe9 \n")
    with pytest.raises(QuicksilverError, match=r"is not UTF-8 text \(byte 0xe9 .* line 4\)"):
        load_eval_text("wikitext-2", "test", data_dir=tmp_path)


# --- JSONL files -----------------------------------------------------------------------------

ROWS = [{"text": "first doc", "id": 1}, {"text": "second doc"}, {"text": "third doc"}]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize(
    "name, compress", [("d.jsonl", False), ("d.jsonl.gz", True), ("d.dat", True)]
)
def test_jsonl_plain_and_gzip(tmp_path: Path, name: str, compress: bool) -> None:
    path = tmp_path / name
    data = (_jsonl(ROWS[:2]) + "\n" + _jsonl(ROWS[2:])).encode()  # a blank line is skipped
    path.write_bytes(gzip.compress(data) if compress else data)
    ev = load_jsonl(path)
    assert ev.text == "first doc\n\nsecond doc\n\nthird doc"
    assert ev.n_documents == 3
    assert ev.n_words == 6
    assert load_jsonl(path, max_documents=2).text == "first doc\n\nsecond doc"


def test_jsonl_other_field_and_max_chars(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(_jsonl([{"body": "one two"}, {"body": "three four"}]), encoding="utf-8")
    ev = load_jsonl(path, field="body", max_chars=12)
    assert ev.text == "one two\n"  # cut at the last whitespace before the limit
    assert ev.n_documents == 1


def test_jsonl_broken_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(_jsonl(ROWS[:2]) + '{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(QuicksilverError, match=r"line 3: not valid JSON"):
        load_jsonl(path)


def test_jsonl_missing_or_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "nofield.jsonl"
    path.write_text(_jsonl([{"text": "ok"}, {"content": "no text"}]), encoding="utf-8")
    with pytest.raises(QuicksilverError, match=r"line 2: no 'text' field"):
        load_jsonl(path)
    path.write_text(_jsonl([{"text": 42}]), encoding="utf-8")
    with pytest.raises(QuicksilverError, match=r"line 1: field 'text' is a int"):
        load_jsonl(path)


def test_jsonl_missing_empty_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(QuicksilverError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(QuicksilverError, match="is empty"):
        load_jsonl(empty)
    blank_docs = tmp_path / "blank.jsonl"
    blank_docs.write_text(_jsonl([{"text": ""}, {"text": "  "}]), encoding="utf-8")
    with pytest.raises(QuicksilverError, match="is empty"):
        load_jsonl(blank_docs)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(_jsonl(ROWS).encode())[:20])
    with pytest.raises(QuicksilverError, match="cannot read"):
        load_jsonl(corrupt)


def test_jsonl_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(QuicksilverError, match="JSONL file .* is a directory"):
        load_jsonl(tmp_path)


@pytest.mark.parametrize("compress", [False, True])
def test_jsonl_not_utf8_names_the_line(tmp_path: Path, compress: bool) -> None:
    data = _jsonl(ROWS[:2]).encode() + b'{"text": "caf\xe9"}\n'
    path = tmp_path / ("bad.jsonl.gz" if compress else "bad.jsonl")
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(
        QuicksilverError, match=r"line 3: not valid UTF-8 \(byte 0xe9 at column 14\)"
    ):
        load_jsonl(path)


@pytest.mark.parametrize(
    "line, kind", [("[1, 2]", "list"), ('"just text"', "str"), ("42", "int"), ("null", "NoneType")]
)
def test_jsonl_line_that_is_not_an_object(tmp_path: Path, line: str, kind: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(_jsonl(ROWS[:1]) + line + "\n", encoding="utf-8")
    with pytest.raises(QuicksilverError) as error:
        load_jsonl(path)
    assert f"line 2: expected a JSON object with a 'text' field, got {kind}" in str(error.value)


def test_jsonl_unusable_json(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "a", "n": ' + "9" * 5000 + "}\n", encoding="utf-8")
    with pytest.raises(QuicksilverError, match="line 1: not usable JSON"):
        load_jsonl(path)


def test_jsonl_windows_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(_jsonl(ROWS).replace("\n", "\r\n").encode())
    assert load_jsonl(path).text == "first doc\n\nsecond doc\n\nthird doc"


def test_jsonl_field_must_be_a_name(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(_jsonl(ROWS), encoding="utf-8")
    with pytest.raises(QuicksilverError, match="field must be a name"):
        load_jsonl(path, field=3)  # type: ignore[arg-type]


def test_jsonl_field_with_an_unpaired_surrogate_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 escape"}\n', encoding="utf-8")
    with pytest.raises(QuicksilverError, match=r"line 2: field 'text' holds an unpaired"):
        load_jsonl(path, "text")
