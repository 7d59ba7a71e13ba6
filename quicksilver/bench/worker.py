"""One engine's throughput measurement, in a process of its own.

``quicksilver bench`` runs each engine configuration (our engine in a weight format, with or
without a compiled step; transformers; llama.cpp) in a fresh Python process through this
module, so that each one's peak resident memory is its own, not the high-water mark of every
model loaded before it, and no engine's caches or threads warm or slow another's.

Protocol: a JSON spec on stdin, the JSON result on stdout (progress goes to stderr); the
result records the torch threads the measurement ran with.

    {"engine": "quicksilver" | "transformers" | "llama.cpp", "model": ..., "dtype": ...,
     "weights": ..., "head_weights": ..., "group_size": ..., "compile": ...,
     "prompts": [[ids...], ...], "batch_sizes": [...], "new_tokens": N, "repeats": N,
     "threads": N | null}
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import torch

from quicksilver.errors import QuicksilverError


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: VmHWM, the high-water mark of this
    address space (``ru_maxrss`` would not do: Linux carries it over from the parent
    through fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _quicksilver(spec: dict[str, Any]) -> dict[str, Any]:
    import quicksilver as qs
    from quicksilver.bench.machine import linear_weight_bytes
    from quicksilver.bench.throughput import bench_engine

    llm = qs.load(
        spec["model"],
        dtype=spec["dtype"],
        weights=spec.get("weights"),
        head_weights=spec.get("head_weights"),
        group_size=spec.get("group_size"),
        compile=spec.get("compile", False),
    )
    results = {}
    for batch in spec["batch_sizes"]:
        compiled_before = llm.compile_seconds
        result = bench_engine(
            llm.engine, spec["prompts"], batch, spec["new_tokens"], spec["repeats"]
        )
        result["compile_seconds"] = llm.compile_seconds - compiled_before
        results[str(batch)] = result
    return {
        "label": f"quicksilver {llm.weights.describe()}"
        + (", compiled" if spec.get("compile") else ""),
        "weights": llm.weights.to_dict(),
        "weight_bytes": linear_weight_bytes(llm.model),
        "load_seconds": llm.load_seconds,
        "results": results,
    }


def _transformers(spec: dict[str, Any]) -> dict[str, Any]:
    from quicksilver.bench.throughput import bench_transformers
    from quicksilver.integrations.hf_reference import load_transformers_model
    from quicksilver.models import loading

    source = loading.resolve(spec["model"])
    dtype = loading.parse_dtype(spec["dtype"])
    start = time.perf_counter()
    model = load_transformers_model(source, dtype)
    load_seconds = time.perf_counter() - start
    weight_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    results = {
        str(batch): bench_transformers(
            model, spec["prompts"], batch, spec["new_tokens"], spec["repeats"]
        )
        for batch in spec["batch_sizes"]
    }
    return {
        "label": f"transformers {spec['dtype']} (eager, sdpa)",
        "weight_bytes": weight_bytes,
        "load_seconds": load_seconds,
        "results": results,
    }


def _llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    from quicksilver.integrations.llama_cpp_reference import LlamaCppRunner

    start = time.perf_counter()
    runner = LlamaCppRunner(
        spec["gguf"],
        max_rows=max(spec["batch_sizes"]),
        max_tokens=len(spec["prompts"][0]) + spec["new_tokens"],
        threads=spec.get("threads") or torch.get_num_threads(),
    )
    load_seconds = time.perf_counter() - start
    results = {
        str(batch): runner.bench(spec["prompts"], batch, spec["new_tokens"], spec["repeats"])
        for batch in spec["batch_sizes"]
    }
    return {
        "label": f"llama.cpp {runner.version} ({runner.weights})",
        "weight_bytes": runner.weight_bytes,
        "load_seconds": load_seconds,
        "results": results,
    }


ENGINES = {"quicksilver": _quicksilver, "transformers": _transformers, "llama.cpp": _llama_cpp}


def main() -> int:
    spec = json.load(sys.stdin)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        with torch.inference_mode():
            report = ENGINES[spec["engine"]](spec)
    except QuicksilverError as err:
        json.dump({"error": str(err)}, sys.stdout)
        return 1
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["threads"] = torch.get_num_threads()
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
