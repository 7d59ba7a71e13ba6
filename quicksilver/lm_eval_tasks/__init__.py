"""Offline lm-evaluation-harness tasks: ``qs_facts_mc`` (multiple choice from the JSONL beside
this file) and ``qs_wikitext2_doc`` (WikiText-2 test, one document per article).

Task YAMLs name their data files by absolute path, which only exists on the machine that
runs them, so ``prepare_tasks`` writes runnable copies into a directory (filling in the
paths and, for WikiText, the documents) that the harness then reads with ``--include_path``.
Nothing here touches the network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from quicksilver.errors import QuicksilverError
from quicksilver.eval.datasets import DATASETS, default_data_dir

HERE = Path(__file__).resolve().parent
TASKS = ("qs_facts_mc", "qs_wikitext2_doc")
_TITLE = re.compile(r" = [^=].*[^=] = ")


def wikitext_raw_path(data_dir: str | Path | None = None, split: str = "test") -> Path:
    """The raw WikiText-2 file of ``split`` under the data directory quicksilver eval uses."""
    root = Path(data_dir) if data_dir else default_data_dir()
    path = root / DATASETS["wikitext-2"].local[split][0]
    if not path.is_file():
        raise QuicksilverError(
            f"WikiText-2 {split} not found at {path}; pass --wikitext-raw FILE or set "
            "QUICKSILVER_DATA_DIR to the directory holding wikitext-2-raw/"
        )
    return path


def wikitext_documents(lines: Sequence[str]) -> list[str]:
    """The raw file cut into articles at their " = Title = " lines (a title stands between
    blank lines; section titles have two or more "=" and stay inside their article). Each
    article keeps its lines verbatim, from its title to the next article's."""
    starts = [
        i
        for i, line in enumerate(lines)
        if _TITLE.fullmatch(line.rstrip("\n"))
        and (i == 0 or not lines[i - 1].strip())
        and (i + 1 == len(lines) or not lines[i + 1].strip())
    ]
    if not starts:
        return ["".join(lines)] if "".join(lines).strip() else []
    starts[0] = 0  # the blank line before the first title belongs to the first article
    ends = [*starts[1:], len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(starts, ends, strict=True)]


def write_wikitext_documents(raw: str | Path, out: Path, max_documents: int | None = None) -> int:
    """Write the articles of a raw WikiText file as JSONL ``{"page": ...}``; return how many."""
    try:
        lines = Path(raw).read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as err:
        raise QuicksilverError(f"cannot read WikiText file {raw}: {err}") from None
    documents = wikitext_documents(lines)[:max_documents]
    if not documents:
        raise QuicksilverError(f"{raw} holds no WikiText articles")
    with open(out, "w", encoding="utf-8") as f:
        for page in documents:
            f.write(json.dumps({"page": page}) + "\n")
    return len(documents)


def prepare_tasks(
    out_dir: str | Path,
    *,
    wikitext_raw: str | Path | None = None,
    wikitext_documents_limit: int | None = None,
) -> Path:
    """Write runnable copies of the task YAMLs (and their data) into ``out_dir``; return it.

    The WikiText task is written only when its raw file is found (``wikitext_raw``, else the
    shared data directory); the multiple-choice task always is.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = out / "qs_facts_mc.jsonl"
    facts.write_text((HERE / "qs_facts_mc.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    _write_yaml("qs_facts_mc", out, {"__QS_TASK_DIR__": str(out)})
    try:
        raw = Path(wikitext_raw) if wikitext_raw else wikitext_raw_path()
    except QuicksilverError:
        return out
    docs = out / "qs_wikitext2_doc.jsonl"
    write_wikitext_documents(raw, docs, wikitext_documents_limit)
    _write_yaml("qs_wikitext2_doc", out, {"__QS_WIKITEXT_DOCS__": str(docs)})
    return out


def _write_yaml(task: str, out: Path, values: dict[str, str]) -> None:
    text = (HERE / f"{task}.yaml").read_text(encoding="utf-8")
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    (out / f"{task}.yaml").write_text(text, encoding="utf-8")
