"""The command line: bad input fails fast with one `error:` line, and the happy paths write the
JSON fields that downstream tools read. Happy paths run the real default model, kept short."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from quicksilver.cli import main
from quicksilver.cli import models as models_command
from quicksilver.cli.checks import set_threads
from quicksilver.cli.console import MAX_ERROR_CHARS
from quicksilver.cli.main import BUG_HINT
from quicksilver.errors import QuicksilverError
from quicksilver.outputs import write_json_atomic

TEXT = (
    "The town grew up around a ford on the river, where the old road from the coast crossed "
    "on its way to the hills. By the twelfth century it had a market, a church and a castle, "
    "and its wool trade made several families rich. The castle was slighted after the civil "
    "war, but the church survives, together with a number of timber-framed houses on the "
    "high street. Today the town is known for its annual fair, which has been held every "
    "autumn since the fourteenth century, and for the walks along the river valley.\n"
)


@pytest.fixture
def one_thread():
    """Single-threaded model runs: steadier on a busy 2-core machine; restored afterwards."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting a user error; return the single stderr line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


CALIBRATE_HALTING = ["calibrate", "--output", "x.json", "--max-ppl-increase", "1%"]
CALIBRATE_HALTING += ["--set", "halting.relative_drift=0.2"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--context", "0"], "--context"),
        (["eval", "--stride", "0"], "--stride"),
        (["eval", "--context", "64", "--stride", "65"], "must not exceed --context"),
        (["eval", "--context", "abc"], "invalid int"),
        (["eval", "--dataset", "no-such-set"], "unknown dataset"),
        (["eval", "--dtype", "float64"], "unknown dtype"),
        (["generate", "--prompt", "hi", "--dtype", "int8"], "unknown dtype"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "hi", "--top-p", "0"], "top_p"),
        (["generate"], "--prompt"),
        (["bench", "--batch-sizes", "0"], "--batch-sizes"),
        (["bench", "--compare", "vllm"], "cannot compare"),
        (["eval", "--compare", "vllm"], "cannot compare"),
        (["bench", "--weights", "int3"], "unknown weights"),
        (["generate", "--prompt", "x", "--weights", "float32"], "differs from dtype"),
        (["generate", "--prompt", "x", "--weights", "int4", "--group-size", "48"], "group size"),
        (["no-such-command"], "invalid choice"),
        (["eval", "--policy", "no-such-policy.yaml"], "neither a preset"),
        (["eval-gen", "--batch-sizes", "0"], "--batch-sizes"),
        (["eval-gen", "--target-speedup", "0.5"], "--target-speedup must be >= 1"),
        (["generate", "--prompt", "hi", "--target-speedup", "0"], "--target-speedup"),
        (["eval", "--set", "halting.min_layer"], "mechanism.parameter=value"),
        (["eval", "--set", "warp.speed=9"], "unknown policy 'warp'"),
        (["eval", "--set", "halting.drift=-1"], "halting.drift must be"),
        (["eval", "--set", "halting.drift=fast"], "must be number"),
        (["calibrate", "--policy", "paper", "--output", "x.json"], "exactly one budget"),
        (
            ["calibrate", "--policy", "paper", "--output", "x.json", "--max-ppl-increase", "lots"],
            "number or a percentage",
        ),
        (
            ["calibrate", "--policy", "paper", "--output", "x.json", "--flop-fraction", "1.5"],
            "(0, 1]",
        ),
        (
            ["calibrate", "--policy", "paper", "--output", "x.txt", "--flop-fraction", "0.5"],
            ".json, .yaml or .yml",
        ),
        (
            ["calibrate", "--output", "x.json", "--flop-fraction", "0.5"],
            "no threshold to scale",
        ),
        (
            [*CALIBRATE_HALTING, "--measure", "generation", "--context", "64"],
            "--context applies to --measure perplexity",
        ),
        ([*CALIBRATE_HALTING, "--prompts", "4"], "--prompts applies to --measure generation"),
        (
            [*CALIBRATE_HALTING, "--measure", "generation", "--max-new-tokens", "1"],
            "at least 2",
        ),
        (
            ["calibrate", "--output", "x.json", "--flop-fraction", "0.5", "--measure"]
            + ["generation", "--set", "fusion.threshold=0.3"],
            "needs halting thresholds",
        ),
        (["eval-gen", "--max-new-tokens", "1"], "at least 2"),
        (["eval-gen", "--jsonl", "p.jsonl", "--max-chars", "9"], "--max-chars applies to text"),
    ],
)
def test_bad_arguments(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in run_error(argv, capsys)


def test_missing_model_path(
    tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.gguf")
    line = run_error(["eval", "--model", missing, "--text-file", str(text_file)], capsys)
    assert "not found" in line


def test_empty_text_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out.json"
    line = run_error(["eval", "--text-file", str(empty), "--json", str(out)], capsys)
    assert "empty" in line
    assert not out.exists()  # nothing written on failure


@pytest.mark.parametrize("command", ["eval", "generate", "bench"])
@pytest.mark.parametrize("name", ["no/such/dir/out.json", "no/", "no/such/"])
def test_json_into_missing_directory(
    command: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the model loads, including a directory name (``no/``) that would
    otherwise be written as a file ``no``."""
    if name == "no/such/":
        (tmp_path / "no").mkdir()
    target = f"{tmp_path}/{name}"
    extra = ["--prompt", "hi"] if command == "generate" else []
    line = run_error([command, *extra, "--json", target], capsys)
    assert "does not exist" in line
    assert not (tmp_path / "no").is_file() and not (tmp_path / "no" / "such").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--speculative", "planes"],
        ["--speculative", "planes", "--set", "matryoshka.fixed_bits=4"],
        ["--speculative", "planes", "--policy", "paper"],
        [
            "--speculative",
            "ngram",
            "--set",
            "fusion.threshold=0.5",
            "--set",
            "fusion.start_layer=0",
        ],
    ],
    ids=["planes", "planes_width_4", "planes_paper", "fusion_ngram"],
)
def test_drafting_that_cannot_run_fails_before_any_token(
    extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One error line and nothing on stdout: not a first token streamed, then the error."""
    from tiny_models import save_tiny, tiny_llama

    model = save_tiny(tiny_llama(), tmp_path / "tiny", with_tokenizer=True)
    capsys.readouterr()  # the model writer's own progress bar
    argv = ["generate", "--model", str(model), "--dtype", "float32", "--prompt", "Hello there"]
    code = main([*argv, "--max-new-tokens", "6", *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert ("'planes'" if "planes" in extra else "fusion") in lines[0]


def test_blank_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    assert "no non-empty lines" in run_error(["generate", "--prompt-file", str(prompts)], capsys)


def test_keyboard_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(models_command, "run", interrupted)
    assert main(["models"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_bug_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception the library did not mean for the user still ends as one line, naming
    its type and asking for a report, never as a traceback."""

    def broken(args: object) -> int:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(models_command, "run", broken)
    line = run_error(["models"], capsys)
    assert "ZeroDivisionError: division by zero" in line and BUG_HINT in line


def test_long_errors_are_cut_in_the_middle(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(args: object) -> int:
        raise QuicksilverError("start " + "x" * 10_000 + " how to fix it")

    monkeypatch.setattr(models_command, "run", failing)
    line = run_error(["models"], capsys)
    assert len(line) <= len("error: ") + MAX_ERROR_CHARS
    assert line.startswith("error: start x") and line.endswith(" how to fix it")


def test_library_warnings_are_notes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def warns(args: object) -> int:
        warnings.warn("top_k has no effect", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(models_command, "run", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["models"]) == 0
    assert capsys.readouterr().err.splitlines() == ["note: top_k has no effect"]


def test_threads_are_capped_at_the_cpus(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        set_threads(10**30)
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(threads)
    assert "note: --threads" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--policy"])
def test_an_output_that_is_an_input_is_refused(
    flag: str, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json naming the run's own text (or policy) file would destroy it: refused before any
    work, the file untouched."""
    policy = text_file.with_suffix(".yaml")
    policy.write_text("halting:\n  relative_drift: 0.3\n", encoding="utf-8")
    target = text_file if flag == "--json" else policy
    before = target.read_bytes()
    argv = ["eval", "--text-file", str(text_file), "--policy", str(policy)]
    line = run_error([*argv, "--json", str(target)], capsys)
    assert "same file as the input" in line
    assert target.read_bytes() == before


def test_calibrate_refuses_the_same_file_twice(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*CALIBRATE_HALTING[:-2], "--output", "x.json", "--json", "x.json"]
    assert "same file" in run_error([*argv, *CALIBRATE_HALTING[-2:]], capsys)


def test_nul_in_an_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert "NUL" in run_error(["eval", "--text-file", "a\0b"], capsys)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("quicksilver ")


def test_module_entry_point_exit_code() -> None:
    """A real process: exit status 2 and one stderr line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "quicksilver", "eval", "--stride", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --stride must be a positive integer, got 0"]


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")
    write_json_atomic(path, {"a": 1.5, "b": float("nan"), "c": [float("inf")]})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": None, "c": [None]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_models_lists_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


# ---------------------------------------------------------------- happy paths, real model


def test_generate_json(
    tmp_path: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    argv = ["generate", "--prompt", "Hello", "--max-new-tokens", "4", "--dtype", "float32"]
    assert main([*argv, *one_thread, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    assert data["model"] == "smollm2-135m" and data["dtype"] == "float32"
    assert data["prompts"] == ["Hello"]
    # The record is GenerationOutput.to_dict(): one completion per prompt, with its token ids.
    (completion,) = data["completions"]
    assert len(completion["token_ids"]) == data["new_tokens"]
    assert 1 <= data["new_tokens"] <= 4
    assert completion["text"] in captured.out  # streamed to stdout
    assert data["prefill_seconds"] > 0 and data["flops_per_token"] > 0
    assert "tokens, prefill" in captured.err and "GFLOP/token" in captured.err


def test_eval_json(
    tmp_path: Path, text_file: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    argv = ["eval", "--text-file", str(text_file), "--context", "64", "--stride", "32"]
    assert main([*argv, *one_thread, "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("ppl", "bits_per_byte", "word_ppl", "flops_per_token", "dense_flops_per_token"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["ppl"] > 1 and data["tokens"] > 64 and data["seconds"] > 0
    assert data["n_bytes"] == len(TEXT.encode())
    assert (data["context"], data["stride"], data["dtype"]) == (64, 32, "float32")
    assert data["model"] == "smollm2-135m" and data["dataset"].startswith("file:")
    assert "perplexity" in capsys.readouterr().out


def test_bench_json(
    tmp_path: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    argv = ["bench", "--batch-sizes", "1", "--prompt-tokens", "8", "--new-tokens", "4"]
    assert main([*argv, "--repeats", "1", *one_thread, "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and data["threads"] == 1
    assert data["machine"]["memory_bandwidth_gb_s"] > 0 and data["machine"]["matmul_gflops"] > 0
    (engine,) = data["engines"]  # no --compare: our engine only, in the dtype's format
    assert engine["engine"] == "quicksilver" and engine["weights"]["blocks"] == "bfloat16"
    assert engine["peak_rss_bytes"] > 0 and engine["weight_bytes"] > 0
    row = engine["results"]["1"]
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert row[key] > 0, key
    assert row["prompt_tokens"] == 8 and row["new_tokens"] == 4 and row["compile_seconds"] == 0
    assert set(row["fraction_of_limit"]) >= {"prefill", "decode"}
    assert "quicksilver" in capsys.readouterr().out


def test_bench_speculative_json(
    tmp_path: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench --speculative``: every task row measured, exactness and acceptance reported."""
    out = tmp_path / "spec.json"
    argv = ["bench", "--speculative", "ngram", "--documents", "1", "--prompt-tokens", "24"]
    argv += ["--new-tokens", "6", "--batch-sizes", "1", "--dtype", "float32"]
    assert main([*argv, *one_thread, "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {row["task"] for row in data["rows"]} == {"summarise", "copy", "answer", "continue"}
    for row in data["rows"]:
        assert row["method"] == "ngram" and row["tok_s"] > 0 and row["plain_tok_s"] > 0
        assert row["identical"] == "1/1"  # fp32: verified decoding is exact
    assert data["plan"] is None  # ngram needs no measured plan
    assert "speedup" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bench", "--speculative", "telepathy"], "unknown speculative method"),
        (["bench", "--speculative", "ngram", "--speculative-tokens", "0"], "1..64"),
        (["bench", "--policy", "paper"], "apply to --speculative"),
        (["bench", "--speculative", "ngram", "--weights", "int8", "int4"], "one weight format"),
    ],
)
def test_bench_speculative_bad_options(argv, needle, capsys) -> None:
    assert needle in run_error(argv, capsys)


def test_policies_lists_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in ("halting", "kv_skip", "fusion", "matryoshka", "paper", "relative_drift"):
        assert name in out


def test_eval_with_policy_records_it(
    tmp_path: Path, text_file: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    argv = ["eval", "--text-file", str(text_file), "--context", "64", "--stride", "32"]
    policy = ["--set", "halting.relative_drift=0.3", "--set", "halting.min_layer=10"]
    assert main([*argv, *policy, *one_thread, "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["policy"]["halting"]["relative_drift"] == 0.3
    assert data["policy"]["halting"]["min_layer"] == 10
    # tokens halted: fewer FLOPs were counted than the dense figure for the same windows
    assert data["flops_per_token"] < data["dense_flops_per_token"]
    assert "halting(" in capsys.readouterr().out


def test_calibrate_writes_a_policy_eval_reads(
    tmp_path: Path, text_file: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = tmp_path / "chosen.json"
    argv = ["calibrate", "--text-file", str(text_file), "--context", "64", "--stride", "32"]
    argv += ["--max-windows", "2", "--steps", "1", "--output", str(chosen)]
    argv += ["--set", "halting.relative_drift=0.3", "--set", "halting.min_layer=10"]
    code = main([*argv, "--max-ppl-increase", "5%", *one_thread])
    assert code in (0, 1)  # 1: no factor met the budget; the closest is still written
    record = json.loads(chosen.read_text())
    calibration = record["calibration"]
    assert calibration["budget"] == {"max_ppl_increase": 0.05}
    assert len(calibration["trials"]) >= 2 and calibration["met"] == (code == 0)
    assert "chosen:" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    argv = ["eval", "--text-file", str(text_file), "--context", "64", "--stride", "32"]
    assert (
        main([*argv, "--policy", str(chosen), *one_thread, "--no-progress", "--json", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["policy"] == record["policy"]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    """Two prompts as JSONL, in the `prompt` field."""
    path = tmp_path / "prompts.jsonl"
    rows = ['{"prompt": "The castle was built"}', '{"prompt": "In the spring of that year"}']
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_calibrate_on_generation_measures_continuations(
    tmp_path: Path, prompts: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = tmp_path / "chosen.json"
    argv = ["calibrate", "--measure", "generation", "--jsonl", str(prompts)]
    argv += ["--prompts", "2", "--max-new-tokens", "4", "--steps", "1", "--output", str(chosen)]
    argv += ["--set", "halting.relative_drift=0.3", "--set", "halting.min_layer=20"]
    code = main([*argv, "--max-ppl-increase", "5%", *one_thread])
    assert code in (0, 1)
    calibration = json.loads(chosen.read_text())["calibration"]
    assert calibration["measure"] == "generation"
    assert calibration["prompts"] == 2 and calibration["max_new_tokens"] == 4
    assert calibration["batch_size"] == 8
    assert len(calibration["trials"]) >= 2 and calibration["dense_ppl"] > 1
    assert "(continuations)" in capsys.readouterr().out


def test_generate_with_target_speedup_records_the_schedule(
    tmp_path: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    argv = ["generate", "--prompt", "Hello", "--max-new-tokens", "4", "--target-speedup", "2"]
    assert main([*argv, *one_thread, "--json", str(out)]) == 0
    schedule = json.loads(out.read_text())["policy"]["skipdecode"]
    assert schedule["max_layers"] >= schedule["min_layers"] > schedule["warmup_layers"]
    assert "policy: skipdecode(" in capsys.readouterr().err


def test_eval_gen_json(
    tmp_path: Path, prompts: Path, one_thread: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    argv = ["eval-gen", "--jsonl", str(prompts), "--batch-sizes", "1", "2", "--max-new-tokens"]
    argv += ["3", "--set", "halting.relative_drift=0.3", "--set", "halting.min_layer=20"]
    assert main([*argv, *one_thread, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["prompts"] == ["The castle was built", "In the spring of that year"]
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    for result in data["results"]:
        assert 0 <= result["agreement"] <= 1 and result["dense_ppl_of_dense"] > 1
        assert result["policy_flops_per_token"] < result["dense_flops_per_token"]
    assert "ROUGE-L" in capsys.readouterr().out
