"""``quicksilver serve``: an OpenAI-compatible HTTP server for one model (the ``serve`` extra).

The command checks its options, loads the model and the default policy, and hands over to
``quicksilver.serve``; uvicorn prints where it listens and stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import socket

import quicksilver as qs
from quicksilver.cli.checks import require_positive, set_threads
from quicksilver.cli.console import say
from quicksilver.cli.generate import check_group_size, mark_group_size_default
from quicksilver.cli.inputs import (
    check_model_args,
    check_speculative_policy,
    load_llm,
    load_policy_args,
    prepare_drafting,
    speculative_setting,
)
from quicksilver.cli.options import add_dtype, add_policy_args, add_speculative_args
from quicksilver.errors import QuicksilverError
from quicksilver.models.loading import DEFAULT_MODEL, parse_dtype

NAME = "serve"


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        NAME,
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve one model at /v1/completions and /v1/chat/completions (plus "
        "/v1/models, /health, /metrics, /tokenize, /detokenize, /tokenizer_info). Batching is "
        "continuous: a request joins the running batch at the next step and leaves it when it "
        'ends; a request may choose its own policy with {"quicksilver": {"policy": ...}} and '
        'verified decoding with {"quicksilver": {"speculative": "ngram"}}.',
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="short name, .gguf file, HF model dir or hub id (default: %(default)s)",
    )
    add_dtype(parser, "bfloat16")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $QUICKSILVER_API_KEY, else none)",
    )
    parser.add_argument(
        "--served-model-name", metavar="NAME", help="the model's name in the API (default: --model)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        metavar="N",
        help="rows running at once, per policy (default: 16)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests (and rows) that may wait for a free row; more get 503 (default: 64)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, metavar="N", help="(default: 1 MiB)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads, at most one per CPU (default: torch's choice)",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="positions per row of the KV cache (default: the model's, at most 2048)",
    )
    parser.add_argument(
        "--prefill-tokens",
        type=int,
        default=512,
        metavar="N",
        help="prompt tokens read per step while other rows stream (default: %(default)s)",
    )
    add_speculative_args(parser)
    add_policy_args(parser)
    mark_group_size_default(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        from quicksilver.serve.app import Settings
        from quicksilver.serve.server import serve
    except ImportError as err:
        raise QuicksilverError(
            f"serving needs the serve extra ({err.name} is missing): pip install "
            "'quicksilver-llm[serve]'"
        ) from None
    require_positive(
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        prefill_tokens=args.prefill_tokens,
    )
    if args.max_context is not None:
        require_positive(max_context=args.max_context)
    check_group_size(args, [args.weights])
    check_model_args(args)
    speculative = speculative_setting(args)
    if not 0 < args.port < 65536:
        raise QuicksilverError(f"--port must be from 1 to 65535, got {args.port}")
    parse_dtype(args.dtype)
    check_listen_address(args.host, args.port)
    policy = load_policy_args(args)
    check_speculative_policy(policy, speculative)  # the default every request may get
    set_threads(args.threads)
    api_key = args.api_key or os.environ.get("QUICKSILVER_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        say(f"note: listening on {args.host} without --api-key: anyone who can reach it may use it")
    llm = load_llm(args)
    policy.check_model(llm.config)
    positions = llm.config.max_position_embeddings
    if args.max_context is not None and args.max_context > positions:
        raise QuicksilverError(
            f"--max-context {args.max_context} is more than the model's {positions} positions"
        )
    prepare_drafting(llm, policy, speculative)  # before the first request, not during it
    settings = Settings(
        model_name=args.served_model_name or args.model,
        api_key=api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_context=args.max_context,
        prefill_tokens=args.prefill_tokens,
        speculative=qs.speculative_config(speculative),
        default_policy=None if policy.is_off else policy,
        model_aliases=tuple(dict.fromkeys((args.model, llm.name))),
    )
    say(f"serving {llm.name} as {settings.model_name!r} at http://{args.host}:{args.port}/v1")
    serve(llm, settings, host=args.host, port=args.port)
    return 0


def check_listen_address(host: str, port: int) -> None:
    """Bind ``host:port`` for a moment before the model loads (which takes seconds to
    minutes): a busy port or an address this machine does not have is then a one-line error
    at once, not uvicorn's own message after the wait. (The port is free again when uvicorn
    binds it; another process could take it in between, which uvicorn then reports.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    try:
        found = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise QuicksilverError(
            f"--host {host!r} is not an address or a name this machine can resolve ({err}); "
            "use e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    _, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            reason = err.strerror or str(err)
            raise QuicksilverError(
                f"cannot listen on {host}:{port}: {reason}; choose another --port or --host, "
                "or stop the process that holds it"
            ) from None
