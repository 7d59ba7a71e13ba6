"""Hostile input, class by class: each must be refused with a 4xx JSON error (server) or a
one-line error (CLI, Python API) within two seconds, and leave the server's state bounded.

The server runs the tiny random Llama of ``tiny_models`` on 127.0.0.1 at a free port.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from tiny_models import save_tiny_chat_llama  # noqa: E402

import quicksilver as qs  # noqa: E402
from quicksilver.cli.main import main  # noqa: E402
from quicksilver.policies.files import load_policy  # noqa: E402
from quicksilver.serve.app import Settings  # noqa: E402
from quicksilver.serve.metrics import Metrics  # noqa: E402
from quicksilver.serve.protocol import has_lone_surrogate  # noqa: E402
from quicksilver.serve.server import BackgroundServer  # noqa: E402

FAST_S = 2.0
SURROGATE = "\ud800"


def alias_bomb(levels: int = 9) -> str:
    """YAML "billion laughs": each level lists the previous one nine times (9**levels)."""
    lines = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(lines) + "]"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_llama(tmp_path_factory.mktemp("hostile") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[BackgroundServer]:
    llm = qs.load(str(model_dir), dtype="float32")
    settings = Settings(model_name="tiny", model_aliases=(str(model_dir),))
    with BackgroundServer(llm, settings) as running:
        yield running


def post_raw(server: BackgroundServer, path: str, body: bytes) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(
        server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30
    )
    return response, time.perf_counter() - started


def post(server: BackgroundServer, path: str, body: object) -> tuple[httpx.Response, float]:
    """``body`` as ASCII JSON: a lone surrogate travels as its ``\\ud800`` escape."""
    return post_raw(server, path, json.dumps(body).encode("ascii"))


def assert_refused(response: httpx.Response, seconds: float, status: int = 400) -> str:
    assert response.status_code == status, response.text
    assert seconds < FAST_S, f"took {seconds:.2f} s"
    message = response.json()["error"]["message"]
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- expansion and nesting


def test_alias_bomb_in_a_request_set_is_400_at_once(server: BackgroundServer) -> None:
    body = {
        "prompt": "Hi",
        "max_tokens": 1,
        "quicksilver": {"set": [f"halting.min_layer={alias_bomb()}"]},
    }
    message = assert_refused(*post(server, "/v1/completions", body))
    assert "alias" in message
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_alias_bomb_in_cli_set_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    code = main(["generate", "--prompt", "Hi", "--set", f"halting.min_layer={alias_bomb()}"])
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert code == 2 and seconds < FAST_S
    assert len(err.splitlines()) == 1 and "alias" in err and "Traceback" not in err


def test_alias_bomb_and_deep_nesting_in_policy_files_are_refused(tmp_path: Path) -> None:
    files = {
        "bomb.yaml": f"halting:\n  min_layer: {alias_bomb()}\n",
        "deep.yaml": "[" * 100_000,
        "deep.json": "[" * 100_000,
    }
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        started = time.perf_counter()
        with pytest.raises(
            qs.QuicksilverError, match="cannot parse.*(alias|nests deeper)"
        ) as caught:
            load_policy(str(path))
        assert time.perf_counter() - started < FAST_S
        assert "\n" not in str(caught.value)


def test_a_few_aliases_in_a_policy_file_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("halting:\n  min_layer: &first 1\n  patience: *first\n")
    assert load_policy(str(path)).to_config()["halting"]["patience"] == 1


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_json_nested_100000_deep_is_400(server: BackgroundServer, path: str) -> None:
    depth = 100_000
    message = assert_refused(*post_raw(server, path, b"[" * depth + b"]" * depth))
    assert "nests deeper" in message


def test_brackets_inside_strings_do_not_count_as_nesting(server: BackgroundServer) -> None:
    response, _ = post(server, "/tokenize", {"prompt": "[{" * 1000 + '"\\'})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- text that is not Unicode


SURROGATE_BODIES = [
    ("/v1/completions", {"prompt": SURROGATE}),
    ("/v1/completions", {"prompt": ["fine", "bad " + SURROGATE]}),
    ("/v1/completions", {"prompt": "Hi", "stop": [SURROGATE]}),
    ("/v1/completions", {"prompt": "Hi", "user": SURROGATE}),
    ("/v1/completions", {"prompt": "Hi", "model": SURROGATE}),
    ("/v1/completions", {"prompt": "Hi", SURROGATE: 1}),
    ("/v1/completions", {"prompt": "Hi", "quicksilver": {"set": [f"halting.x={SURROGATE}"]}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": SURROGATE}),
    ("/tokenize", {"prompt": SURROGATE}),
    ("/tokenize", {"prompt": SURROGATE, "add_special_tokens": False}),
    ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}),
    ("/detokenize", {"tokens": [5], "note": SURROGATE}),
]


@pytest.mark.parametrize(
    ("path", "body"),
    SURROGATE_BODIES,
    ids=[f"{p}-{json.dumps(b)[:30]}" for p, b in SURROGATE_BODIES],
)
def test_lone_surrogates_are_400(server: BackgroundServer, path: str, body: dict) -> None:
    message = assert_refused(*post(server, path, body))
    assert "surrogate" in message


@pytest.mark.parametrize(
    ("text", "lone"),
    [
        (r'"\ud800"', True),
        (r'"\ude00"', True),
        (r'"\ud83d"', True),
        (r'"\ud83d x\ude00"', True),
        (r'"\ud83d\ud83d\ude00"', True),
        (r'"\\\ud800"', True),  # an escaped backslash, then the escape
        (r'"\ud83d\ude00"', False),  # a pair is one character
        (r'"\uD83D\uDE00"', False),
        (r'"\\ud800"', False),  # a backslash and the text "ud800"
        (r'"\u0041 plain"', False),
    ],
)
def test_lone_surrogate_escapes_are_found_on_the_raw_text(text: str, lone: bool) -> None:
    assert has_lone_surrogate(text) == lone
    parsed = json.loads(text)
    assert any(0xD800 <= ord(c) <= 0xDFFF for c in parsed) == lone  # the reference


def test_python_api_refuses_lone_surrogates_in_one_line(model_dir: Path) -> None:
    llm = qs.load(str(model_dir), dtype="float32")
    for call in (
        lambda: llm.generate(SURROGATE, max_new_tokens=1),
        lambda: llm.encode("ok " + SURROGATE),
    ):
        with pytest.raises(qs.InvalidArgument, match="surrogate") as caught:
            call()
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- protocol


def test_unknown_model_is_404_model_not_found(server: BackgroundServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 1, "model": "gpt-4"}
    response, seconds = post(server, "/v1/completions", body)
    assert_refused(response, seconds, 404)
    assert response.json()["error"]["code"] == "model_not_found"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "model": "x"}
    assert_refused(*post(server, "/v1/chat/completions", chat), 404)


def test_the_served_name_and_the_started_name_are_both_accepted(
    server: BackgroundServer, model_dir: Path
) -> None:
    for name in ("tiny", str(model_dir)):
        body = {"prompt": "Hi", "max_tokens": 1, "model": name}
        response, _ = post(server, "/v1/completions", body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "tiny"


def test_unknown_chat_role_is_400(server: BackgroundServer) -> None:
    body = {"messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 1}
    message = assert_refused(*post(server, "/v1/chat/completions", body))
    assert "role" in message


# ---------------------------------------------------------------- metrics


def test_unknown_paths_leave_metrics_bounded(server: BackgroundServer) -> None:
    # A fresh connection per request: on loopback a kept-alive httpx connection waits ~40 ms
    # per request for a delayed ACK, which would make this test slow, not different.
    with httpx.Client(base_url=server.url, headers={"connection": "close"}) as client:
        client.get("/no-such-path")
        before = client.get("/metrics").text
        for i in range(2000):
            assert client.get(f"/probe/{i}/x").status_code == 404
        after = client.get("/metrics").text
    assert "/probe/" not in after
    assert len(after) - len(before) < 100  # only the digits of existing counts grew
    assert '{code="404",endpoint="unmatched"}' in after


def test_metrics_registries_are_per_instance() -> None:
    first, second = Metrics(), Metrics()
    first.add(generation_tokens=3)
    first.spec_decode(drafts=2, draft_tokens=8, accepted_tokens=5)
    first.observe_inter_token(0.01)
    text = first.render(queued=1, running=2)
    assert "quicksilver_generation_tokens_total 3.0" in text
    assert "quicksilver_spec_decode_num_drafts_total 2.0" in text
    assert "quicksilver_spec_decode_num_draft_tokens_total 8.0" in text
    assert "quicksilver_spec_decode_num_accepted_tokens_total 5.0" in text
    assert "quicksilver_inter_token_latency_seconds_count 1.0" in text
    assert "quicksilver_queued_requests 1.0" in text
    assert "quicksilver_generation_tokens_total 0.0" in second.render(0, 0)
    first.add(later_counter=2)
    assert "quicksilver_later_counter_total 2.0" in first.render(0, 0)
    assert "later_counter" not in second.render(0, 0)


# ---------------------------------------------------------------- serve's address checks


def test_serve_on_a_busy_port_fails_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.perf_counter()
        code = main(["serve", "--model", "/no/such/model", "--port", str(port)])
        seconds = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert code == 2 and seconds < FAST_S
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err, err


def test_serve_on_an_address_not_of_this_machine_fails_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.perf_counter()
    code = main(["serve", "--model", "/no/such/model", "--host", "203.0.113.7", "--port", "8123"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.perf_counter() - started < FAST_S
    assert len(err.splitlines()) == 1 and "203.0.113.7" in err, err
