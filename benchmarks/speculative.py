"""Verified decoding: the dense model's exact tokens in fewer forwards, by each drafter.

Prompts are built from C4 validation documents (``../shared/data``): grounded ones that ask
the model to work from a document (summarise, copy, answer from it) and open continuations of
a document; or, with ``--prompt-set code``, code edits in the model's chat template: a
function from Python's own standard library (read from this interpreter's installation) with
an instruction to rename a variable, add type hints, add a docstring or fix a named bug, the
answer being the whole edited function (mostly a copy of the input). For each prompt set,
batch size and method (ngram, layers, planes, auto), plain
greedy decoding and verified decoding run on the same model in one process
(``quicksilver.bench.speculative``, also behind ``quicksilver bench --speculative``);
reported: end-to-end tokens/s, decode forwards, mean accepted length (1 + accepted / drafts,
vLLM's definition), draft and verify FLOPs, and whether every token equals plain greedy
decoding's; the drafting plan followed is listed. At batch 1 the same prompts go to
transformers' prompt lookup (``prompt_lookup_num_tokens``) and to llama.cpp's
``LlamaPromptLookupDecoding`` (same GGUF), each timed end to end, where installed.

    .venv/bin/python benchmarks/speculative.py                 # writes docs/results/speculative.md
    .venv/bin/python benchmarks/speculative.py --prompts 2 --no-references   # a quick look
    .venv/bin/python benchmarks/speculative.py --model qwen2.5-coder-0.5b --prompt-set code \\
        --markdown docs/results/qwen2.5-coder-0.5b/speculative-code.md
    .venv/bin/python benchmarks/speculative.py --methods planes auto --no-references \\
        --dtype bfloat16 \\
        --policy '{"matryoshka": {"fixed_bits": 8, "kernel": "planes"}}' \\
        --markdown docs/results/speculative-planes.md
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import quicksilver as qs
from quicksilver import kernels
from quicksilver.bench import speculative
from quicksilver.integrations.hf_reference import load_transformers_model
from quicksilver.models import loading

ROOT = Path(__file__).resolve().parent.parent
C4 = ROOT.parent / "shared" / "data" / "c4" / "c4-validation-sample-1000.jsonl.gz"


def documents(n: int, words: tuple[int, int] = (120, 260)) -> list[str]:
    """The first ``n`` C4 documents of a middle length, cut at a sentence end."""
    out = []
    with gzip.open(C4, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"].strip()
            count = len(text.split())
            if words[0] <= count <= words[1]:
                out.append(text)
            if len(out) == n:
                break
    return out


# Standard-library modules whose plain top-level functions make the code-edit prompts.
CODE_MODULES = ("textwrap", "shlex", "statistics", "difflib", "colorsys", "fnmatch", "bisect")
CODE_TASKS = {
    "rename": "Rename the variable `{name}` to `{new}` in this function.",
    "type hints": "Add type hints to the parameters and the return value of this function.",
    "docstring": "Add a short docstring to this function.",
    "fix bug": "This function has a bug: `{wrong}` should be `{right}`. Fix it.",
}
CODE_REPLY = "Reply with the complete updated function in one Python code block and nothing else."
# Bugs planted for "fix bug", as (right, wrong): the first that occurs in a function is used.
PLANTED_BUGS = ((" + 1", " - 1"), (" < ", " <= "), (" == ", " != "), (" > ", " >= "))


def code_functions(n: int) -> list[tuple[str, str]]:
    """``n`` (source, one local variable name) pairs: top-level functions of 8-30 lines
    without decorators that assign a local variable and contain a plantable bug."""
    import importlib

    found = []
    for module_name in CODE_MODULES:
        module = importlib.import_module(module_name)
        source = Path(module.__file__).read_text()
        lines = source.splitlines()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.FunctionDef) or node.decorator_list:
                continue
            if not 8 <= node.end_lineno - node.lineno + 1 <= 30:
                continue
            text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            names = [
                t.id
                for stmt in ast.walk(node)
                if isinstance(stmt, ast.Assign)
                for t in stmt.targets
                if isinstance(t, ast.Name) and len(t.id) > 1
            ]
            if names and any(right in text for right, _ in PLANTED_BUGS):
                found.append((text, names[0]))
            if len(found) == n:
                return found
    return found


def code_prompts(llm: qs.LLM, n: int) -> dict[str, list[list[int]]]:
    """Each code-edit task over the same ``n`` functions, in the chat template."""
    by_task: dict[str, list[list[int]]] = {task: [] for task in CODE_TASKS}
    for source, name in code_functions(n):
        right, wrong = next((r, w) for r, w in PLANTED_BUGS if r in source)
        for task, instruction in CODE_TASKS.items():
            code = source.replace(right, wrong, 1) if task == "fix bug" else source
            words = instruction.format(
                name=name, new=name + "_value", right=right.strip(), wrong=wrong.strip()
            )
            message = f"{words} {CODE_REPLY}\n\n```python\n{code}\n```"
            by_task[task].append(llm.encode(message, chat=True))
    return by_task


def first_difference_gaps(llm: qs.LLM, prompts, plain, fast) -> list[float]:
    """Where a verified row differs from plain decoding, the gap between the top two
    log-probs of the plain model at the first differing position: a near-tie (a small gap)
    is where a different matmul shape may round the other way in bf16."""
    gaps = []
    for prompt, a, b in zip(prompts, plain, fast, strict=True):
        if a == b:
            continue
        k = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        (scores,) = llm.token_scores([prompt + a[: k + 1]], firsts=[len(prompt) + k], top=2)
        (first, second), *_ = scores.top
        gaps.append(first[1] - second[1])
    return gaps


def run_transformers(
    model_path: str, prompts: list[list[int]], new: int, lookup: int | None, dtype: str
):
    source = loading.resolve(model_path)
    model = load_transformers_model(source, getattr(torch, dtype))
    seconds, outputs = 0.0, []
    for ids in prompts:
        inputs = torch.tensor([ids])
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra
            )
        seconds += time.perf_counter() - begin
        outputs.append(out[0, len(ids) :].tolist())
    return outputs, seconds


def run_llama_cpp(model_path: str, prompts: list[list[int]], new: int, lookup: bool, threads):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
    llm = Llama(
        model_path=model_path,
        n_ctx=2048,
        n_threads=threads,
        verbose=False,
        draft_model=draft,
        logits_all=lookup,
    )
    seconds, outputs = 0.0, []
    for ids in prompts:
        llm.reset()
        begin = time.perf_counter()
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == new:
                break
        seconds += time.perf_counter() - begin
        outputs.append(out)
    return outputs, seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--policy", default=None, help="a policy as JSON (default: dense)")
    parser.add_argument("--methods", nargs="+", default=["ngram", "layers", "auto"])
    parser.add_argument("--prompts", type=int, default=8, help="documents (functions) per task")
    parser.add_argument(
        "--prompt-set",
        choices=["c4", "code"],
        default="c4",
        help="C4 documents (grounded and open) or code edits of standard-library functions",
    )
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-tokens", type=int, default=None, help="drafted tokens per step")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (default: 2, as its page was measured)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compiled decode steps and verify forwards (qs.load(compile=True))",
    )
    parser.add_argument("--no-references", action="store_true")
    parser.add_argument(
        "--no-transformers",
        action="store_true",
        help="llama.cpp as the only reference (transformers dequantises a large GGUF slowly)",
    )
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "results" / "speculative.md"))
    return parser


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    llm = qs.load(args.model, dtype=args.dtype, weights=args.weights, compile=args.compile)
    policy = json.loads(args.policy) if args.policy else None
    if args.prompt_set == "code":
        prompts_by_task = code_prompts(llm, args.prompts)
        grounded_tasks = tuple(CODE_TASKS)
    else:
        prompts_by_task = speculative.task_prompts(llm, documents(args.prompts))
        grounded_tasks = speculative.GROUNDED
    report = speculative.measure(
        llm,
        prompts_by_task,
        args.methods,
        args.batch_sizes,
        args.new_tokens,
        num_tokens=args.num_tokens,
        policy=policy,
        progress=lambda message: print(message, flush=True),
    )
    for row in report["rows"]:
        prompts = prompts_by_task[row["task"]]
        gaps = first_difference_gaps(llm, prompts, row["plain_tokens"], row["fast_tokens"])
        row["top-2 gap at first difference"] = ", ".join(f"{g:.3f}" for g in gaps) or "-"
    references = []
    if not args.no_references:
        path = str(loading.resolve(args.model).path)
        grounded = [p for t in grounded_tasks for p in prompts_by_task[t]]
        new, threads, dt = args.new_tokens, args.threads, args.dtype
        for name, runner in (
            ("llama.cpp", lambda look: run_llama_cpp(path, grounded, new, look, threads)),
            ("transformers", lambda look: run_transformers(path, grounded, new, look and 10, dt)),
        ):
            if name == "transformers" and args.no_transformers:
                continue
            try:
                plain, plain_s = runner(False)
                look, look_s = runner(True)
            except Exception as err:  # a missing or crashed reference is one line
                references.append(f"- {name}: not run ({type(err).__name__}: {err})")
                continue
            tokens = sum(map(len, plain))
            references.append(
                f"- {name} (grounded prompts, batch 1): plain {tokens / plain_s:.1f} tok/s, "
                f"prompt lookup {sum(map(len, look)) / look_s:.1f} tok/s"
            )
            print(references[-1], flush=True)
    write_markdown(Path(args.markdown), args, llm, report, references, grounded_tasks)
    return 0


def write_markdown(
    path: Path, args, llm, report: dict, references: list[str], grounded_tasks: tuple[str, ...]
) -> None:
    columns = [*speculative.TABLE_COLUMNS, "top-2 gap at first difference"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["rows"]:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    grounded = {}
    for row in report["rows"]:
        if row["task"] in grounded_tasks and row["batch"] == 1:
            entry = grounded.setdefault(row["method"], [0, 0.0, 0.0])
            entry[0] += sum(map(len, row["fast_tokens"]))
            entry[1] += sum(map(len, row["fast_tokens"])) / row["tok_s"]
            entry[2] += sum(map(len, row["plain_tokens"])) / row["plain_tok_s"]
    summary = [
        f"- {method}: {tokens / seconds:.1f} tok/s against plain {tokens / plain:.1f} "
        f"({plain / seconds:.2f}x)"
        for method, (tokens, seconds, plain) in grounded.items()
    ]
    command = shlex.join(sys.argv[1:])
    plan = "\n".join(f"- {line}" for line in speculative.plan_lines(report["plan"]))
    if args.prompt_set == "code":
        prompts_text = (
            f"{args.prompts} standard-library functions per code-edit task (rename a variable, "
            "add type hints, add a docstring, fix a named bug), in the chat template"
        )
    else:
        prompts_text = f"{args.prompts} C4 validation documents of 120-260 words per task"
    title = f"{llm.config.name or llm.name}, {args.dtype}, policy {args.policy or 'dense'}"
    text = f"""# Verified decoding ({title})

```bash
{kernels.command_prefix()}.venv/bin/python benchmarks/speculative.py {command}
```

{llm!r}, {args.threads} threads. {prompts_text}; {args.new_tokens} new tokens at most (a row
ends at EOS, the same way in both), greedy.
Methods: {", ".join(args.methods)}; draft length {args.num_tokens or "each method's own"}.
Tokens/s is end to end (prompt and decoding; measuring the drafting plan is excluded and
listed below) over all prompts of the task; speedup is over plain decoding on the same prompts
in the same run; forwards are plain / verified decode forwards; "identical" counts prompts
whose tokens equal plain greedy decoding's exactly (in bf16 a verify forward of several tokens
may round differently from a one-token step, so a near-tie can flip: the last column gives the
top-2 log-prob gap of the plain model where a row first differs). Batch 8 runs the task's
prompts as one batch.

{chr(10).join(lines)}

Grounded prompts ({", ".join(grounded_tasks)}) at batch 1, all together:

{chr(10).join(summary) or "- none measured"}

The drafting plan the model drafters and auto followed (measured on this machine):

{plan or "- not needed (ngram only)"}

References in the same run, on the grounded prompts at batch 1:

{chr(10).join(references) or "- not run (--no-references)"}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
