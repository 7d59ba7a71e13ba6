"""``quicksilver adapt``: train the small pieces a frozen model lacks, one adapter file each.

``adapt skipdecode`` fine-tunes LoRA adapters with the SkipDecode schedule of
``--target-speedup`` active (the one ``generate --target-speedup X --max-new-tokens N``
builds); ``adapt exits`` fits per-layer exit heads with the model frozen. Use the file with
``--adapter FILE`` on generate / eval / serve, or ``quicksilver.load(..., adapter=FILE)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quicksilver import adapt
from quicksilver.cli.checks import check_target_speedup, require_positive, set_threads
from quicksilver.cli.console import say, show
from quicksilver.errors import QuicksilverError
from quicksilver.outputs import write_json_atomic

NAME = "adapt"


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        help="train LoRA for SkipDecode, or exit heads for halting",
        description="Train an adapter for a frozen model and write it as one file (default: "
        f"under {adapt.default_adapter_dir()}); apply it with --adapter FILE.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    skip = kinds.add_parser(
        "skipdecode",
        parents=[common],
        help="LoRA fine-tuned under the SkipDecode schedule (self-distillation)",
    )
    skip.add_argument("--target-speedup", type=float, default=2.0, metavar="X")
    skip.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="the generation length whose schedule is trained, as generate's (default: 64)",
    )
    skip.add_argument("--rank", type=int, default=8, metavar="R", help="LoRA rank (default: 8)")
    skip.add_argument("--loss", choices=("kl", "ce"), default="kl", help="default: kl")
    exits = kinds.add_parser(
        "exits", parents=[common], help="exit heads (a tuned lens) for halting's lens signal"
    )
    exits.add_argument(
        "--layers-per-step", type=int, default=4, metavar="N", help="default: %(default)s"
    )
    exits.add_argument(
        "--first-layer",
        type=int,
        default=0,
        metavar="N",
        help="fit heads for layers N and later only (halting's min_layer); earlier layers "
        "keep the plain logit lens (default: 0)",
    )
    for parser_ in (skip, exits):
        _training_options(parser_, lr=5e-4 if parser_ is skip else 1e-3)
        parser_.set_defaults(handler=run)


def _training_options(parser: argparse.ArgumentParser, lr: float) -> None:
    parser.add_argument("--steps", type=int, default=200, metavar="N", help="default: 200")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="default: 4")
    parser.add_argument(
        "--seq-len", type=int, default=128, metavar="N", help="tokens per window (default: 128)"
    )
    parser.add_argument("--lr", type=float, default=lr, help="learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="default: 0")
    parser.add_argument(
        "--data", metavar="FILE", help="JSONL(.gz) or text file (default: the C4 sample)"
    )
    parser.add_argument("--output", metavar="FILE", help="where to write the adapter")
    parser.add_argument(
        "--resume",
        metavar="FILE",
        help="checkpoint file: written as training goes, resumed from when it exists",
    )


def run(args: argparse.Namespace) -> int:
    require_positive(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len)
    if not args.lr > 0:
        raise QuicksilverError(f"--lr must be > 0, got {args.lr}")
    if args.data is not None and not Path(args.data).is_file():
        raise QuicksilverError(f"--data {args.data}: no such file")
    set_threads(args.threads)
    settings = adapt.TrainingSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
    )
    where = dict(data=args.data, output=args.output, checkpoint=args.resume)
    if args.kind == "skipdecode":
        check_target_speedup(args.target_speedup)
        require_positive(max_new_tokens=args.max_new_tokens, rank=args.rank)
        result = adapt.adapt_skipdecode(
            args.model,
            args.target_speedup,
            args.max_new_tokens,
            settings,
            rank=args.rank,
            loss=args.loss,
            **where,
        )
        before, after = (result.record["validation"][k] for k in ("frozen", "adapted"))
        say(
            f"held-out next-token loss on generated positions: dense {before['dense_nll']:.3f}, "
            f"schedule frozen {before['scheduled_nll']:.3f}, adapted {after['scheduled_nll']:.3f}"
        )
    else:
        require_positive(layers_per_step=args.layers_per_step)
        result = adapt.fit_exit_heads(
            args.model,
            settings,
            layers_per_step=args.layers_per_step,
            first_layer=args.first_layer,
            **where,
        )
        kl = result.record["validation_kl_by_layer"]
        say(
            "held-out KL to the final distribution, mean over layers: logit lens "
            f"{sum(kl['logit_lens']) / len(kl['logit_lens']):.3f}, exit heads "
            f"{sum(kl['exit_heads']) / len(kl['exit_heads']):.3f}"
        )
    record = result.record
    say(f"[{record['steps']} steps, {record['tokens']} tokens, {record['seconds']:.1f} s]")
    show(str(result.path))
    if args.json:
        write_json_atomic(args.json, {"path": str(result.path), **record})
    return 0
