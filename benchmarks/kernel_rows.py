"""What a weight product costs per number of activation rows, kernel by kernel, on this CPU.

A verify forward of k drafted tokens multiplies k + 1 rows by every weight matrix; it pays
off when that costs about one row. This times each product our formats can run, and the
candidates they could run, for 1..16 rows at the model's own shapes (SmolLM2-135M: 576 ->
1536, 1536 -> 576, 576 -> 576, 576 -> 192), summed over the shapes, best of ``--repeats``:

- ``bf16``: ``torch.nn.functional.linear`` in bfloat16 (oneDNN);
- ``fp32``: the same in float32;
- ``int8 weight-only``: ``aten._weight_int8pack_mm`` (our int8 format), bf16 activations;
- ``int4 weight-only (torch)``: ``aten._weight_int4pack_mm_for_cpu``, group 32 (our int4
  format where our kernel does not run);
- ``int4 x int8 (ours, ISA)``: ``quicksilver.kernels`` (our int4 format where it runs),
  activations rounded to int8 per block of 32, on each instruction set this CPU has;
- ``int8 dynamic (fbgemm)``: ``torch.ao`` dynamic quantised linear, activations quantised to
  int8 per call (VNNI where present). Not our numerics (activation rounding changes the
  output), listed for its row curve only.

Times are relative to one row of the same kernel, and absolute (microseconds), so the table
answers both "which kernel is flat in rows" and "which is fastest at k rows".

    .venv/bin/python benchmarks/kernel_rows.py   # writes docs/results/kernel-rows.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quicksilver import kernels as native
from quicksilver.accounting import cpu_name
from quicksilver.models.formats import Int4Linear, Int8Linear, int4_kernel_available

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(576, 1536), (576, 1536), (1536, 576), (576, 576), (576, 192), (576, 192), (576, 576)]
ROWS = [1, 2, 4, 8, 9, 12, 16]

Product = Callable[[torch.Tensor], torch.Tensor]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "kernel-rows.md")
    return parser


def kernels(weights: list[torch.Tensor]) -> dict[str, list[tuple[Product, torch.dtype]]]:
    """For each kernel, one product per shape and the activation dtype it takes."""
    found: dict[str, list[tuple[Product, torch.dtype]]] = {}
    bf16 = [w.bfloat16() for w in weights]
    found["bf16"] = [
        (lambda x, w=w: torch.nn.functional.linear(x, w), torch.bfloat16) for w in bf16
    ]
    found["fp32"] = [
        (lambda x, w=w: torch.nn.functional.linear(x, w), torch.float32) for w in weights
    ]
    int8 = [Int8Linear.from_weight(w, None, torch.bfloat16) for w in weights]
    found["int8 weight-only"] = [(module, torch.bfloat16) for module in int8]
    if int4_kernel_available():
        int4 = [Int4Linear.from_weight(w, None, torch.bfloat16, 32, "torch") for w in weights]
        found["int4 weight-only (torch)"] = [(module, torch.bfloat16) for module in int4]
    if native.available():
        for isa in ("avx512", "avx2")[("avx512", "avx2").index(native.best_isa()) :]:
            found[f"int4 x int8 (ours, {isa})"] = [
                (module_on(isa, w), torch.bfloat16) for w in weights
            ]
    dynamic = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.clone()
        quantised = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
        )
        dynamic.append((lambda x, q=quantised: q(x), torch.float32))
    found["int8 dynamic (fbgemm)"] = dynamic
    return found


def module_on(isa: str, weight: torch.Tensor) -> Product:
    """Our kernel's product with ``weight``, forced onto one instruction set."""
    module = Int4Linear.from_weight(weight, None, torch.bfloat16, 32, "ours")
    return lambda x, packed=module.packed: native.linear(x, packed, isa=isa)


def seconds(products: list[tuple[Product, torch.dtype]], rows: int, repeats: int) -> float:
    """Best time of one pass over every shape with ``rows`` activation rows."""
    inputs = [torch.randn(rows, SHAPES[i][0]).to(dtype) for i, (_, dtype) in enumerate(products)]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for (product, _), x in zip(products, inputs, strict=True):
                product(x)
            best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(out, inp) * 0.02 for inp, out in SHAPES]
    table = {}
    for name, products in kernels(weights).items():
        seconds(products, 1, 20)  # warm-up
        table[name] = [seconds(products, rows, args.repeats) for rows in ROWS]
        print(name, " ".join(f"{t * 1e6:.0f}" for t in table[name]), flush=True)
    command = shlex.join(["python", "benchmarks/kernel_rows.py", *(argv or sys.argv[1:])])
    lines = [
        "# Weight products by number of rows",
        "",
        f"{cpu_name()}, {platform.machine()}, {args.threads} threads, torch {torch.__version__}. "
        f"One layer's seven products of SmolLM2-135M (q, k, v, o, gate, up, down), best of "
        f"{args.repeats}.",
        "",
        f"```bash\n{command}\n```",
        "",
        "| kernel | " + " | ".join(f"{r} rows" for r in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
    ]
    for name, times in table.items():
        cells = [f"{t * 1e6:.0f} µs ({t / times[0]:.2f}x)" for t in times]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
