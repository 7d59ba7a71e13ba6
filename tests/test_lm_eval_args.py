"""What the lm-eval backend and ``quicksilver lm-eval`` refuse: a ``model_args`` key the
backend does not take (a typo must not silently run the dense model) and a task the harness
does not know, each with its own one-line message."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tiny_models import byte_level_tokenizer, save_tiny, tiny_llama  # noqa: E402

from quicksilver.cli import lm_eval as lm_eval_command  # noqa: E402
from quicksilver.cli.main import main  # noqa: E402
from quicksilver.errors import QuicksilverError  # noqa: E402
from quicksilver.integrations.lm_eval import QuicksilverLM  # noqa: E402

# What the harness's own command line adds to model_args (simple_evaluate's extra config).
HARNESS_EXTRAS = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = save_tiny(tiny_llama(), tmp_path_factory.mktemp("lmeval_args") / "tiny")
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


def test_model_args_lists_the_constructor_parameters() -> None:
    assert QuicksilverLM.model_args() == [
        "pretrained",
        "policy",
        "set",
        "dtype",
        "batch_size",
        "max_length",
        "max_gen_toks",
        "device",
        "max_batch_size",
    ]


def test_a_misspelt_key_is_refused_before_anything_loads() -> None:
    """A missing model directory would fail differently: the key is checked first."""
    with pytest.raises(QuicksilverError) as err:
        QuicksilverLM.create_from_arg_string(
            "pretrained=/no/such/model,polcy=paper", dict(HARNESS_EXTRAS)
        )
    message = str(err.value)
    assert "\n" not in message
    assert "'polcy' (did you mean 'policy'?)" in message
    assert "accepted: pretrained, policy, set, dtype" in message


def test_every_unknown_key_is_named_and_unlike_keys_get_no_guess() -> None:
    with pytest.raises(QuicksilverError) as err:
        QuicksilverLM(pretrained="/no/such/model", zzz=1, temperature=0.5)
    message = str(err.value)
    assert "'temperature'" in message and "'zzz'" in message
    assert "did you mean" not in message


def test_what_the_harness_adds_is_accepted(model_dir: Path) -> None:
    """--batch_size, --max_batch_size and --device reach the constructor as model_args."""
    extras = {**HARNESS_EXTRAS, "max_batch_size": 4}
    lm = QuicksilverLM.create_from_arg_string(
        f"pretrained={model_dir},dtype=float32,policy=paper,max_length=64", extras
    )
    assert lm.batch_size == 1 and lm.max_length == 64
    assert not lm.policy.is_off


@pytest.mark.parametrize("make", ["string", "mapping"])
def test_a_key_the_harness_also_passes_is_refused_with_the_option_to_use(make: str) -> None:
    """The harness's command line always passes --batch_size (default 1) and --device: the
    same key in model_args reached the constructor twice (a TypeError, reported as a bug)."""
    given = {"pretrained": "/no/such/model", "batch_size": 8}
    extras = {**HARNESS_EXTRAS, "device": "cpu"}
    with pytest.raises(QuicksilverError) as err:
        if make == "string":
            QuicksilverLM.create_from_arg_string("pretrained=/no/such/model,batch_size=8", extras)
        else:
            QuicksilverLM.create_from_arg_obj(given, extras)
    message = str(err.value)
    assert message.startswith("batch_size in model_args would also come from the harness's")
    assert message.endswith("set it with --batch_size only")


def test_a_key_the_harness_leaves_unset_may_come_from_model_args(model_dir: Path) -> None:
    """simple_evaluate passes None for what it was not given: model_args may then set it."""
    lm = QuicksilverLM.create_from_arg_string(
        f"pretrained={model_dir},dtype=float32,batch_size=3",
        {"batch_size": None, "max_batch_size": None, "device": None},
    )
    assert lm.batch_size == 3


def test_missing_tasks_reads_only_the_harness_not_found_error() -> None:
    assert lm_eval_command.missing_tasks(ValueError("Tasks not found: a, b_c")) == "a, b_c"
    assert lm_eval_command.missing_tasks(ValueError("batch_size must be an int")) is None


def test_unknown_task_gets_its_own_line(capsys: pytest.CaptureFixture) -> None:
    """Through the real harness: its task lookup fails before any model is built."""
    code = main(["lm-eval", "--model", "quicksilver", "--tasks", "qs_facts_mc,no_such_task_x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: unknown lm-eval task(s): no_such_task_x;"), err[-1]
    assert "`quicksilver lm-eval ls tasks`" in err[-1]
    assert "bug" not in err[-1]


def test_other_harness_value_errors_are_not_called_unknown_tasks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import lm_eval.__main__

    def broken() -> None:
        raise ValueError("something else went wrong")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", broken)
    assert main(["lm-eval", "--model", "quicksilver", "--tasks", "qs_facts_mc"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unexpected ValueError: something else went wrong" in line
    assert "unknown lm-eval task" not in line
