"""Evaluation text: WikiText and C4 from local files (or the Hugging Face hub), plus user files.

Every loader returns one `EvalText`: the exact string that gets tokenised and scored, together with
the byte and word counts needed to turn a total log-likelihood into bits-per-byte or word
perplexity. Building the string the same way as the reference recipes is what makes our numbers
comparable with published ones, so the construction rules are spelled out below.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from quicksilver.errors import QuicksilverError

_GZIP_MAGIC = b"\x1f\x8b"
# A WikiText article title: " = Title = " (section headings are " = = Heading = = ").
_ARTICLE_TITLE = re.compile(r" = [^=].* = ")
# How many C4 validation documents to stream from the hub when there is no local sample.
C4_HUB_DOCUMENTS = 1000


@dataclass(frozen=True)
class EvalText:
    """One evaluation stream and the units needed to normalise its loss.

    `n_words` follows lm-evaluation-harness: ``len(re.split(r"\\s+", text))``. That counts a leading
    or trailing empty string when the text starts or ends with whitespace; we keep the convention
    anyway so word perplexities match the harness.
    """

    name: str  # e.g. "wikitext-2/test", "c4/validation-sample", "file:foo.txt"
    text: str  # the whole stream that is tokenised and scored
    n_bytes: int  # len(text.encode("utf-8"))
    n_words: int  # len(re.split(r"\s+", text)), the lm-evaluation-harness convention
    n_documents: int  # documents (WikiText: articles) at least partly present in `text`


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named evaluation set lives on disk and on the Hugging Face hub."""

    description: str
    kind: str  # "wikitext" (raw one-line-per-row file) or "jsonl" (one document per line)
    local: dict[str, tuple[str, ...]]  # split -> paths under the data dir; the first present wins
    hub: dict[str, tuple[str, str, str]]  # split -> (hub dataset, config, hub split)


DATASETS: dict[str, DatasetSpec] = {
    "wikitext-2": DatasetSpec(
        description="WikiText-2 raw, scored as the raw file, verbatim",
        kind="wikitext",
        local={
            "test": ("wikitext-2-raw/wiki.test.raw",),
            "validation": ("wikitext-2-raw/wiki.valid.raw",),
        },
        hub={
            "test": ("wikitext", "wikitext-2-raw-v1", "test"),
            "validation": ("wikitext", "wikitext-2-raw-v1", "validation"),
        },
    ),
    # WikiText-103 shares its test and validation articles with WikiText-2 (only the training
    # split is larger), so the WikiText-2 raw files stand in when there is no wikitext-103-raw dir.
    "wikitext-103": DatasetSpec(
        description="WikiText-103 raw test/validation (same articles as WikiText-2)",
        kind="wikitext",
        local={
            "test": ("wikitext-103-raw/wiki.test.raw", "wikitext-2-raw/wiki.test.raw"),
            "validation": ("wikitext-103-raw/wiki.valid.raw", "wikitext-2-raw/wiki.valid.raw"),
        },
        hub={
            "test": ("wikitext", "wikitext-103-raw-v1", "test"),
            "validation": ("wikitext", "wikitext-103-raw-v1", "validation"),
        },
    ),
    # Locally a 1,000-document sample of C4 (en) validation; from the hub, the first 1,000
    # documents of the validation stream. They are different sets, so they get different names.
    "c4": DatasetSpec(
        description="C4 (en) validation, 1,000 documents joined with blank lines",
        kind="jsonl",
        local={"validation": ("c4/c4-validation-sample-1000.jsonl.gz",)},
        hub={"validation": ("allenai/c4", "en", "validation")},
    ),
}


def default_data_dir() -> Path:
    """Where evaluation data lives: $QUICKSILVER_DATA_DIR, else ../shared/data next to the repo,
    else ./data. The shared directory keeps large text files out of the repository."""
    env = os.environ.get("QUICKSILVER_DATA_DIR")
    if env:
        return Path(env).expanduser()
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path("data")


def load_eval_text(
    name: str,
    split: str = "test",
    *,
    data_dir: Path | None = None,
    max_documents: int | None = None,
    max_chars: int | None = None,
) -> EvalText:
    """Load a named evaluation set (see `DATASETS`) from `data_dir`, or the hub as a fallback.

    WikiText is scored as the raw file, byte for byte (1,290,590 bytes for WikiText-2 test).
    That is the stream behind the reference figure transformers gives for our default model
    (ppl 20.666 over 303,414 tokens, context 1024, stride 512). The Hugging Face perplexity
    guide instead joins the hub rows with blank lines, which adds about 9,000 newlines and
    gives a different number. `max_documents` keeps the first N
    articles (WikiText) or documents (C4); `max_chars` then trims the text at a word boundary.
    """
    spec = DATASETS.get(name)
    if spec is None:
        known = ", ".join(sorted(DATASETS))
        raise QuicksilverError(
            f"unknown dataset {name!r}; known datasets: {known} (or pass a text or JSONL file)"
        )
    if split not in spec.local:
        splits = ", ".join(spec.local)
        raise QuicksilverError(f"dataset {name!r} has no split {split!r}; valid splits: {splits}")
    _check_limits(max_documents, max_chars)

    root = _as_path(data_dir, "data directory") if data_dir is not None else default_data_dir()
    if root.exists() and not root.is_dir():
        raise QuicksilverError(f"data directory {root} is a file; pass the directory holding it")
    candidates = [root / rel for rel in spec.local[split]]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return _load_from_hub(name, split, spec, candidates, max_documents, max_chars)
    if spec.kind == "wikitext":
        return _wikitext_text(f"{name}/{split}", _read_lines(path), max_documents, max_chars)
    loaded = load_jsonl(path, max_documents=max_documents, max_chars=max_chars)
    return replace(loaded, name=f"{name}/{split}-sample")


def load_text_file(path: str | Path, *, max_chars: int | None = None) -> EvalText:
    """Load a UTF-8 text file as one document, byte for byte (line endings are not rewritten)."""
    path = _existing_file(path, "text file")
    _check_limits(None, max_chars)
    text = _decode_utf8(path, _read_bytes(path, "text file"))
    return _build(f"file:{path}", [text], [0], max_chars)


def load_jsonl(
    path: str | Path,
    field: str = "text",
    *,
    max_documents: int | None = None,
    max_chars: int | None = None,
) -> EvalText:
    """Load one document per JSONL line (gzip-compressed or not), joined with blank lines.

    Blank lines are skipped. Compression is detected from a ".gz" suffix or the gzip magic bytes,
    so a misnamed file still loads.
    """
    _check_limits(max_documents, max_chars)
    docs = read_jsonl_documents(path, field, max_documents)
    return _build(f"file:{path}", docs, range(len(docs)), max_chars)


def read_jsonl_documents(
    path: str | Path, field: str = "text", max_documents: int | None = None
) -> list[str]:
    """The ``field`` of each non-blank line of a JSONL file (gzip-compressed or not).

    Lines are decoded one by one, so an invalid UTF-8 byte is reported with its line.
    """
    path = _existing_file(path, "JSONL file")
    if not isinstance(field, str):
        raise QuicksilverError(f"the JSONL field must be a name, got {type(field).__name__}")
    _check_limits(max_documents, None)
    docs: list[str] = []
    try:
        with _open_maybe_gzip(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if max_documents is not None and len(docs) >= max_documents:
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise QuicksilverError(
                        f"{path}, line {line_no}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                        f"at column {exc.start + 1}); convert the file to UTF-8"
                    ) from None
                if line.strip():
                    docs.append(_jsonl_field(path, line_no, line, field))
    except (OSError, EOFError, zlib.error) as exc:
        raise QuicksilverError(f"cannot read JSONL file {path}: {exc}") from exc
    return docs


# ---------------------------------------------------------------------------------------------


def _check_limits(max_documents: int | None, max_chars: int | None) -> None:
    """Reject limits that would silently produce nonsense (negative slices, empty text)."""
    for label, value in (("max_documents", max_documents), ("max_chars", max_chars)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise QuicksilverError(f"{label} must be a positive integer, got {value!r}")


def _as_path(path: Any, what: str) -> Path:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text or "\0" in text:
        raise QuicksilverError(f"{what} must be a file name, got {path!r}")
    return Path(text)


def _existing_file(path: Any, what: str) -> Path:
    """``path`` as a Path if it names a readable regular file; else a clear error."""
    path = _as_path(path, what)
    if path.is_dir():
        raise QuicksilverError(f"{what} {path} is a directory; pass a file inside it")
    if not path.exists():
        raise QuicksilverError(f"{what} not found: {path}")
    if not path.is_file():
        raise QuicksilverError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    return path


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise QuicksilverError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _decode_utf8(path: Path, data: bytes) -> str:
    """``data`` as text, or an error that says where the first non-UTF-8 byte is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise QuicksilverError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, "
            f"line {line}); convert it to UTF-8 (e.g. with iconv)"
        ) from None


def _read_lines(path: Path) -> list[str]:
    """Read lines the way the hub's WikiText builder did (text mode: universal newlines,
    split on newlines only)."""
    text = _decode_utf8(path, _read_bytes(path, "file"))
    return io.StringIO(text, newline=None).readlines()


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    """Open a file for reading lines of bytes, transparently decompressing gzip."""
    with open(path, "rb") as f:
        is_gzip = path.name.endswith(".gz") or f.read(2) == _GZIP_MAGIC
    if is_gzip:
        return gzip.open(path, "rb")
    return open(path, "rb")


def _jsonl_field(path: Path, line_no: int, line: str, field: str) -> str:
    """Parse one JSONL line and return its text field, with errors that point at the line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QuicksilverError(f"{path}, line {line_no}: not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 10,000 digits
        raise QuicksilverError(f"{path}, line {line_no}: not usable JSON ({exc})") from None
    if not isinstance(row, dict):
        raise QuicksilverError(
            f"{path}, line {line_no}: expected a JSON object with a {field!r} field, "
            f"got {type(row).__name__}"
        )
    if field not in row:
        raise QuicksilverError(f"{path}, line {line_no}: no {field!r} field in the JSON object")
    value = row[field]
    if not isinstance(value, str):
        kind = type(value).__name__
        raise QuicksilverError(f"{path}, line {line_no}: field {field!r} is a {kind}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may escape lone surrogates, e.g. "\ud800"
        raise QuicksilverError(
            f"{path}, line {line_no}: field {field!r} holds an unpaired surrogate escape at "
            f"character {exc.start}; it is not text"
        ) from None
    return value


def _wikitext_text(
    name: str, lines: Sequence[str], max_documents: int | None, max_chars: int | None
) -> EvalText:
    """The raw WikiText file, verbatim, from its lines (or from hub rows, which store the raw
    file's blank lines " \n" as "")."""
    rows = [line if line.strip() else " \n" for line in lines]
    titles = _article_titles([row if row.strip() else "" for row in rows])
    if max_documents is not None and max_documents < len(titles):
        rows = rows[: titles[max_documents]]
        titles = titles[:max_documents]
    # Rows before the first title (a blank line) belong to the first article.
    doc_starts = [0, *titles[1:]] if titles else [0]
    return _build(name, rows, doc_starts, max_chars, separator="")


def _article_titles(rows: Sequence[str]) -> list[int]:
    """Row indices of article titles.

    A title is a " = Title = " line between blank rows. The neighbour check matters: two
    equation lines in the test split's "Constant k filter" article also fit the pattern.
    """
    titles = []
    for i, row in enumerate(rows):
        if not _ARTICLE_TITLE.fullmatch(row.rstrip("\n")):
            continue
        blank_before = i == 0 or rows[i - 1] == ""
        blank_after = i + 1 == len(rows) or rows[i + 1] == ""
        if blank_before and blank_after:
            titles.append(i)
    return titles


def _build(
    name: str,
    parts: Sequence[str],
    doc_starts: Sequence[int],
    max_chars: int | None,
    separator: str = "\n\n",
) -> EvalText:
    """Join `parts` with `separator`, apply `max_chars`, and count what survived.

    `doc_starts` are indices into `parts` where documents begin, so the document count stays
    right after truncation.
    """
    text = separator.join(parts)
    step = len(separator)
    offsets = list(itertools.accumulate((len(p) + step for p in parts[:-1]), initial=0))
    if max_chars is not None:
        text = _truncate(text, max_chars)
    if not text.strip():
        raise QuicksilverError(f"evaluation text {name} is empty (check the file and limits)")
    return EvalText(
        name=name,
        text=text,
        n_bytes=len(text.encode("utf-8")),
        n_words=len(re.split(r"\s+", text)),
        n_documents=sum(1 for i in doc_starts if offsets[i] < len(text)),
    )


def _truncate(text: str, max_chars: int) -> str:
    """Cut to at most `max_chars` characters at a whitespace, so no word is split in half.

    If there is no whitespace at all before the limit, cut hard at the limit.
    """
    if len(text) <= max_chars:
        return text
    # text[i] is the first character dropped; stop at the largest i where it is whitespace.
    for i in range(max_chars, 0, -1):
        if text[i].isspace():
            return text[:i]
    return text[:max_chars]


def _load_from_hub(
    name: str,
    split: str,
    spec: DatasetSpec,
    candidates: Sequence[Path],
    max_documents: int | None,
    max_chars: int | None,
) -> EvalText:
    """Fallback when the local file is missing; any failure becomes one actionable message."""
    hub_name, config, hub_split = spec.hub[split]
    try:
        import datasets
    except ImportError:
        raise QuicksilverError(
            _missing_message(name, split, candidates, "the `datasets` package is not installed")
        ) from None
    try:
        if spec.kind == "wikitext":
            rows = list(datasets.load_dataset(hub_name, config, split=hub_split)["text"])
            return _wikitext_text(f"{name}/{split}", rows, max_documents, max_chars)
        limit = C4_HUB_DOCUMENTS if max_documents is None else min(max_documents, C4_HUB_DOCUMENTS)
        stream = datasets.load_dataset(hub_name, config, split=hub_split, streaming=True)
        docs = [row["text"] for row in itertools.islice(stream, limit)]
    except Exception as exc:  # network, auth, missing config, ...: all mean "no data"
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        reason = f"loading {hub_name} ({config}) from the Hugging Face hub failed ({detail})"
        raise QuicksilverError(_missing_message(name, split, candidates, reason)) from exc
    return _build(f"{name}/{split}-first{limit}", docs, range(len(docs)), max_chars)


def _missing_message(name: str, split: str, candidates: Sequence[Path], reason: str) -> str:
    """One line naming what was looked for and how to fix it."""
    looked = " or ".join(str(p) for p in candidates)
    return (
        f"{name} {split} data not found at {looked}, and {reason}. Fix: set QUICKSILVER_DATA_DIR "
        f"(or pass --data-dir) to a directory containing {DATASETS[name].local[split][-1]}, or "
        f"install `datasets` (pip install 'quicksilver-llm[datasets]') and allow network access."
    )
