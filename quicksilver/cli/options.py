"""The parser's shared pieces: the one-line error format and the option groups that several
commands share (checked in ``checks`` and read in ``inputs``)."""

from __future__ import annotations

import argparse
from typing import NoReturn

from quicksilver.cli.console import print_error
from quicksilver.eval.datasets import DATASETS
from quicksilver.models.loading import DEFAULT_MODEL, DTYPES


class Parser(argparse.ArgumentParser):
    """argparse with the same one-line ``error:`` format as every other failure."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(2)


def common_options() -> Parser:
    """--model, --threads and --json, which every model-running command takes."""
    common = Parser(add_help=False)
    common.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="short name, .gguf file, HF model dir or hub id (default: %(default)s)",
    )
    common.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads, at most one per CPU (default: torch's choice)",
    )
    common.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return common


def add_dtype(parser: argparse.ArgumentParser, default: str) -> None:
    """--dtype, and how the weights are stored and run (checked by `inputs.check_model_args`)."""
    names = ", ".join(dict.fromkeys(str(d).removeprefix("torch.") for d in DTYPES.values()))
    parser.add_argument("--dtype", default=default, help=f"{names} (default: %(default)s)")
    parser.add_argument(
        "--weights",
        metavar="FORMAT",
        help="linear weights as int8 (per channel), int4 (GGUF Q4 layers load as they are) "
        "or the dtype (default: the dtype)",
    )
    add_format_options(parser)


def add_format_options(parser: argparse.ArgumentParser) -> None:
    """The weight-format details and compilation, shared with `bench`."""
    parser.add_argument(
        "--head-weights",
        metavar="FORMAT",
        help="the LM head's format (default: the blocks', int8 when they are int4)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=32,
        metavar="N",
        help="int4 group size: 32, 64 or 128 (default: %(default)s)",
    )
    parser.add_argument(
        "--adapter",
        metavar="FILE",
        help="an adapter file `quicksilver adapt` wrote for this model (LoRA merged into the "
        "weights before quantisation, or exit heads for the lens signals)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the dense decode step of a single row (slow once, then faster; the "
        "time is reported apart; batches run eager, which is faster for them)",
    )


def add_compare(
    parser: argparse.ArgumentParser, help: str, choices: tuple[str, ...] = ("transformers",)
) -> None:
    parser.add_argument(
        "--compare", nargs="+", action="extend", metavar="|".join(choices), help=help
    )


def add_text_args(parser: argparse.ArgumentParser, *, split_help: str, field: str) -> None:
    """Where the text (or prompts) come from (checked by `checks.check_text_args`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", help=f"{' | '.join(DATASETS)} (default: wikitext-2)")
    source.add_argument("--text-file", metavar="FILE", help="a UTF-8 text file instead")
    source.add_argument("--jsonl", metavar="FILE", help="a JSONL file (one document a line)")
    parser.add_argument("--field", help=f"JSONL field holding the text (default: {field})")
    parser.add_argument("--split", help=split_help)
    parser.add_argument("--data-dir", metavar="DIR", help="where the datasets live")
    parser.add_argument("--max-chars", type=int, metavar="N", help="cut the text to N characters")


def add_window_args(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int | None,
    batch_help: str,
    max_windows: int | None = None,
    resolved_later: bool = False,
) -> None:
    """Sliding-window options of `eval` and `calibrate` (checked by `checks.check_windows`).
    ``resolved_later``: no defaults here (`calibrate` fills them in per measure); the help
    still names them."""
    context, stride = (None, None) if resolved_later else (1024, 512)
    parser.add_argument(
        "--context",
        type=int,
        default=context,
        metavar="N",
        help="window length in tokens, at least 2 (default: 1024)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=stride,
        metavar="N",
        help="tokens between window starts, at most --context (default: 512)",
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, metavar="N", help=batch_help)
    parser.add_argument(
        "--max-windows",
        type=int,
        metavar="N",
        help="stop after N windows" + (f" (default: {max_windows})" if max_windows else ""),
    )


def add_policy_args(parser: argparse.ArgumentParser, target_speedup: bool = False) -> None:
    parser.add_argument(
        "--policy",
        metavar="FILE|PRESET",
        help="adaptive policy: a JSON/YAML file or a preset (dense, paper); default dense",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="M.P=V",
        help="set a policy parameter, e.g. halting.min_layer=20 (repeatable)",
    )
    if target_speedup:
        parser.add_argument(
            "--target-speedup",
            type=float,
            metavar="X",
            help="add a SkipDecode schedule whose decode FLOPs per token (LM head included, "
            "averaged over the decode steps) are 1/X of dense",
        )


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    """--speculative and --speculative-tokens (checked by ``inputs.speculative_setting``)."""
    parser.add_argument(
        "--speculative",
        metavar="METHOD",
        help="verified decoding: draft tokens by METHOD (ngram: prompt lookup; layers: the "
        "model with calibrated layers skipped; planes: the 4-bit plane of Matryoshka width-8 "
        "weights; auto: per row, whichever pays, or none) and keep those the full model "
        "agrees with; the same tokens in fewer forwards (default: off)",
    )
    parser.add_argument(
        "--speculative-tokens",
        type=int,
        metavar="N",
        help="most tokens drafted per step, 1..64 (default: 6 for ngram; from the measured "
        "drafting plan for the others)",
    )
