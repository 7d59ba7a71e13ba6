"""The lm-evaluation-harness backend and the server seen through the harness's own
``local-completions`` model: the same requests must get the same log-likelihoods from
both, and those must be ``LLM.loglikelihood``'s; rolling (document-level) scores must follow
the harness's windows and equal ``perplexity`` where the windows coincide."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
pytest.importorskip("tenacity")  # lm-eval's API models need it

from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tiny_models import byte_level_tokenizer, save_tiny, tiny_llama  # noqa: E402

import quicksilver as qs  # noqa: E402
from quicksilver.cli.main import build_parser, main, parse  # noqa: E402
from quicksilver.integrations.lm_eval import QuicksilverLM  # noqa: E402
from quicksilver.lm_eval_tasks import prepare_tasks, wikitext_documents  # noqa: E402
from quicksilver.scoring import rolling_loglikelihood, rolling_windows  # noqa: E402
from quicksilver.serve.app import Settings  # noqa: E402
from quicksilver.serve.server import BackgroundServer  # noqa: E402

WINDOW = 16  # max_length for rolling scores: documents span several windows

RAW = [
    " \n",
    " = First Article = \n",
    " \n",
    " The first article is about cats and dogs . \n",
    " \n",
    " = = A section = = \n",
    " \n",
    " Cats sleep a lot ; dogs bark at the mail carrier . \n",
    " \n",
    " = Second Article = \n",
    " \n",
    " The second one is short . \n",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("lmeval") / "tiny")
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> TaskManager:
    root = tmp_path_factory.mktemp("tasks")
    raw = root / "wiki.test.raw"
    raw.write_text("".join(RAW), encoding="utf-8")
    return TaskManager(include_path=str(prepare_tasks(root / "out", wikitext_raw=raw)))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> qs.LLM:
    return qs.load(str(model_dir), dtype="float32")


def evaluate(model: str, model_args: str, task: str, tasks: TaskManager, **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=tasks,
        log_samples=True,
        verbosity="ERROR",
        **kwargs,
    )


@pytest.mark.parametrize("n_tokens", [1, 5, 16, 17, 40, 48])
@pytest.mark.parametrize("max_length", [1, 3, 16])
def test_rolling_windows_are_the_harness_windows(n_tokens: int, max_length: int) -> None:
    tokens = list(range(100, 100 + n_tokens))
    stream = [-1, *tokens]
    theirs = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(tokens, -1, max_length, 1)
    ]
    ours = rolling_windows(n_tokens, max_length)
    assert len(ours) == len(theirs)
    for (begin, end, n), (context, predicted) in zip(ours, theirs, strict=True):
        assert stream[begin : end - 1] == context + predicted[:-1]
        assert stream[end - n : end] == predicted


def test_wikitext_documents_split_at_article_titles() -> None:
    documents = wikitext_documents(RAW)
    assert len(documents) == 2
    assert "".join(documents) == "".join(RAW)
    assert " = = A section = = \n" in documents[0]
    assert documents[1].startswith(" = Second Article = ")


def test_multiple_choice_same_loglikelihoods_from_backend_server_and_api(
    model_dir: Path, tasks: TaskManager, reference: qs.LLM
) -> None:
    ours = evaluate(
        "quicksilver",
        f"pretrained={model_dir},dtype=float32,batch_size=4",
        "qs_facts_mc",
        tasks,
        limit=3,
    )
    with BackgroundServer(qs.load(str(model_dir), dtype="float32"), Settings("tiny")) as server:
        remote = evaluate(
            "local-completions",
            f"base_url={server.url}/v1/completions,model=tiny,max_length=128",
            "qs_facts_mc",
            tasks,
            limit=3,
        )
    ours_samples = ours["samples"]["qs_facts_mc"]
    remote_samples = remote["samples"]["qs_facts_mc"]
    assert len(ours_samples) == len(remote_samples) == 3
    for mine, theirs in zip(ours_samples, remote_samples, strict=True):
        for arguments, (a, a_greedy), (b, b_greedy) in zip(
            mine["arguments"], mine["filtered_resps"], theirs["filtered_resps"], strict=True
        ):
            context, continuation = arguments[0], arguments[1]
            expected = reference.loglikelihood(context, continuation)
            assert a == pytest.approx(expected.logprob, abs=1e-4)
            assert b == pytest.approx(expected.logprob, abs=1e-4)
            assert a_greedy == b_greedy == expected.is_greedy
    assert (
        ours["results"]["qs_facts_mc"]["acc,none"] == remote["results"]["qs_facts_mc"]["acc,none"]
    )


def test_wikitext_rolling_same_from_backend_and_server(model_dir: Path, tasks: TaskManager) -> None:
    ours = evaluate(
        "quicksilver",
        f"pretrained={model_dir},dtype=float32,max_length={WINDOW}",
        "qs_wikitext2_doc",
        tasks,
    )
    # The harness's API models keep one position for a generated token and one for the
    # context, so they roll windows of max_length - 2 tokens (its `hf` model: max_length).
    with BackgroundServer(qs.load(str(model_dir), dtype="float32"), Settings("tiny")) as server:
        remote = evaluate(
            "local-completions",
            f"base_url={server.url}/v1/completions,model=tiny,max_length={WINDOW + 2}",
            "qs_wikitext2_doc",
            tasks,
        )
    mine = [s["filtered_resps"][0] for s in ours["samples"]["qs_wikitext2_doc"]]
    theirs = [s["filtered_resps"][0] for s in remote["samples"]["qs_wikitext2_doc"]]
    assert len(mine) == 2
    assert mine == pytest.approx(theirs, abs=1e-3)
    a, b = ours["results"]["qs_wikitext2_doc"], remote["results"]["qs_wikitext2_doc"]
    assert a["word_perplexity,none"] == pytest.approx(b["word_perplexity,none"], rel=1e-5)
    assert a["byte_perplexity,none"] == pytest.approx(b["byte_perplexity,none"], rel=1e-5)


def test_rolling_equals_perplexity_where_the_windows_coincide(reference: qs.LLM) -> None:
    """With the prefix token in front, ``perplexity(context=L + 1, stride=L)`` scores each
    token given the same history as the harness's windows, as long as the last window is full
    (the harness gives a short last window more history)."""
    text = "The quick brown fox jumps over the lazy dog again and again!!"
    ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"][: 3 * WINDOW]
    assert len(ids) == 3 * WINDOW
    prefix = reference.tokenizer.bos_token_id
    rolling = rolling_loglikelihood(
        reference.engine, ids, prefix_token=prefix, max_length=WINDOW, batch_size=2
    )
    ppl = reference.perplexity([prefix, *ids], context=WINDOW + 1, stride=WINDOW)
    assert ppl.tokens == len(ids)
    assert -rolling == pytest.approx(ppl.nll_sum, rel=1e-6)
    lm = QuicksilverLM.__new__(QuicksilverLM)  # the backend around the same model
    lm.llm, lm.policy, lm.max_length, lm.batch_size = reference, qs.load_policy(None), WINDOW, 2
    lm._rank, lm._world_size = 0, 1
    lm.cache_hook = lm_eval.api.model.CacheHook(None)

    class Request:
        args = (reference.decode(ids),)

    (backend,) = lm.loglikelihood_rolling([Request()], disable_tqdm=True)
    assert backend == pytest.approx(rolling, rel=1e-6)
    assert math.isfinite(backend)


def test_backend_refuses_bad_model_args(model_dir: Path) -> None:
    with pytest.raises(qs.QuicksilverError, match="batch_size"):
        QuicksilverLM(pretrained=str(model_dir), batch_size="lots")
    with pytest.raises(qs.QuicksilverError, match="max_length"):
        QuicksilverLM(pretrained=str(model_dir), dtype="float32", max_length=10_000)
    with pytest.raises(qs.QuicksilverError):
        QuicksilverLM(pretrained=str(model_dir), policy="no-such-policy")


def test_backend_generate_until_and_policy(model_dir: Path, reference: qs.LLM) -> None:
    lm = QuicksilverLM(
        pretrained=str(model_dir),
        dtype="float32",
        set="halting.relative_drift=10;halting.min_layer=1",
    )
    assert lm.policy.to_config()["halting"]["min_layer"] == 1

    class Request:
        args = ("Hello", {"until": ["\n"], "max_gen_toks": 6})

    (text,) = lm.generate_until([Request()], disable_tqdm=True)
    expected = reference.generate("Hello", max_new_tokens=6, stop="\n", policy=lm.policy).text
    assert text == expected


def test_eval_documents_reproduces_the_harness_wikitext_figures(
    model_dir: Path, tasks: TaskManager, tmp_path: Path
) -> None:
    """``quicksilver eval --windows documents`` scores the articles the qs_wikitext2_doc task
    gives the harness, in the same windows, and normalises by the same words and bytes."""
    harness = evaluate(
        "quicksilver",
        f"pretrained={model_dir},dtype=float32,max_length={WINDOW}",
        "qs_wikitext2_doc",
        tasks,
    )["results"]["qs_wikitext2_doc"]
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(RAW), encoding="utf-8")
    common = ["eval", "--model", str(model_dir), "--dtype", "float32", "--data-dir", str(data)]
    common += ["--context", str(WINDOW), "--no-progress"]
    reports = {}
    for windows, extra in (("documents", []), ("sliding", ["--stride", str(WINDOW // 2)])):
        out = tmp_path / f"{windows}.json"
        argv = [*common, "--windows", windows, *extra, "--batch-size", "3", "--json", str(out)]
        assert main(argv) == 0
        reports[windows] = json.loads(out.read_text())
    ours = reports["documents"]
    assert ours["windowing"] == "documents" and ours["n_documents"] == 2
    assert ours["word_ppl"] == pytest.approx(harness["word_perplexity,none"], rel=1e-6)
    assert ours["byte_ppl"] == pytest.approx(harness["byte_perplexity,none"], rel=1e-6)
    assert ours["bits_per_byte"] == pytest.approx(harness["bits_per_byte,none"], rel=1e-6)
    # Byte-level tokenizer: every byte of both articles is one scored token.
    assert ours["tokens"] == ours["n_bytes"] == len("".join(RAW).encode())
    assert ours["dense_flops_per_token"] > 0
    # The default sliding window scores the text as one stream: a different number.
    sliding = reports["sliding"]
    assert sliding["windowing"] == "sliding" and sliding["stride"] == WINDOW // 2
    assert sliding["word_ppl"] != pytest.approx(ours["word_ppl"], rel=1e-3)


def test_eval_documents_refuses_sliding_window_options(capsys: pytest.CaptureFixture) -> None:
    for option in (["--stride", "8"], ["--max-windows", "2"], ["--compare", "transformers"]):
        assert main(["eval", "--windows", "documents", *option]) == 2
        assert f"{option[0]} applies to --windows sliding" in capsys.readouterr().err
    assert main(["eval", "--windows", "pages"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_lm_eval_command_passes_unknown_arguments_to_the_harness(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No ``--`` needed: what the wrapper does not take goes to the harness, in order; ``--``
    still works, and every other command still refuses options it does not know."""
    argv = ["lm-eval", "--model", "quicksilver", "--model_args"]
    argv += [f"pretrained={model_dir},dtype=float32", "--tasks", "qs_facts_mc", "--limit", "2"]
    assert main(argv) == 0
    assert "qs_facts_mc" in capsys.readouterr().out
    parser = build_parser()
    mixed = parse(parser, ["lm-eval", "--model", "x", "--wikitext-documents", "3", "--tasks", "t"])
    assert mixed.wikitext_documents == 3
    assert mixed.harness_args == ["--model", "x", "--tasks", "t"]
    dashed = parse(parser, ["lm-eval", "--wikitext-documents", "3", "--", "--model", "x", "--"])
    assert dashed.wikitext_documents == 3 and dashed.harness_args == ["--model", "x", "--"]
    assert main(["lm-eval", "--model", "quicksilver", "--wikitext-documents", "0"]) == 2
    assert "--wikitext-documents must be positive" in capsys.readouterr().err
    assert main(["eval", "--tasks", "qs_facts_mc"]) == 2
    assert "unrecognized arguments: --tasks" in capsys.readouterr().err
