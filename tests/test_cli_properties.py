"""The command line under arbitrary input: whatever the flags, numbers (any sign or size, NaN,
infinities), strings (undecodable command-line bytes included) and file contents, every
subcommand ends with exit code 0, 1 or 2 and either its results or exactly one ``error:``
line on stderr. Never a traceback, an exception escaping ``main``, or an error that the CLI
itself labels as a bug.

Each run is in-process (``main`` with capsys) on a tiny random Llama with a byte-level
tokenizer, so a run that passes every check still costs milliseconds; values that would make
a valid run long (many repeats, mid-sized batches) are left out of the strategies, while
huge ones, which must be refused before any work, are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_models import save_tiny, tiny_llama

from quicksilver.bench import throughput
from quicksilver.cli import main
from quicksilver.cli.console import MAX_ERROR_CHARS
from quicksilver.cli.main import BUG_HINT
from quicksilver.policies import PRESETS, REGISTRY

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
COMMANDS = ("generate", "eval", "calibrate", "eval-gen", "policies", "bench", "models")

# ---------------------------------------------------------------- values

# Bytes of a command line that are not UTF-8 reach Python as lone surrogates (surrogateescape).
ARGV_CHAR = st.one_of(
    st.characters(exclude_characters="\0"),
    st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
)
TEXT = st.text(ARGV_CHAR, max_size=30)
# Small values a valid run can afford, huge ones that must be refused up front, negatives.
INTEGER = st.one_of(st.integers(-3, 6), st.integers(2**40, 2**80), st.integers(-(2**80), -4)).map(
    str
)
NUMBER = st.one_of(
    INTEGER,
    st.floats().map(repr),
    st.sampled_from(["nan", "-inf", "inf", "1e-45", "1e-300", "1e400", "-0.0", "0.5", "1%"]),
)
INT_FLAG = st.one_of(INTEGER, INTEGER, TEXT)
NUMBER_FLAG = st.one_of(NUMBER, NUMBER, TEXT)
PARAMETERS = sorted({p for cls in REGISTRY.values() for p, _, _ in cls.parameters()})
MECHANISMS = [*REGISTRY, "warp"]
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=20),
)
POLICY_CONFIG = st.dictionaries(
    st.sampled_from(MECHANISMS),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(PARAMETERS), SCALAR, max_size=3)),
    max_size=3,
)
SET_ITEM = st.one_of(
    st.builds(
        "{}.{}={}".format,
        st.sampled_from(MECHANISMS),
        st.sampled_from(PARAMETERS),
        st.one_of(NUMBER, TEXT),
    ),
    TEXT,
)
DTYPE = st.one_of(st.sampled_from(["float32", "bfloat16", "float16", "bf16", "int8"]), TEXT)
# Text and prompt files: any bytes, or UTF-8 text (mostly words, so prompts can be found).
WORDS = st.lists(
    st.sampled_from(["The", "river", "town", "grew.", "It", "had", "a", "market.", "\n", "é"]),
    max_size=60,
).map(" ".join)
FILE_BYTES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    WORDS.map(str.encode),
    WORDS.map(str.encode),
    WORDS.map(str.encode),
)
JSONL_BYTES = st.one_of(
    FILE_BYTES,
    st.lists(
        st.fixed_dictionaries({}, optional={"text": SCALAR | WORDS, "prompt": SCALAR | WORDS}),
        max_size=4,
    ).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
)
POLICY_BYTES = st.one_of(
    st.binary(max_size=200),
    POLICY_CONFIG.map(lambda c: yaml.safe_dump(c).encode(errors="surrogateescape")),
    POLICY_CONFIG.map(lambda c: json.dumps(c).encode(errors="surrogateescape")),
)


# ---------------------------------------------------------------- the world a run sees

GOOD_TEXT = (
    "The town grew up around a ford on the river where the old road crossed. It had a market.\n"
    "The castle was slighted after the civil war but the church survives today. It is old.\n"
)


class Files:
    """The tiny model and the files a run may read or write, rewritten for every example."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = str(save_tiny(tiny_llama(), root / "model", with_tokenizer=True))
        self.empty_dir = root / "empty"
        self.empty_dir.mkdir()
        self.text = root / "text.txt"
        self.prompts = root / "prompts.txt"
        self.jsonl = root / "data.jsonl"
        self.policy_yaml = root / "policy.yaml"
        self.policy_json = root / "policy.json"
        # Inputs that always work, written once, so that valid runs are common too.
        self.good_text = root / "good.txt"
        self.good_text.write_text(GOOD_TEXT, encoding="utf-8")
        self.good_prompts = root / "good.jsonl"
        rows = [{"prompt": line.split(".")[0]} for line in GOOD_TEXT.splitlines() if line]
        self.good_prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")

    def write(self, data: st.DataObject) -> None:
        self.text.write_bytes(data.draw(FILE_BYTES, label="text file"))
        self.prompts.write_bytes(data.draw(FILE_BYTES, label="prompt file"))
        self.jsonl.write_bytes(data.draw(JSONL_BYTES, label="jsonl file"))
        self.policy_yaml.write_bytes(data.draw(POLICY_BYTES, label="policy.yaml"))
        self.policy_json.write_bytes(data.draw(POLICY_BYTES, label="policy.json"))

    def outputs(self, suffix: str = ".json") -> st.SearchStrategy[str]:
        """Where --json / --output may point: new files, the run's inputs, a directory,
        a missing directory, nonsense."""
        paths = [self.root / f"out{suffix}", self.root / "out.yaml", self.root / "out.txt"]
        paths += [self.text, self.prompts, self.jsonl, self.policy_yaml, self.policy_json]
        paths += [self.empty_dir, self.root / "missing" / f"out{suffix}"]
        return st.one_of(st.sampled_from([str(p) for p in paths]), TEXT)

    def policies(self) -> st.SearchStrategy[str]:
        files = [str(self.policy_yaml), str(self.policy_json), str(self.empty_dir)]
        return st.one_of(st.sampled_from([*PRESETS, *files]), TEXT)

    def sources(self) -> st.SearchStrategy[list[str]]:
        """Where text comes from; never the real WikiText-2 (too slow for a property)."""
        return st.sampled_from(
            [
                ["--text-file", str(self.good_text)],
                ["--jsonl", str(self.good_prompts), "--field", "prompt"],
                ["--text-file", str(self.text)],
                ["--jsonl", str(self.jsonl)],
                ["--data-dir", str(self.empty_dir)],
                ["--dataset", "c4", "--data-dir", str(self.empty_dir)],
            ]
        )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    """The files, run from their directory (a drawn output name is a relative path: it must
    land there, never in the repository), with the machine-limit measurements of `bench`
    made instant (they take seconds on purpose; what is checked here is everything else)."""
    root = tmp_path_factory.mktemp("cli_properties")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(throughput, "measure_memory_bandwidth", lambda: 1e10)
        patch.setattr(throughput, "measure_matmul_flops", lambda dtype: 1e11)
        yield Files(root)


def draw_flags(data: st.DataObject, options: dict[str, st.SearchStrategy]) -> list[str]:
    """A random subset of ``options`` in random order, each with a drawn value (None: a
    switch; a list: several values)."""
    # A few flags at a time: with many, nearly every run stops at its first bad value.
    flags = st.lists(st.sampled_from(sorted(options)), unique=True, max_size=4)
    names = data.draw(flags, label="flags")
    argv: list[str] = []
    for name in names:
        value = data.draw(options[name], label=name)
        argv += (
            [name]
            if value is None
            else [name, *value]
            if isinstance(value, list)
            else [name, value]
        )
    return argv


def common_flags(files: Files) -> dict[str, st.SearchStrategy]:
    return {
        "--model": st.one_of(st.just(files.model), TEXT),
        "--threads": INT_FLAG,
        "--json": files.outputs(),
        "--dtype": DTYPE,
    }


def policy_flags(files: Files, target_speedup: bool = False) -> dict[str, st.SearchStrategy]:
    flags = {"--policy": files.policies(), "--set": SET_ITEM}
    if target_speedup:
        flags["--target-speedup"] = NUMBER_FLAG
    return flags


def text_flags(files: Files) -> dict[str, st.SearchStrategy]:
    return {
        "--field": st.one_of(st.sampled_from(["text", "prompt"]), TEXT),
        "--split": st.one_of(st.sampled_from(["test", "validation"]), TEXT),
        "--max-chars": INT_FLAG,
        "--dataset": st.one_of(st.sampled_from(["wikitext-2", "c4"]), TEXT),
        "--data-dir": st.one_of(st.just(str(files.empty_dir)), TEXT),
    }


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` with the outcome checked: an exit code the CLI documents, results or
    one error line that is not a bug report, nothing that looks like a traceback."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in out + err, (argv, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    event(f"exit {code}" + (f": {' '.join(errors[0].split()[1:3])}" if errors else ""))
    if code == 2:
        assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], (argv, err)
        assert len(errors[0]) <= len("error: ") + MAX_ERROR_CHARS, errors[0]
        assert BUG_HINT not in errors[0], (argv, errors[0])
    else:
        assert not errors, (argv, err)
    return code, out, err


def check_json(argv: list[str], code: int) -> None:
    """A successful run that was given --json (the last one counts) wrote strict JSON there."""
    if code == 2 or "--json" not in argv:
        return
    path = Path(argv[len(argv) - 1 - argv[::-1].index("--json") + 1])
    json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the properties


@SETTINGS
@given(data=st.data())
def test_generate(files: Files, data: st.DataObject, capsys: pytest.CaptureFixture[str]) -> None:
    files.write(data)
    base = ["generate", "--model", files.model, "--prompt", "The river", "--max-new-tokens", "3"]
    base += ["--threads", "1"]
    options = {
        **common_flags(files),
        **policy_flags(files, target_speedup=True),
        "--prompt": st.one_of(TEXT, st.just("town")),
        "--prompt-file": st.sampled_from([str(files.prompts), str(files.empty_dir), "nope.txt"]),
        "--max-new-tokens": INT_FLAG,
        "--temperature": NUMBER_FLAG,
        "--top-k": INT_FLAG,
        "--top-p": NUMBER_FLAG,
        "--seed": INT_FLAG,
        "--chat": st.none(),
    }
    argv = base + draw_flags(data, options)
    code, out, _ = run(argv, capsys)
    if code == 0:
        assert out.strip() or "--json" in argv or out == "\n", argv
    check_json(argv, code)


@SETTINGS
@given(data=st.data())
def test_eval(files: Files, data: st.DataObject, capsys: pytest.CaptureFixture[str]) -> None:
    files.write(data)
    base = ["eval", "--model", files.model, "--context", "16", "--stride", "8", "--no-progress"]
    base += ["--threads", "1"]
    source = data.draw(files.sources(), label="source")
    options = {
        **common_flags(files),
        **policy_flags(files),
        **text_flags(files),
        "--context": INT_FLAG,
        "--stride": INT_FLAG,
        "--batch-size": INT_FLAG,
        "--max-windows": INT_FLAG,
        "--compare": st.one_of(st.just("transformers"), TEXT),
    }
    argv = base + source + draw_flags(data, options)
    code, out, _ = run(argv, capsys)
    if code == 0:
        assert "perplexity" in out
    check_json(argv, code)


@SETTINGS
@given(data=st.data())
def test_eval_gen(files: Files, data: st.DataObject, capsys: pytest.CaptureFixture[str]) -> None:
    files.write(data)
    base = ["eval-gen", "--model", files.model, "--batch-sizes", "1", "2"]
    base += ["--max-new-tokens", "2", "--prompts", "2", "--threads", "1"]
    source = data.draw(files.sources(), label="source")
    options = {
        **common_flags(files),
        **policy_flags(files, target_speedup=True),
        **text_flags(files),
        "--prompts": INT_FLAG,
        "--max-new-tokens": INT_FLAG,
        "--batch-sizes": st.lists(INT_FLAG, min_size=1, max_size=3),
    }
    argv = base + source + draw_flags(data, options)
    code, out, _ = run(argv, capsys)
    if code == 0:
        assert "ROUGE-L" in out
    check_json(argv, code)


@SETTINGS
@given(data=st.data())
def test_calibrate(files: Files, data: st.DataObject, capsys: pytest.CaptureFixture[str]) -> None:
    files.write(data)
    measure = data.draw(st.sampled_from(["perplexity", "generation"]), label="measure")
    base = ["calibrate", "--model", files.model, "--measure", measure, "--steps", "1"]
    base += ["--threads", "1"]
    base += ["--output", str(files.root / "chosen.json"), "--max-ppl-increase", "5%"]
    base += ["--set", "halting.relative_drift=0.2", "--set", "halting.min_layer=1"]
    if measure == "perplexity":
        base += ["--context", "16", "--stride", "8", "--max-windows", "2"]
    else:
        base += ["--prompts", "2", "--max-new-tokens", "2"]
    source = data.draw(files.sources(), label="source")
    options = {
        **common_flags(files),
        **policy_flags(files),
        **text_flags(files),
        "--output": files.outputs(),
        "--max-ppl-increase": NUMBER_FLAG,
        "--flop-fraction": NUMBER_FLAG,
        "--measure": st.one_of(st.sampled_from(["perplexity", "generation"]), TEXT),
        "--context": INT_FLAG,
        "--stride": INT_FLAG,
        "--batch-size": INT_FLAG,
        "--max-windows": INT_FLAG,
        "--prompts": INT_FLAG,
        "--max-new-tokens": INT_FLAG,
        "--steps": st.one_of(st.integers(-2, 2).map(str), st.integers(53, 2**70).map(str), TEXT),
    }
    argv = base + source + draw_flags(data, options)
    code, out, _ = run(argv, capsys)
    if code in (0, 1):
        assert "chosen:" in out
    check_json(argv, code)


@SETTINGS
@given(data=st.data())
def test_bench(files: Files, data: st.DataObject, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bench", "--model", files.model, "--batch-sizes", "1", "--prompt-tokens", "4"]
    base += ["--new-tokens", "2", "--repeats", "1", "--no-progress", "--threads", "1"]
    # A valid run is measured: its batch sizes and repeats stay small (huge batch sizes
    # must be refused for memory; huge repeats would be honoured, for ever).
    batch_sizes = st.one_of(st.integers(-3, 3).map(str), st.integers(2**40, 2**80).map(str), TEXT)
    repeats = st.one_of(st.integers(-3, 3).map(str), TEXT)
    options = {
        **common_flags(files),
        "--batch-sizes": st.lists(batch_sizes, min_size=1, max_size=3),
        "--prompt-tokens": INT_FLAG,
        "--new-tokens": INT_FLAG,
        "--repeats": repeats,
        "--compare": st.one_of(st.just("transformers"), TEXT),
    }
    argv = base + draw_flags(data, options)
    code, out, _ = run(argv, capsys)
    if code == 0:
        assert "decode tok/s" in out
    check_json(argv, code)


@pytest.mark.usefixtures("files")  # run from its directory, like every property
@SETTINGS
@given(command=st.sampled_from(["policies", "models"]), extra=st.lists(TEXT, max_size=3))
def test_listings(command: str, extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([command, *extra], capsys)
    if code == 0:
        assert out.strip()


@pytest.mark.usefixtures("files")
@SETTINGS
@given(argv=st.lists(TEXT, max_size=4).filter(lambda a: not a or a[0] not in COMMANDS))
def test_any_command_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Arbitrary words: help (exit 0) or a usage error, never a run of the default model."""
    run(argv, capsys)
